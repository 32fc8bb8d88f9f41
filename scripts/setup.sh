#!/usr/bin/env bash
# Create .venv (once) and install pivotseg with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.pivotseg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: here it resolves to the local CPU build; with a GPU, the CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test,plot]"
  touch "$stamp"
fi
