#!/usr/bin/env bash
# One prepared benchmark run for a machine with one NVIDIA GPU. Stage time limits add up to 7.5 min.
# Prints one table at the end; every figure is also saved as JSON under $OUT (default bench/out/gpu).
#   bash bench/gpu.sh                 # from a checkout with .venv set up (bash scripts/setup.sh)
# Stages (random weights throughout: weights do not change speed):
#   1. extraction: ViT-L-14, bf16, 20k generated 256 px JPEGs, vs decode+preprocess only, same workers
#   2. fit: one epoch of the paper config on 1M x 768 float16, vs the reference-style loop (on a subset)
#   3. sweep: K=24 MLP and linear heads vs sequential fits (1 epoch, 2 fits timed and extrapolated),
#      then the K=24 MLP sweep over 1M rows x 10 epochs alone (target: under 60 s on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
CORES=$(nproc)
stage() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}
stage extract 140 "$PY" bench/extract.py --model ViT-L-14 --pretrained none --device cuda --precision bf16 \
  --n-images 20000 --size 256 --batch-size 256 --workers $((CORES - 1)) --json "$OUT/extract.json"
# The 1M x 768 float16 store is written once (~35 s) and shared by the fit and sweep stages.
STORE1M="$OUT/store-1m"
[ -d "$STORE1M" ] || stage store_1m 50 "$PY" -c "from dfclip.store.synthetic import \
make_synthetic_store as m; m('$STORE1M', n=1_000_000, dim=768, signal=3.0)"
stage fit 100 "$PY" bench/fit.py --device cuda --rows 1000000 --baseline-rows 100000 --rounds 1 \
  --store "$STORE1M" --json "$OUT/fit.json"
stage sweep_ratio 80 "$PY" bench/sweep.py --device cuda --rows 1000000 --epochs 1 --k 24 --heads mlp,linear \
  --sequential-fits 2 --store "$STORE1M" --json "$OUT/sweep_ratio.json"
stage sweep_1m_x10 80 "$PY" bench/sweep.py --device cuda --rows 1000000 --epochs 10 --k 24 --heads mlp \
  --sequential-fits 0 --store "$STORE1M" --json "$OUT/sweep_1m_x10.json"
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("\n== dfclip GPU benchmark:", (out / "gpu.txt").read_text().strip())
for name in ("extract", "fit", "sweep_ratio", "sweep_1m_x10"):
    f = out / f"{name}.json"
    if not f.exists():
        print(f"{name:8s} no result (see {out}/{name}.log)")
        continue
    data = json.loads(f.read_text())
    rows = data.get("rows") or data.get("results") or [data]
    for r in rows if isinstance(rows, list) else [rows]:
        print(f"{name:8s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in r.items() if not isinstance(v, (dict, list))))
PYEOF
