#!/usr/bin/env bash
# Set up from scratch if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
exec "$VENV/bin/python" -m pytest "$@"
