#!/usr/bin/env bash
# The tests: build the environment if needed, lint, then every test (unit and real-stack integration).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/env.sh
. .venv/bin/activate
ruff check .
ruff format --check .
export DUET_TEST_MODEL_CACHE="${DUET_TEST_MODEL_CACHE:-$(mktemp -d)}"
exec python -m pytest -q -p no:cacheprovider --durations=15 "$@"
