#!/usr/bin/env bash
# Create .venv and install vodstack into it. Idempotent: re-running only installs what changed.
# Usage: scripts/bootstrap.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "vodstack needs Python 3.11 or newer as \$PYTHON or python3" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian/Ubuntu ship venv separately; it is the only distribution package we need
    # (ffmpeg comes from the imageio-ffmpeg wheel).
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv
      rm -rf .venv && "$PY" -m venv .venv
    else
      echo "python3 -m venv failed: install your distribution's python3-venv package" >&2
      exit 1
    fi
  fi
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
# The transcoder runs every ffmpeg that reads an upload inside bubblewrap (transcoder/sandbox.py):
# no network, and only its own work directory to read. It is a distribution package.
if ! command -v bwrap >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap \
      >/dev/null
  else
    echo "no bwrap: install your distribution's bubblewrap package (the transcoder's sandbox)" >&2
  fi
fi
# The browser test (tests/integration/test_cors.py) drives Debian's chromium headless through
# npm's playwright-core, which downloads no browser of its own.
if [ -n "$extra" ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
      >/dev/null
  else
    echo "no /usr/bin/chromium: the browser test will fail (install Debian's chromium)" >&2
  fi
fi
stamp=".venv/.installed${extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extra}"
  touch "$stamp"
fi
