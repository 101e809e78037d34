#!/usr/bin/env bash
# The main job: build the environment if needed, then `duet train` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/env.sh
exec .venv/bin/duet train "$@"
