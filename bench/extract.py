"""Extraction throughput against the input pipeline's own ceiling.

    python bench/extract.py                                   # CPU, tiny model, 512 generated JPEGs
    python bench/extract.py --model ViT-L-14 --pretrained none --device cuda --n-images 20000

Two passes over the same image folder, with the same DataLoader, batch size and workers:
  decode   decode + preprocess in the workers, pin, copy to the device; no model
  extract  the whole `dfembed extract` job (model, autocast, HDF5 shards)
The ratio extract/decode says who is the bottleneck: near 1.0 the model keeps up with JPEG
decoding (the pipeline is input-bound, more --workers would help); well below 1.0 the model
is the limit. Both rates include worker start-up, as a real run does. Weights do not change
speed, so `--pretrained none` (random init) measures a model whose weights are not at hand.

    python bench/extract.py --compare-layers all --workers 0 --rounds 3   # cost of --layers

With --compare-layers SPEC, the extract pass runs alternately without and with `--layers SPEC`
(--rounds times each, side by side in one run, each into a fresh store) and prints the
median time of each and their ratio: the extra cost of storing intermediate blocks.
--deep N builds the tiny model with N blocks instead of 2 (e.g. 24, as ViT-L/14 has).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


from dfclip.embed.backbone import MODEL_CONFIG_DIR, load_backbone, split_preprocess
from dfclip.embed.config import EmbedConfig
from dfclip.embed.extract import (DEFAULT_BATCH_SIZE, ImageFiles, default_workers, extract, make_loader,
                           rank_from_env, resolve_device, resolve_precision)
from dfclip.embed.sources import scan_folder


def make_images(folder: Path, n: int, size: int, seed: int = 0, processes: int | None = None) -> None:
    """n photo-like JPEGs (smooth colour fields plus sensor-like noise), quality 90, under folder/fake/bench.

    Image i is drawn from its own seed (seed, i), so the images are the same however many processes
    write them: at 2.2 ms per image, 20k images take 44 s in one process, 3 s on 15."""
    out = folder / "fake" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    processes = processes or min(16, os.cpu_count() or 1)
    chunks = [(out, range(a, min(n, a + 256)), size, seed) for a in range(0, n, 256)]
    if processes <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            _write_images(*chunk)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.starmap(_write_images, chunks)


def _write_images(out: Path, indices: range, size: int, seed: int) -> None:
    for i in indices:
        rng = np.random.default_rng((seed, i))
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / f"img{i:06d}.jpg", quality=90)


def decode_only(root: Path, paths: list[str], preprocess, *, batch_size: int, workers: int,
                device: torch.device) -> tuple[int, float]:
    """(images, seconds) for decode + preprocess + copy to `device`, through extract's own DataLoader
    and the same host/device split of the preprocess that the job uses."""
    split = split_preprocess(preprocess)
    host, on_device = split if split else (preprocess, None)
    loader = make_loader(ImageFiles(root, paths, host), batch_size=batch_size, workers=workers,
                         pin_memory=device.type == "cuda")
    n, start = 0, time.perf_counter()
    for batch in loader:
        if batch.pixels is not None:
            pixels = batch.pixels.to(device, non_blocking=True)
            if on_device is not None:
                on_device(pixels)
        n += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del loader
    return n, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, help="existing image folder (default: generate --n-images)")
    ap.add_argument("--n-images", type=int, default=512)
    ap.add_argument("--size", type=int, default=256, help="side of the generated JPEGs, px")
    ap.add_argument("--model", default="dfclip-tiny")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--compare-layers", metavar="SPEC", help="time extract without and with --layers SPEC")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--deep", type=int, help="tiny model with this many blocks (with --compare-layers)")
    ap.add_argument("--videos", type=int, metavar="N",
                    help="time N generated face videos: decode only, extract whole frames, extract --faces largest")
    ap.add_argument("--frames", type=int, default=16, help="frames per generated video (with --videos)")
    ap.add_argument("--face-image", type=Path, help="head picture for the generated videos (default: scikit-image's "
                    "astronaut; bench/gpu-wheels.sh --video saves it for machines without scikit-image)")
    args = ap.parse_args()
    if args.compare_layers:
        compare_layers(args)
        return
    if args.videos:
        compare_videos(args)
        return

    rank = rank_from_env()
    device = resolve_device(args.device, rank)
    precision = resolve_precision(args.precision, device)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"])
    workers = default_workers(rank) if args.workers is None else args.workers

    with tempfile.TemporaryDirectory(prefix="dfclip-bench-") as tmp:
        root = args.images or Path(tmp) / "images"
        if args.images is None:
            t = time.perf_counter()
            make_images(root, args.n_images, args.size)
            print(f"generated {args.n_images} {args.size}px JPEGs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        paths = scan_folder(root)["path"].to_list()
        for p in paths:  # both passes start with the files in the page cache
            (Path(root) / p).read_bytes()

        preprocess = load_backbone(args.model, args.pretrained, device="cpu").preprocess
        n_dec, s_dec = decode_only(Path(root), paths, preprocess, batch_size=batch_size, workers=workers, device=device)
        config = EmbedConfig(model=args.model, pretrained=args.pretrained, device=str(device), precision=precision,
                             batch_size=batch_size, workers=workers)
        rep = extract(root, Path(tmp) / "store", config, progress=False)
        n_ext = rep["embedded"] + rep["failed"]
        s_ext = n_ext / rep["images_per_s"] if rep["images_per_s"] else float("nan")

    results = {
        "device": rep["device"], "model": args.model, "precision": precision, "batch_size": batch_size,
        "workers": workers, "cpus": os.cpu_count(), "images": len(paths), "size": args.size if args.images is None else None,
        "decode_images_per_s": round(n_dec / s_dec, 1), "extract_images_per_s": rep["images_per_s"],
        "ratio": round(rep["images_per_s"] / (n_dec / s_dec), 3),
        # A failed or non-finite row is a broken run, not a fast one: the script then exits 1.
        "embedded": rep["embedded"], "failed": rep["failed"], "non_finite": rep["non_finite"],
        "torch": torch.__version__,
    }
    print(f"\ndevice {results['device']}, model {args.model} ({precision}), batch {batch_size}, {workers} workers, "
          f"{len(paths)} images")
    print(f"{'stage':<9} {'images':>7} {'seconds':>8} {'images/s':>9}")
    print(f"{'decode':<9} {n_dec:>7} {s_dec:>8.2f} {results['decode_images_per_s']:>9.1f}")
    print(f"{'extract':<9} {n_ext:>7} {s_ext:>8.2f} {results['extract_images_per_s']:>9.1f}")
    print(f"extract / decode = {results['ratio']:.2f}  (1.00: input-bound, the model keeps up with decoding)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if rep["failed"] or rep["non_finite"]:
        print(f"error: {rep['failed']} images failed, of which {rep['non_finite']} gave a non-finite embedding "
              f"(see the store's failures): these figures are not a valid run", file=sys.stderr)
        sys.exit(1)


def compare_layers(args) -> None:
    """Median extract seconds without and with --layers, alternating, on one folder and model."""
    import statistics

    with tempfile.TemporaryDirectory(prefix="dfclip-bench-") as tmp:
        model = args.model
        if args.deep:
            cfg = json.loads((MODEL_CONFIG_DIR / "dfclip-tiny.json").read_text())
            cfg["vision_cfg"]["layers"] = args.deep
            model = str(Path(tmp) / f"dfclip-tiny-{args.deep}.json")
            Path(model).write_text(json.dumps(cfg))
        root = args.images or Path(tmp) / "images"
        if args.images is None:
            make_images(root, args.n_images, args.size)
        times: dict[str, list[float]] = {"none": [], args.compare_layers: []}
        for r in range(args.rounds):
            for spec in times:
                config = EmbedConfig(model=model, pretrained=args.pretrained, device=args.device,
                                     batch_size=args.batch_size, workers=args.workers,
                                     layers="" if spec == "none" else spec)
                t = time.perf_counter()
                extract(root, Path(tmp) / f"store-{r}-{spec}", config, progress=False)
                times[spec].append(time.perf_counter() - t)
    # On a shared machine the minimum is the best estimate of what the work itself costs.
    print(f"model {model if not args.deep else f'dfclip-tiny with {args.deep} blocks'}, {args.n_images} images, "
          f"{args.rounds} rounds (seconds of the whole extract job: min / median)")
    for label, v in (("without layers", times["none"]), (f"--layers {args.compare_layers}", times[args.compare_layers])):
        print(f"  {label:<20} {min(v):6.2f} / {statistics.median(v):6.2f}")
    for stat in (min, statistics.median):
        ratio = stat(times[args.compare_layers]) / stat(times["none"])
        print(f"  overhead ({stat.__name__}) {100 * (ratio - 1):+.1f}%")


def compare_videos(args) -> None:
    """Video extraction, frames/s, three passes side by side over the same generated face videos:
    decode (the workers' PyAV decoding alone), frames (decode + embed whole frames, --faces none) and
    faces (decode + detect + align + embed, --faces largest). The faces/frames time ratio is what
    the face stage adds to a frame's extraction."""
    from dfclip.embed.demo import write_demo_videos
    from dfclip.embed.frames import MediaFiles

    rank = rank_from_env()
    device = resolve_device(args.device, rank)
    precision = resolve_precision(args.precision, device)
    workers = default_workers(rank) if args.workers is None else args.workers
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"])
    per_source = max(1, args.videos // 5)  # the demo writes 5 sources
    with tempfile.TemporaryDirectory(prefix="dfclip-bench-") as tmp:
        root = write_demo_videos(Path(tmp) / "videos", n_per_source=per_source, frames=args.frames, size=args.size,
                                 face_image=args.face_image)
        (root / "manifest.csv").unlink()
        paths = scan_folder(root)["path"].to_list()
        loader = torch.utils.data.DataLoader(MediaFiles(root, paths, frames=None, stride=None, host=None),
                                             batch_size=None, num_workers=min(workers, len(paths)))
        t = time.perf_counter()
        n_frames = sum(len(chunk.positions) for chunk in loader)
        decode_s = time.perf_counter() - t
        rates = {"decode": n_frames / decode_s}
        results = {"device": str(device), "model": args.model, "precision": precision, "videos": len(paths),
                   "frames": n_frames, "frame_size": args.size, "workers": workers}
        for name, faces in (("frames", "none"), ("faces", "largest")):
            config = EmbedConfig(model=args.model, pretrained=args.pretrained, device=str(device), precision=precision,
                                 batch_size=batch_size, workers=workers, frames=None, faces=faces)
            t = time.perf_counter()
            rep = extract(root, Path(tmp) / f"store-{name}", config, progress=False)
            seconds = time.perf_counter() - t
            if rep["failed"] or rep["non_finite"]:
                raise SystemExit(f"{name}: {rep['failed']} failed and {rep['non_finite']} non-finite rows")
            rates[name] = rep["frames"] / seconds
            results[f"{name}_s"] = round(seconds, 2)
    results.update({f"{k}_frames_per_s": round(v, 1) for k, v in rates.items()})
    results["face_stage_added"] = round(rates["frames"] / rates["faces"] - 1, 3)
    print(f"{len(paths)} videos, {n_frames} frames of {args.size}x{args.size}, model {args.model} on {device} "
          f"({precision}), {workers} workers")
    for name in ("decode", "frames", "faces"):
        print(f"  {name:7s} {rates[name]:8.1f} frames/s")
    print(f"  the face stage adds {100 * results['face_stage_added']:.0f}% to a frame's extraction time "
          "(a GPU with ViT-L/14 is the case the 30% target is about)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
