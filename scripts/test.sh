#!/usr/bin/env bash
# The test command: set up, lint, format check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Headless Chromium for tests/test_serve_browser.py, installed only for the tests (the demo does
# not need it); without one those tests skip, saying why.
bash scripts/install_browser.sh >/dev/null ||
  echo "test: no headless Chromium (scripts/install_browser.sh); browser tests will skip" >&2
ruff check .
ruff format --check .
# One thread per process: the suite starts torchrun and loader processes of its own, and
# oversubscribed cores make it several times slower on a 2-core machine. Two pytest workers
# (pytest-xdist, a test file to a worker) keep both cores of the CI machine busy;
# PIVOTSEG_TEST_WORKERS=0 runs everything in this process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -n "${PIVOTSEG_TEST_WORKERS:-2}" --dist loadfile --durations=10 "$@"
