#!/usr/bin/env bash
# The test command: set up, lint, format check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
# One thread per process: the suite starts torchrun and loader processes of its own, and
# oversubscribed cores make it several times slower on a 2-core machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest --durations=10 "$@"
