#!/usr/bin/env bash
# One prepared benchmark run on a machine with one NVIDIA GPU, in one command, under 9 minutes.
# Stage limits add up to 480 s (see LIMIT below); every stage writes its JSON under $OUT as soon as its
# main figure exists, and everything is logged to $OUT/gpu.log.
#
# On a GPU machine with python 3.12 + torch but no network: first, on a machine with network,
# `bash bench/gpu-wheels.sh` puts the missing wheels into .whl/ (git-ignored, ~55 MiB); copy the tree
# with .whl/ to the GPU machine and run there
#   OUT=/path/to/results bash bench/gpu.sh          # OUT is required: the results folder to bring back
# with a wall-clock limit of at least 540 s (480 s of stages, up to 10 s more per stage for `timeout -k`,
# start-up). gpu.sh installs .whl/ into /tmp/site and runs dfclip from this tree (no pip install needed).
#
#   bash bench/gpu.sh --dry-run    # every stage's Python on this CPU with tiny sizes (.venv), a few minutes
#   bash bench/gpu.sh --plan       # the stages and their time limits only
#   OUT=... bash bench/gpu.sh --video   # a second call on the same machine, right after the first (its
#                                       # /tmp/site is reused), carrying .whl-video/ (bash bench/gpu-wheels.sh
#                                       # --video; 37 MiB: with .whl/ it would pass the 64 MiB a call carries):
#                                       # the video stage alone, limit 150 s; --video --dry-run rehearses it here
#
# Stages (random weights throughout: weights do not change speed):
#   1. extract: ViT-L-14, fp16, 20k generated 256 px JPEGs, vs decode+preprocess only, same workers;
#      fails if any image failed or gave a non-finite embedding
#   2. graphs: a small fit with --cuda-graphs on vs off, same seed: equal or not (decides the later stages)
#   3. store: a 1M x 768 float16 store in /tmp (temp name, renamed only when complete; reused if complete)
#   4. fit: one epoch of the paper config on 1M x 768, vs the reference-style loop (on a subset)
#   5. sweep_ratio: K=24 MLP and linear heads vs sequential fits (1 epoch, 1 fit timed and extrapolated)
#   6. sweep_full: the K=24 MLP sweep over 1M rows x 10 epochs alone (target: under 20 s)
#   (--video) video: 40 generated face videos x 32 frames of 512 px, ViT-L-14 fp16: decode only, whole
#      frames, and --faces largest (MTCNN on the GPU); target: the face stage adds at most 30% to a frame
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 PLAN=0 VIDEO=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --plan) PLAN=1 ;;  # print the stages and their limits, run nothing
    --video) VIDEO=1 ;;
    *) echo "error: unknown option $arg; use --dry-run, --plan or --video" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1

# Stage limits, seconds, for the GPU run. Each is an estimate from runs on a 2-core CPU (`--dry-run` and
# each stage at small sizes), scaled to the GPU sizes, assuming every head op is a kernel launch of at
# most 8 us (eager steps: the limits hold even when CUDA graphs are off).
# Ops per training step (torch.profiler on the GPU code path): fit bf16 258, fit bf16 + SAM 494,
# fit with SAM in fp32 or bf16 (the AUC comparison) 577, sweep K=24 MLP 282, sweep K=24 linear 112.
# An epoch of 1M rows = 800k train rows / batch 256 = 3125 steps. Loading 1M x 768 rows: 200k rows
# loaded in 1.3-4.4 s on the 2-core CPU, x5 rows -> 15 s (the GPU copy of 1.5 GB is well under 1 s).
# Python start-up with torch, polars and open_clip: 5 s.
#   extract      5 start + 20k JPEGs at 2.2 ms on 15 processes 3 + ViT-L-14 built twice 2 x 5
#                + decode pass 20k x 3 ms / 15 workers 4 + extract pass (~160 GFLOP/image, 3.2 PFLOP
#                at >= 400 TFLOP/s fp16) 8 + worker start 2 x 2                                    ~35 -> 75
#   graphs       5 start + 50k x 768 store 1 + 2 fits x 2 epochs x 156 steps x 494 ops x 8 us 2.5
#                + capture and warm-up 3                                                            ~12 -> 30
#   store        1M rows in float32 blocks: 200k rows in 4.6 s on the 2-core CPU, x5              ~23 -> 45
#   fit          5 start + load 15 + baseline export 10 + warm-up 3 + timed round (258 + 258 + 494
#                + 494) x 3125 x 8 us 38 + baseline (100k rows, extrapolated) 25 + peaks, ops 3
#                = 99 to fit.json, + AUC fp32 vs bf16 (1 seed x 1 epoch) 2 x 577 x 3125 x 8 us 29 ~128 -> 130
#   sweep_ratio  5 start + 4 loads 60 + warm-up 5 + sweeps (282 + 112) x 3125 x 8 us 10
#                + 1 fit per head (258 + ~100) x 3125 x 8 us 9                                      ~89 -> 100
#   sweep_full   5 start + load 15 + 10 x 3125 x 282 x 8 us 71                                      ~91 -> 100
#   sum          75 + 30 + 45 + 130 + 100 + 100 = 480
# With CUDA graphs a step is one graph launch plus its GPU time (~0.3-0.5 ms for K=24), so the head
# stages should end well inside their limits; the limits do not count on it.
# video (its own call): 5 start + 40 videos of 32 frames written 5 + ViT-L-14 built 3 x 5 + decode 1280
#   frames 3 + whole frames 1280 at >= 1000/s 2 + MTCNN on 1280 512 px frames at >= 30/s 43 + crops 2
#   + detector and worker start 5                                                                    ~80 -> 150
declare -A LIMIT=([extract]=75 [graphs]=30 [store]=45 [fit]=130 [sweep_ratio]=100 [sweep_full]=100 [video]=150)
STAGES=(extract graphs store fit sweep_ratio sweep_full)
[ $VIDEO = 1 ] && STAGES=(video)
TOTAL=0
for s in "${STAGES[@]}"; do TOTAL=$((TOTAL + LIMIT[$s])); done
[ $TOTAL -le 480 ] || { echo "error: stage limits add up to ${TOTAL}s, more than 480s" >&2; exit 2; }
plan() { echo "plan: $(for s in "${STAGES[@]}"; do printf '%s %ss, ' "$s" "${LIMIT[$s]}"; done)total ${TOTAL}s$1"; }
[ $PLAN = 1 ] && { plan ""; exit 0; }

