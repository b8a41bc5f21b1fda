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
# The face detector, facenet-pytorch's MTCNN (weights inside its wheel). Its metadata pins
# torch<2.3, numpy<2 and Pillow<10.3 although it runs with the versions above, so it cannot be a
# dfclip dependency (pip would downgrade torch): it goes in with --no-deps, after requests, the
# one package it imports that dfclip does not bring (installed with its own dependencies).
if ! "$VENV/bin/python" -c "import importlib.metadata as m, requests; assert m.version('facenet-pytorch') == '2.6.0'" \
    2>/dev/null; then
  { "$VENV/bin/pip" install -q requests && "$VENV/bin/pip" install -q --no-deps facenet-pytorch==2.6.0; } \
    >>"$log" 2>&1 || { cat "$log"; exit 1; }
fi
"$VENV/bin/dfembed" --help >/dev/null
