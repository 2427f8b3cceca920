#!/usr/bin/env bash
# Set up what the tests need, lint, and run the whole test suite (real vLLM engine on CPU).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check src tests builder scripts
.venv/bin/python -m pytest "$@"
