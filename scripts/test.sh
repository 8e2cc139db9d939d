#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the tests (CUDA tests skip without a GPU).
#   bash scripts/test.sh           the whole suite (what CI runs)
#   bash scripts/test.sh --fast    the inner loop: every module, without the tests marked slow
# Other arguments go to pytest (a file, -k, -x). Tests run on TEST_WORKERS pytest-xdist workers (default 2;
# 0 runs them in this one process); a module's tests stay on one worker, so its shared fixtures are built once.
# The 15 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=(-q --durations=15)
if [ "${1:-}" = --fast ]; then
    shift
    args+=(-m "not slow")
fi
workers=${TEST_WORKERS:-2}
if [ "$workers" != 0 ]; then
    args+=(-n "$workers" --dist loadgroup)
    # One thread per process: the workers and their training subprocesses already fill the cores, and torch's
    # default (a thread per core in every process) oversubscribes them.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec .venv/bin/python -m pytest "${args[@]}" "$@"
