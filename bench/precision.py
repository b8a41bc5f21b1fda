"""Extraction precision: how far fp16 and bf16 autocast features lie from fp32 ones, same weights, same images.

    python bench/precision.py                                          # CPU, tiny model, 16 images
    python bench/precision.py --model ViT-L-14 --n-images 8            # random-init ViT-L-14 on a CPU, ~90 s
    python bench/precision.py --model ViT-L-14 --device cuda --n-images 256 --batch-size 64

Per image: relative error ||f_p - f_fp32|| / ||f_fp32|| of the raw features (what the store
keeps) and the cosine similarity to the fp32 features; the table gives the mean and the worst
image. The images and the preprocessing are extract's own (bench/extract.py make_images,
the host/device preprocess split); weights are a seeded random init (`--pretrained none`),
which is what a machine without the real weights can measure. Autocast on a CPU is not
autocast on a GPU (other kernels, other accumulation), so CPU figures say how a dtype's
rounding propagates through the tower, not what a GPU will give to the last digit.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from common import describe, machine_info, print_table, resolve_device, setup_threads, write_json
from extract import make_images

from dfclip.embed.backbone import load_backbone, split_preprocess
from dfclip.embed.extract import AMP_DTYPES


def features(backbone, pixels: torch.Tensor, precision: str, batch_size: int) -> torch.Tensor:
    """fp32 features [N, dim] of preprocessed pixels, the forward under `precision` as extract runs it."""
    device = backbone.device
    out = []
    for chunk in pixels.split(batch_size):
        with torch.autocast(device.type, dtype=AMP_DTYPES.get(precision), enabled=precision in AMP_DTYPES):
            out.append(backbone.encode(chunk.to(device)).cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dfclip-tiny")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-images", type=int, default=16)
    # 1: on this CPU (torch 2.14), ViT-L-14 at batch 2 or 4 did not finish in 5 to 25 minutes, at batch 1 in 90 s
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    setup_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)  # one random init for every precision
    backbone = load_backbone(args.model, args.pretrained, device=device)
    host, on_device = split_preprocess(backbone.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.n_images, 256)
        paths = sorted(Path(tmp).rglob("*.jpg"))
        uint8 = torch.stack([host(Image.open(p)) for p in paths])
    pixels = on_device(uint8)
    ref = features(backbone, pixels, "fp32", args.batch_size)
    rows = []
    for precision in args.precisions.split(","):
        got = features(backbone, pixels, precision, args.batch_size)
        rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
        rows.append({"precision": precision, "rel_err_mean": rel.mean().item(), "rel_err_max": rel.max().item(),
                     "cos_min": cos.min().item()})
    info = machine_info(device)
    print(f"{args.model} ({args.pretrained}), {args.n_images} images, {describe(info)}")
    print_table(rows, [("precision", "precision", ""), ("rel_err_mean", "rel. error mean", ".2e"),
                       ("rel_err_max", "rel. error max", ".2e"), ("cos_min", "min cosine", ".6f")])
    write_json(args.json, {"model": args.model, "pretrained": args.pretrained, "n_images": args.n_images,
                           "rows": rows, "machine": info})


if __name__ == "__main__":
    main()
