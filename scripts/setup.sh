#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install dfclip with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import cli, open_clip, h5py, polars, sklearn" 2>/dev/null; then
  "$VENV/bin/pip" install -q -c constraints.txt torch torchvision
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[test]"
fi
