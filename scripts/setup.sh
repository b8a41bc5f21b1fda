#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install dfclip with its test extras. Idempotent:
# a second run only checks that everything is installed (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# torch first, pinned (constraints.txt says why); then dfclip itself, editable, with test extras.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "$VENV/bin/pip" install -q -c constraints.txt torch torchvision
fi
log="$VENV/dfclip-install.log"
"$VENV/bin/pip" install -q -c constraints.txt -e ".[test]" >"$log" 2>&1 || { cat "$log"; exit 1; }
"$VENV/bin/dfembed" --help >/dev/null
