#!/usr/bin/env bash
# The main job end to end on an embedded demo, from a fresh machine:
# set up, generate a labelled face folder, extract embeddings, fit, sweep, predict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="$(cd "${VENV:-.venv}" && pwd)"
export PATH="$VENV/bin:$PATH"
rm -rf demo && mkdir -p demo && cd demo

echo "== 1. a labelled demo folder: real/{ffhq,celeba}, fake/{stylegan2,sd15,dalle} (procedural faces)"
dfembed demo ./images --n-per-source 200

# No CLIP weights can be downloaded here, so the demo extracts with the tiny random-init
# model that ships with dfclip. Every figure below therefore comes from RANDOM weights: it
# shows the pipeline working, not how well CLIP features detect fakes. With weights
# available, drop these two lines: the default is ViT-L-14 with OpenAI's weights.
export DFCLIP_MODEL=dfclip-tiny DFCLIP_PRETRAINED=none
echo "== NOTE: offline, so extracting with the tiny random-init model (DFCLIP_MODEL=$DFCLIP_MODEL, DFCLIP_PRETRAINED=$DFCLIP_PRETRAINED)"

echo "== 2. the card's usage, verbatim"
dfembed extract ./images
dfembed extract ./images            # resumable: a second run skips everything
dfembed info
dfhead fit --cvar-alpha 0.3

echo "== 3. the paper's method, with an unseen generator held out"
dfhead fit --preset paper --holdout-source dalle --name paper-unseen-dalle

echo "== 4. a small grid, all heads trained at once"
dfhead sweep --cvar-alpha 0.3,0.6,1 --auc-gamma 0,0.5 --seeds 2 --epochs 10 --name demo-sweep

echo "== 4b. the same grid split over two processes with torchrun (each rank trains half; rank 0 merges)"
torchrun --nproc-per-node 2 "$VENV/bin/dfhead" sweep --cvar-alpha 0.3,0.6,1 --auc-gamma 0,0.5 --epochs 10 \
  --device cpu --name demo-sweep-2ranks

echo "== 5. score new images with the best head (embedded with the run's recorded model)"
dfhead predict runs/demo-sweep/best ./images/fake/dalle --out scores.csv
dfhead runs
echo "demo finished: see demo/runs/ (report.json, roc_pr.png, leaderboard.parquet, heatmap_alpha_gamma.png)"
