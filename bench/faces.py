"""The face stage's cost per frame, against the backbone's forward on the crops it makes.

    python bench/faces.py                                             # CPU, tiny model, 1 thread
    python bench/faces.py --model ViT-L-14 --device cuda --batch 32   # the GPU target

For each frame size, `--batch` frames showing one face each (the astronaut of tests/media.py,
pasted at a third of the frame height) go, already on the device, through:
  detect   the registered detector (MTCNN), one call for the batch, as the extract job calls it
  align    align_crops of the detected faces to the backbone's input size
  embed    the backbone's forward on those crops (under fp16 autocast on CUDA, as `extract`)
The table gives milliseconds per frame of each (median of --rounds) and (detect + align) / embed,
the share the face stage adds to a frame's model time (decoding is bench/extract.py's business).
Weights do not change speed, so the backbone is built with random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from common import clock, describe, machine_info, print_table, resolve_device, setup_threads, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from media import astronaut_face, paste_face  # noqa: E402

from dfclip.embed.backbone import load_backbone  # noqa: E402
from dfclip.embed.faces import align_crops, load_detector  # noqa: E402


def frames_with_faces(n: int, h: int, w: int) -> torch.Tensor:
    """n uint8 frames [n, h, w, 3], one face each at a third of the frame height, at varied places."""
    rng = np.random.default_rng(0)
    width = h / 3 * 0.8  # the face box is about 0.8 x its height wide
    return torch.from_numpy(np.stack([
        paste_face((h, w), astronaut_face(), (rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.65) * h), width,
                   angle_deg=rng.uniform(-15, 15), seed=i).frame for i in range(n)]))


def timed(fn, device: torch.device, rounds: int) -> tuple[float, object]:
    """Median seconds of fn() over `rounds` calls after one warm-up call, and its last result."""
    result = fn()
    times = []
    for _ in range(rounds):
        start = clock(device)
        result = fn()
        times.append(clock(device) - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dfclip-tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8, help="frames per detector call (a video's frames)")
    parser.add_argument("--sizes", default="360x640,720x1280,1080x1920", help="frame sizes, HxW, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    detector = load_detector("mtcnn", device)
    backbone = load_backbone(args.model, "none", device=device)
    size = backbone.visual.image_size[0]
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    mean = torch.tensor([0.481, 0.458, 0.408], device=device)[:, None, None]
    std = torch.tensor([0.269, 0.261, 0.276], device=device)[:, None, None]

    rows = []
    for spec in args.sizes.split(","):
        h, w = map(int, spec.split("x"))
        frames = frames_with_faces(args.batch, h, w).to(device)
        t_detect, found = timed(lambda: detector.detect(frames), device, args.rounds)
        index = torch.tensor([i for i, f in enumerate(found) if len(f)], dtype=torch.long)
        landmarks = torch.stack([f.landmarks[0] for f in found if len(f)])
        t_align, crops = timed(lambda: align_crops(frames, index, landmarks, size), device, args.rounds)

        def embed():
            with amp:
                return backbone.encode((crops.float() / 255 - mean) / std)

        t_embed, _ = timed(embed, device, args.rounds)
        n, faces = args.batch, len(index)
        rows.append({"frame": spec, "faces": f"{faces}/{n}", "detect_ms": 1e3 * t_detect / n,
                     "align_ms": 1e3 * t_align / n, "embed_ms": 1e3 * t_embed / n,
                     "share": (t_detect + t_align) / t_embed})
    print(f"face stage vs {args.model} forward, {args.batch} frames per call, size {size}; {describe(info)}")
    print_table(rows, [("frame", "frame", ""), ("faces", "found", ""), ("detect_ms", "detect ms", ".1f"),
                       ("align_ms", "align ms", ".2f"), ("embed_ms", "embed ms", ".2f"),
                       ("share", "(detect+align)/embed", ".2f")])
    write_json(args.json, {"machine": info, "model": args.model, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
