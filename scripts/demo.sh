#!/usr/bin/env bash
# The main job end to end on an embedded demo, from a fresh machine:
# set up, generate a labelled face folder, extract embeddings, fit, sweep, predict; then the story:
# intermediate layers vs the final embedding, a held-out generator, and a robustness table;
# then faces and videos: face crops from short videos, video-level metrics and a verdict for one video.
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

echo
echo "== 6. the story: seen generators, a held-out one, intermediate layers, robustness"
cat <<'NOTE'
   READ THIS FIRST. Everything below is synthetic: cartoon faces whose "generators" are
   procedural traces (a GAN-like upsampling checkerboard, diffusion-like smoothing, camera-like
   grain on the reals), and a tiny CLIP-shaped ViT with RANDOM weights (2 blocks, 64 px input).
   The numbers show that the pipeline finds traces that are there and loses them on a generator
   it never saw; they say NOTHING about how well real CLIP features detect real deepfakes.
NOTE
# The manifest keeps the frames of one face in one split (train / val / test), so no face is in
# train and val at once; --layers all also stores the class token after each transformer block.
dfembed extract --manifest ./images/manifest.csv --out layers --layers all
echo "-- 6a. train on ffhq/celeba vs stylegan2/sd15, hold dalle out as the unseen generator; the feature is a sweep axis"
echo "   (proj: the final CLIP embedding, as SP_CUP uses; blockN: the class token after block N, as RINE uses)"
dfhead sweep layers --feature proj,block2,block1+block2 --holdout-source dalle --batch-size 32 \
  --name layers-vs-proj
echo "   val_auc = seen generators (a held-out split of their faces); holdout_auc = dalle, never seen in training."
echo "   Expect val_auc >= 0.9 for block1+block2, lower for proj, and a clear drop on dalle."
echo "-- 6b. robustness: the same images degraded once each into their own stores, scored by the best head"
dfembed extract --manifest ./images/manifest.csv --out jpeg50 --layers all --perturb jpeg:50
dfembed extract --manifest ./images/manifest.csv --out blur2 --layers all --perturb blur:2
dfhead eval runs/layers-vs-proj/best --store layers --store jpeg50 --store blur2 --split test
echo "   (test split: faces in neither train nor val; all five sources, dalle included.) Traces that a"
echo "   perturbation wipes out take the AUC with them: a property of these synthetic traces, not a claim about CLIP."
echo
echo "== 7. faces and videos: find, align and crop the face in every sampled frame, then verdicts per video"
cat <<'NOTE'
   The videos show a real face photo (scikit-image's astronaut) moving over a background, so the
   bundled face detector (MTCNN) finds it; the fake sources add the same procedural traces as above.
   Same caveat: synthetic traces and a random-weight model.
NOTE
dfembed demo ./videos --videos --n-per-source 6
# 6 of each video's 8 frames, evenly spaced; the largest face of each, aligned on its 5 landmarks and cropped
# with margin 1.3 at the model's input size; a frame without a face would be a counted failure.
dfembed extract --manifest ./videos/manifest.csv --out faces --frames 6 --faces largest
dfembed info faces
echo "-- 7a. fit on the train videos' frames, keep the epoch with the best validation VIDEO AUC"
dfhead fit faces --select video_auc --name video-faces
echo "-- 7b. the test videos: frame-level and video-level (mean of the frames' probabilities) metrics"
dfhead eval runs/video-faces --store faces --split test
echo "-- 7c. one video in, one verdict out (its frames are embedded exactly as the store was: same frames, faces, model)"
video=$(ls ./videos/fake/dalle/*.mp4 | head -n 1)
dfhead predict runs/video-faces "$video" --out video-verdict.csv --frame-scores video-frames.csv
echo "demo finished: see demo/runs/ (report.json, roc_pr.png, leaderboard.parquet, heatmap_alpha_gamma.png,"
echo "  layers-vs-proj/best/robustness.png)"
