#!/usr/bin/env bash
# The tests: build the environment if needed, lint, then every test (unit and real-stack integration).
# `./scripts/test.sh --fast`: the fast tier only, the tests that start no Ray, server or process (about a
# minute; how tests are marked and guarded is in tests/conftest.py). Other arguments go to pytest as well.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/env.sh
. .venv/bin/activate
ruff check .
ruff format --check .
export DUET_TEST_MODEL_CACHE="${DUET_TEST_MODEL_CACHE:-$(mktemp -d)}"
# fd 3: the terminal's stderr, where tests/conftest.py writes the stacks of a test that hangs.
export DUET_TEST_STDERR_FD=3
exec 3>&2
exec python -m pytest -q -p no:cacheprovider --durations=40 "$@"
