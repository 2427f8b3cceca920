#!/usr/bin/env bash
# Set up what the tests need, lint, and run the whole test suite (real vLLM engine on CPU).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast unit tests.
# Two test processes (pytest-xdist, a module's tests in one of them): most of the suite's time
# is worker processes starting, each on one core; TEST_PROCESSES sets another number (0: none).
#   scripts/test.sh --stress [ARGS]   the same with two CPU-bound processes beside the tests
#                                     (a busy machine: the suite must pass there too)
set -euo pipefail
cd "$(dirname "$0")/.."
stress=0
if [[ "${1:-}" == "--stress" ]]; then
  stress=1
  shift
fi
scripts/setup.sh --test
.venv/bin/ruff check src tests builder scripts benchmarks
.venv/bin/hadolint Dockerfile
if (( stress )); then
  pids=()
  for _ in 1 2; do
    yes >/dev/null &
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
  export WORKER_VLLM_TEST_STRESS=1  # tests that allow for a busy machine read it
  echo "Stress: CPU-bound processes ${pids[*]} beside the tests" >&2
fi
.venv/bin/python -m pytest -n "${TEST_PROCESSES:-2}" --dist loadscope "$@"
