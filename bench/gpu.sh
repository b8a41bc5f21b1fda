#!/usr/bin/env bash
# One prepared benchmark run on a machine with one NVIDIA GPU, in one call, under 8 minutes.
# Stage limits add up to 450 s; every figure is saved as JSON under $OUT plus one log, gpu.log.
#
# On the lent H200 (python3.12 with torch, no network): first, here, `bash bench/gpu-wheels.sh`
# puts the missing wheels into .whl/ (git-ignored); then call the device tool with
#   command:   bash bench/gpu.sh
#   carry:     [".whl"]
#   timeout_s: 540
# gpu.sh installs .whl/ into /tmp/site and runs dfclip from this tree (no pip install needed).
#
#   bash bench/gpu.sh --dry-run    # every stage's Python on this CPU with tiny sizes (.venv), a few minutes
#
# Stages (random weights throughout: weights do not change speed):
#   1. extraction: ViT-L-14, fp16, 20k generated 256 px JPEGs, vs decode+preprocess only, same workers
#   2. a 1M x 768 float16 store in /tmp (temp name, renamed only when complete; reused if complete)
#   3. fit: one epoch of the paper config on 1M x 768, vs the reference-style loop (on a subset)
#   4. sweep: K=24 MLP and linear heads vs sequential fits (1 epoch, 2 fits timed and extrapolated)
#   5. the K=24 MLP sweep over 1M rows x 10 epochs alone (target: under 60 s)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then
  PY="${PY:-.venv/bin/python}"
  OUT="${OUT:-bench/out/gpu-dry}"
  WORK="${WORK:-$(mktemp -d /tmp/dfclip-gpu-dry.XXXXXX)}"
  DEV=cpu
else
  PY="${PY:-python3}"
  OUT="${OUT:-bench/out/gpu}"
  WORK="${WORK:-/tmp/dfclip-bench}"
  DEV=cuda
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "error: installing .whl/ failed; rebuild it with bash bench/gpu-wheels.sh" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
mkdir -p "$OUT" "$WORK"
# Run dfclip from this tree: the repo root is the dfclip package, so a link named dfclip suffices.
if ! "$PY" -c "import dfclip" 2>/dev/null; then
  mkdir -p "$WORK/path" && ln -sfn "$PWD" "$WORK/path/dfclip"
  export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
fi
LOG="$OUT/gpu.log"
: >"$LOG"
"$PY" -c "import dfclip, torch, polars, open_clip; print('python', __import__('sys').version.split()[0], '| torch', \
torch.__version__, '| polars', polars.__version__, '| open_clip', open_clip.__version__)" 2>&1 | tee -a "$LOG" \
  || { echo "error: dfclip's dependencies do not import (see above)" | tee -a "$LOG"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
CORES=$(nproc)

stage() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  tail -6 "$LOG" | grep -v "^== " || true
  return $rc
}

if [ $DRY = 1 ]; then
  # Stage limits x2 on a CPU; DRY_LIMIT_SCALE raises them on a busy shared machine (the test suite does).
  N_IMAGES=64; MODEL=dfclip-tiny; ROWS=20000; DIM=64; BASE_ROWS=4000; K=4; EPOCHS=2; SCALE=${DRY_LIMIT_SCALE:-2}
else
  N_IMAGES=20000; MODEL=ViT-L-14; ROWS=1000000; DIM=768; BASE_ROWS=100000; K=24; EPOCHS=10; SCALE=1
fi
stage extract $((120 * SCALE)) "$PY" bench/extract.py --model $MODEL --pretrained none --device $DEV --precision fp16 \
  --n-images $N_IMAGES --size 256 --workers $((CORES > 1 ? CORES - 1 : 1)) --json "$OUT/extract.json"

# A store is renamed into place only once complete: a stage killed at its limit leaves no partial
# store for later stages to train on, and the next run builds it again.
STORE="$WORK/store-${ROWS}x${DIM}"
if [ ! -d "$STORE" ]; then
  rm -rf "$STORE.tmp"
  stage store $((90 * SCALE)) "$PY" -c "import sys; from dfclip.store.synthetic import make_synthetic_store as m; \
m(sys.argv[1], n=int(sys.argv[2]), dim=int(sys.argv[3]), signal=3.0)" "$STORE.tmp" $ROWS $DIM \
    && mv "$STORE.tmp" "$STORE"
fi
if [ -d "$STORE" ]; then
  stage fit $((90 * SCALE)) "$PY" bench/fit.py --device $DEV --rows $ROWS --dim $DIM --baseline-rows $BASE_ROWS \
    --rounds 1 --store "$STORE" --json "$OUT/fit.json"
  stage sweep_ratio $((75 * SCALE)) "$PY" bench/sweep.py --device $DEV --rows $ROWS --dim $DIM --epochs 1 --k $K \
    --heads mlp,linear --sequential-fits 2 --store "$STORE" --json "$OUT/sweep_ratio.json"
  stage sweep_full $((75 * SCALE)) "$PY" bench/sweep.py --device $DEV --rows $ROWS --dim $DIM --epochs $EPOCHS --k $K \
    --heads mlp --sequential-fits 0 --store "$STORE" --json "$OUT/sweep_full.json"
else
  echo "== no complete store: fit and sweep stages skipped" | tee -a "$LOG"
fi
"$PY" - "$OUT" <<'PYEOF' | tee -a "$LOG"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n== dfclip GPU benchmark")
missing = 0
for name in ("extract", "fit", "sweep_ratio", "sweep_full"):
    f = out / f"{name}.json"
    if not f.exists():
        print(f"{name:12s} no result (see gpu.log)")
        missing += 1
        continue
    data = json.loads(f.read_text())
    rows = data.get("rows") or data.get("results") or [data]
    for r in rows if isinstance(rows, list) else [rows]:
        print(f"{name:12s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items() if not isinstance(v, (dict, list))))
sys.exit(1 if missing else 0)
PYEOF
