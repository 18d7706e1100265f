#!/usr/bin/env bash
# What the browser end-to-end test (tests/test_feedback_e2e.py) needs, installed only if missing:
# Debian's chromium (Playwright drives it; `playwright install` is never run, it downloads a
# browser) and the playwright Python package in .venv. Safe to run again: does nothing then.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY="${VENV_PY:-.venv/bin/python}"

if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
fi

if ! "$VENV_PY" -c "import playwright.sync_api" 2>/dev/null; then
  "$VENV_PY" -m pip install -q playwright
fi

/usr/bin/chromium --version 2>/dev/null
"$VENV_PY" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
