#!/usr/bin/env bash
# Download the wheels a GPU machine with python3.12 + torch lacks (it is expected to have h5py, typer, rich,
# timm, huggingface-hub, torchvision, regex, tqdm (bench/gpu.sh checks them first), but no polars, open_clip_torch, ftfy or wcwidth and no
# network) into .whl/ (git-ignored), for CPython 3.12 on manylinux x86_64. The versions are the
# ones this checkout's .venv runs, so the GPU run tests the same code paths as CI.
#   bash bench/gpu-wheels.sh [DEST]      # DEST defaults to .whl
#   bash bench/gpu-wheels.sh --check DEST  # only verify that DEST is a complete, installable set
#   bash bench/gpu-wheels.sh --video [DEST]  # the video stage's set into .whl-video/ (a second call: the two
#                                            # sets together pass the 64 MiB a call can carry): PyAV,
#                                            # facenet-pytorch and requests with its dependencies, plus the
#                                            # demo videos' head picture (the machine has no scikit-image)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
PACKAGES=(polars polars-runtime-32 open_clip_torch ftfy wcwidth)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}")
check=0 video=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
if [ "${1:-}" = "--video" ]; then video=1; shift; fi
if [ $video = 1 ]; then
  PACKAGES=(av facenet-pytorch requests urllib3 idna certifi charset-normalizer)
  DEST="${1:-.whl-video}"
else
  DEST="${1:-.whl}"
fi

pins=()
for p in "${PACKAGES[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) \
    || { echo "error: $p is not installed in $PY; run bash scripts/setup.sh first" >&2; exit 2; }
  pins+=("$p==$v")
done

if [ $check = 0 ]; then
  mkdir -p "$DEST"
  rm -f "$DEST"/*.whl
  "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "${pins[@]}"
fi
# Complete = pip, resolving for 3.12 from these files alone (no index), needs nothing that the GPU
# machine lacks. Everything else the pins require is preinstalled there; --no-deps is how gpu.sh
# installs, so only the set itself is checked, plus that every pin resolves from it.
"$PY" -m pip install -q --dry-run --no-index --no-deps --find-links "$DEST" --target /tmp/dfclip-wheel-check \
  "${TARGET[@]}" "${pins[@]}"
if [ $video = 1 ] && [ $check = 0 ]; then
  "$PY" -c "import sys; from dfclip.embed.demo import save_demo_head; save_demo_head(sys.argv[1])" "$DEST/head.png"
fi
n=$(ls "$DEST"/*.whl | wc -l)
mb=$(du -cm "$DEST"/*.whl | tail -1 | cut -f1)
[ "$n" -eq "${#PACKAGES[@]}" ] || { echo "error: expected ${#PACKAGES[@]} wheels in $DEST, found $n" >&2; exit 1; }
echo "ok: $n wheels for cp312 manylinux x86_64 in $DEST (${mb} MiB): ${pins[*]}"
