#!/usr/bin/env bash
# Installs Ensoul into .venv: `scripts/install.sh runtime` or `scripts/install.sh dev`.
# Python packages come from the fully pinned lock files; front-end packages from package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-runtime}"

need() {  # need <command> <how to install it>
  command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is missing; install it with: $2" >&2; exit 1; }
}
need python3 "apt-get install -y python3 python3-venv"
need npm "apt-get install -y nodejs npm"
# inference/audio.py's Opus binding loads the system libopus through ctypes.
if ! /sbin/ldconfig -p | grep -q 'libopus\.so\.0'; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopus0 >/dev/null
  else
    echo "error: libopus is missing; install it with: sudo apt-get install -y libopus0" >&2; exit 1
  fi
fi

python3 - <<'PY' || { echo "error: Python 3.11 or newer is required" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$kind" = dev ]; then
  .venv/bin/python -m pip install --quiet -r requirements-dev.lock
else
  .venv/bin/python -m pip install --quiet -r requirements.lock
fi
npm ci --silent --no-audit --no-fund
.venv/bin/pybabel compile --use-fuzzy -d portal/translations >/dev/null
