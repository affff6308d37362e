#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.12 and installs recjax with the pinned stack (constraints.txt).
# Usage: bash .ci/setup_env.sh [extra]   (extra defaults to "dev")
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"

find_python() {
  local c
  for c in python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # pyenv installs that are not the active version (their shims refuse to run).
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
      [ -x "$c" ] && { echo "$c"; return 0; }
    done
  fi
  return 1
}

PY=$(find_python) || { echo "error: recjax needs Python >= 3.12 (python3.12 not found on PATH or in pyenv)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extra]"
echo "recjax environment ready: $(.venv/bin/python --version) in .venv"