if [ $DRY = 1 ]; then
  PY="${PY:-.venv/bin/python}"
  OUT="${OUT:-bench/out/gpu-dry}"
  WORK="${WORK:-$(mktemp -d /tmp/dfclip-gpu-dry.XXXXXX)}"
  DEV=cpu
else
  [ -n "${OUT:-}" ] || { echo "error: set OUT to the folder the results go to, e.g. OUT=\$PWD/out bash bench/gpu.sh" >&2; exit 2; }
  PY="${PY:-python3}"
  WORK="${WORK:-/tmp/dfclip-bench}"
  DEV=cuda
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "error: installing .whl/ failed; rebuild it with bash bench/gpu-wheels.sh" >&2; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ $VIDEO = 1 ]; then
    [ -d .whl-video ] || { echo "error: --video needs .whl-video/ (bash bench/gpu-wheels.sh --video) carried along" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-video/*.whl \
      || { echo "error: installing .whl-video/ failed; rebuild it with bash bench/gpu-wheels.sh --video" >&2; exit 2; }
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

# The machine first: GPU, shared memory (DataLoader workers pass batches through /dev/shm: 15 workers x 2
# prefetched ViT-L batches ~ 1.2 GB), versions, and the packages assumed preinstalled, in one line each.
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
else
  echo "nvidia-smi: not found" | tee -a "$LOG"
fi
df -h /dev/shm 2>&1 | tail -1 | sed 's/^/\/dev\/shm: /' | tee -a "$LOG"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG" || { echo "error: dfclip's dependencies do not import (see above)" | tee -a "$LOG"; exit 2; }
import importlib, importlib.metadata as md, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print("python", sys.version.split()[0], "|", " | ".join(f"{n} {version(n)}" for n in ("torch", "torchvision", "open_clip_torch", "polars")))
missing = []
for m in ("dfclip", "torch", "torchvision", "open_clip", "polars", "regex", "tqdm", "h5py", "typer", "rich", "ftfy"):
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__})")
print("imports: " + ("ok" if not missing else "missing " + ", ".join(missing) + "; add them to bench/gpu-wheels.sh"))
sys.exit(1 if missing else 0)
PYEOF
CORES=$(nproc)

if [ $DRY = 1 ]; then
  # Stage limits x2 on a CPU; DRY_LIMIT_SCALE raises them on a busy shared machine (the test suite does).
  N_IMAGES=64; MODEL=dfclip-tiny; ROWS=20000; DIM=64; BASE_ROWS=4000; K=4; EPOCHS=2; SCALE=${DRY_LIMIT_SCALE:-2}
  GRAPH_ROWS=4000
else
  N_IMAGES=20000; MODEL=ViT-L-14; ROWS=1000000; DIM=768; BASE_ROWS=100000; K=24; EPOCHS=10; SCALE=1
  GRAPH_ROWS=50000
fi
plan " (x${SCALE} here)" | tee -a "$LOG"

stage() {  # name, command...: runs under the stage's limit (x SCALE), SIGKILL 10 s after SIGTERM
  local name=$1 limit=$((LIMIT[$1] * SCALE)); shift
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  tail -6 "$LOG" | grep -v "^== " || true
  return $rc
}

if [ $VIDEO = 1 ]; then
  if [ $DRY = 1 ]; then
    N_VIDEOS=5; V_FRAMES=4; V_SIZE=128; FACE=(--face-image "$WORK/head.png")
    # the head picture as gpu-wheels.sh --video saves it, so the rehearsal reads it the same way
    "$PY" -c "import sys; from dfclip.embed.demo import save_demo_head; save_demo_head(sys.argv[1])" "$WORK/head.png"
  else
    N_VIDEOS=40; V_FRAMES=32; V_SIZE=512; FACE=(--face-image .whl-video/head.png)
  fi
  "$PY" -c "import av, facenet_pytorch, requests; print('video imports: ok, av', av.__version__)" 2>&1 | tee -a "$LOG" \
    || { echo "error: the video stage needs av and facenet-pytorch (bash bench/gpu-wheels.sh --video)" | tee -a "$LOG"; exit 2; }
  stage video "$PY" bench/extract.py --videos $N_VIDEOS --frames $V_FRAMES --size $V_SIZE --model $MODEL \
    --pretrained none --device $DEV --precision $([ $DRY = 1 ] && echo fp32 || echo fp16) \
    --workers $((CORES > 1 ? CORES - 1 : 1)) "${FACE[@]}" --json "$OUT/video.json"
  rc=$?
  [ -f "$OUT/video.json" ] && cat "$OUT/video.json" | tee -a "$LOG"
  exit $rc
fi

stage extract "$PY" bench/extract.py --model $MODEL --pretrained none --device $DEV --precision fp16 \
  --n-images $N_IMAGES --size 256 --workers $((CORES > 1 ? CORES - 1 : 1)) --json "$OUT/extract.json"

# Graphed and eager training must agree before any speed is reported; if they do not (or the check
# does not finish), the later stages train eager.
GRAPHS=off
if stage graphs "$PY" bench/graphs.py --device $DEV --rows $GRAPH_ROWS --dim $DIM --json "$OUT/graphs.json"; then
  GRAPHS=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['use'])" "$OUT/graphs.json" 2>/dev/null || echo off)
fi
echo "== later stages train with --cuda-graphs $GRAPHS" | tee -a "$LOG"

# A store is renamed into place only once complete: a stage killed at its limit leaves no partial
# store for later stages to train on, and the next run builds it again.
STORE="$WORK/store-${ROWS}x${DIM}"
if [ ! -d "$STORE" ]; then
  rm -rf "$STORE.tmp"
  stage store "$PY" -c "import sys; from dfclip.store.synthetic import make_synthetic_store as m; \
m(sys.argv[1], n=int(sys.argv[2]), dim=int(sys.argv[3]), signal=3.0)" "$STORE.tmp" $ROWS $DIM \
    && mv "$STORE.tmp" "$STORE"
fi
if [ -d "$STORE" ]; then
  stage fit "$PY" bench/fit.py --device $DEV --rows $ROWS --dim $DIM --baseline-rows $BASE_ROWS \
    --rounds 1 --auc-seeds 1 --auc-epochs 1 --cuda-graphs $GRAPHS --store "$STORE" --json "$OUT/fit.json"
  stage sweep_ratio "$PY" bench/sweep.py --device $DEV --rows $ROWS --dim $DIM --epochs 1 --k $K \
    --heads mlp,linear --sequential-fits 1 --cuda-graphs $GRAPHS --store "$STORE" --json "$OUT/sweep_ratio.json"
  stage sweep_full "$PY" bench/sweep.py --device $DEV --rows $ROWS --dim $DIM --epochs $EPOCHS --k $K \
    --heads mlp --sequential-fits 0 --cuda-graphs $GRAPHS --store "$STORE" --json "$OUT/sweep_full.json"
else
  echo "== no complete store: fit and sweep stages skipped" | tee -a "$LOG"
fi
"$PY" - "$OUT" <<'PYEOF' | tee -a "$LOG"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n== dfclip GPU benchmark")
missing = 0
for name in ("extract", "graphs", "fit", "sweep_ratio", "sweep_full"):
    f = out / f"{name}.json"
    if not f.exists():
        print(f"{name:12s} no result (see gpu.log)")
        missing += 1
        continue
    data = json.loads(f.read_text())
    rows = next((data[k] for k in ("results", "rows") if isinstance(data.get(k), list)), [data])
    for r in rows:
        print(f"{name:12s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items() if not isinstance(v, (dict, list))))
sys.exit(1 if missing else 0)
PYEOF
