#!/usr/bin/env bash
# Install what tests/test_serve_browser.py drives: Playwright (pip) and a headless Chromium.
# Safe to run again. Prints the browser's path as its last line, or the reason there is none
# (exit 1). Order: a Chromium already here; Debian's `chromium` package (as root with apt-get);
# Playwright's own build (`playwright install chromium`, which needs Playwright's download host).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import playwright" 2>/dev/null; then
  "$PY" -m pip install -q "playwright>=1.40" >&2 || { echo "pip could not install playwright"; exit 1; }
fi

find_browser() {
  for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1 && "$name" --version >/dev/null 2>&1; then
      command -v "$name"
      return 0
    fi
  done
  "$PY" - <<'EOF' 2>/dev/null
import os, sys
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    path = p.chromium.executable_path
if not os.path.isfile(path):
    sys.exit(1)
print(path)
EOF
}

if find_browser; then exit 0; fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium package (about 120 MB)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1
  fi
  if find_browser; then exit 0; fi
fi

echo "trying playwright install chromium" >&2
timeout 300 "$PY" -m playwright install chromium >/dev/null 2>&1
if find_browser; then exit 0; fi

echo "no headless Chromium: not root with apt-get for Debian's chromium, and Playwright's" \
  "download failed (offline?); install chromium or run: python -m playwright install chromium"
exit 1
