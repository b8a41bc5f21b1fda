"""Epoch time of the paper's configuration: heads.train on resident tensors vs the reference-style baseline.

    python bench/fit.py                                  # 50k x 768 float16, CPU or the GPU
    python bench/fit.py --rows 1000000 --device cuda --baseline-rows 50000 --rounds 1 --json fit.json

Both sides train the same rows (the store's seeded 80/20 split) with the paper's configuration:
MLP head (3 x 768), CVaR alpha 0.3 + AUC gamma 0.5, feature noise, batch 256, AdamW. Ours runs in
both precisions of --precision (fp32 and bf16 hidden matmuls; `auto` is the one this machine
picks), each with and without SAM. An epoch is
one training pass plus one validation pass, as each tool runs it. Ours: heads.train.train, the
code path of `dfhead fit`, on data loaded once, timed at its per-epoch log line (so its first
epoch includes building the head). The baseline: bench/reference.py, its training pass also
timed by part. Data loading and startup are
EXCLUDED for both and reported apart: ours loads the store into one tensor once; the baseline
opens its HDF5 file and label table once (its per-row reads happen inside every epoch, by design).
A short warm-up of each runs first; then --rounds rounds interleave one epoch of ours, of ours
with SAM and of the baseline, and the best epoch of each is reported (shared machines are noisy).
--baseline-rows measures the baseline on a subset and extrapolates per row; the table says so.

Also printed, all from this one run: the achieved GFLOP/s of each epoch's matmuls (counted
analytically, bench/common.py, checked against torch's FlopCounterMode in tests: forward +
backward, less the input gradient of the first matmul, x2 with SAM, the noise-doubled batch, plus
the validation forward) next to the matmul peak measured now in the same dtype; the ops issued per
training step and by the optimizer + SAM (torch.profiler); and the val AUC of fp32 vs bf16 fits
of --auc-seeds seeds (--auc-epochs epochs each, the paper config with SAM) on the same data.

--json is written as soon as the timed round is done (the epoch times and the speed-up), and again
with the peaks, op counts and AUC comparison once they exist: a run stopped during the AUC
comparison still leaves its main figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import reference
from common import (PEAK_SHAPES, clock, describe, epoch_matmul_flops, machine_info, matmul_peak_gflops, ops_per_step, print_table,
                    resolve_device, setup_threads, write_json)

from dfclip import heads
import dfclip.heads.train  # noqa: F401
from dfclip import store
from dfclip.heads.config import make_config
from dfclip.heads.data import load_data, split_rows
from dfclip.heads.precision import resolve_precision
from dfclip.store.synthetic import make_synthetic_store

TARGETS = {"cpu": 3.0, "cuda": 100.0}  # speed-up over the baseline: >= 3x on a 2-core CPU (stretch 5x)
SAM_TARGET = 2.2


def time_ours(data, cfg, device) -> list[float]:
    """Seconds of each epoch of heads.train.train (the code path of `dfhead fit`, with its settings),
    cut at the per-epoch log line, which follows a host sync; the final reports are not included."""
    marks = [clock(device)]

    def log(line: str) -> None:
        if line.startswith("epoch"):
            marks.append(clock(device))

    heads.train.train(data, [cfg], log=log)  # the loaded data: loading is timed apart
    return [b - a for a, b in zip(marks, marks[1:])]


def auc_by_precision(data, cfg, seeds: int) -> dict:
    """Val AUC of `seeds` fits (seeds 0..) of cfg in fp32 and in bf16 on the same data."""
    out = {}
    for precision in ("fp32", "bf16"):
        results, _ = heads.train.train(data, [dataclasses.replace(cfg, precision=precision, seed=s) for s in range(seeds)],
                                       log=lambda line: None)
        out[precision] = [r.reports["val"]["auc"] for r in results]
    return out


def warm_up_ours(data, cfg, device) -> None:
    """One short epoch on a slice: allocator, kernels and BLAS handles ready before timing."""
    n = min(data.y.numel(), 8 * cfg.batch_size)
    time_ours(dataclasses.replace(data, x=data.x[:n], y=data.y[:n]), dataclasses.replace(cfg, epochs=1), device)


def export_for_baseline(store_dir: Path, cfg, folder: Path, max_train: int | None):
    """The same train / val rows as load_data, written in the reference's layout (contiguous HDF5 + CSV)."""
    s = store.open(store_dir)
    parts = split_rows(s.meta, val_frac=cfg.val_frac, seed=cfg.split_seed, holdout_sources=cfg.holdout_sources)
    x, meta = s.load(s.meta)
    y = meta["label"].to_numpy().astype(np.int64)
    tr, va = parts["train"], parts["val"]
    full = (len(tr), len(va))
    if max_train is not None and max_train < len(tr):
        # A subset keeps the split's train:val proportion, so the extrapolation scales both passes alike.
        va = va[: max(reference.VAL_BATCH, round(len(va) * max_train / len(tr)))]
        tr = tr[:max_train]
    train_files = reference.write_reference_files(x[tr], y[tr], folder, "train")
    val_files = reference.write_reference_files(x[va], y[va], folder, "val")
    return train_files, val_files, full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=1, help="epochs of ours per round (the best epoch is reported)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of ours, ours + SAM, baseline epoch")
    p.add_argument("--baseline-rows", type=int, default=None,
                   help="time the baseline on this many train rows and extrapolate per row (labelled)")
    p.add_argument("--sam-rho", type=float, default=0.05)
    p.add_argument("--auc-seeds", type=int, default=3, help="seeds of the fp32 vs bf16 val AUC comparison (0: skip)")
    p.add_argument("--auc-epochs", type=int, default=3, help="epochs of each fit of that comparison")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                   help="--cuda-graphs of every fit (a GPU only)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); on a busy shared machine 1 is steadier")
    p.add_argument("--store", type=Path, default=None,
                   help="use this store (a synthetic one of --rows x --dim is written there if it does not exist)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()

    setup_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    cfg = make_config("paper", sam_rho=0.0, epochs=args.epochs, cuda_graphs=args.cuda_graphs)
    auto = resolve_precision("auto", device)
    # (label, config): each precision without and with SAM
    variants = [(f"{p}{' (auto)' if p == auto else ''}{'' if rho == 0 else f' + SAM rho={rho}'}",
                 dataclasses.replace(cfg, precision=p, sam_rho=rho))
                for rho in (0.0, args.sam_rho) for p in ("fp32", "bf16")]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        store_dir = args.store or tmp / "embeddings"
        if not store_dir.exists():
            t = time.perf_counter()
            make_synthetic_store(store_dir, n=args.rows, dim=args.dim, signal=3.0)
            print(f"synthetic store {args.rows} x {args.dim} float16 written in {time.perf_counter() - t:.1f}s")

        t = clock(device)
        data = load_data(store_dir, cfg, device=device)
        load_s = clock(device) - t
        n_train, n_val, dim = data.counts["train"], data.counts["val"], data.dim
        print(f"{n_train} train / {n_val} val rows of {store_dir} loaded onto {device} in {load_s:.2f}s")

        t = time.perf_counter()
        train_files, val_files, (full_train, full_val) = export_for_baseline(store_dir, cfg, tmp, args.baseline_rows)
        export_s = time.perf_counter() - t
        t = clock(device)
        base = reference.ReferenceTrainer(train_files, val_files, device, dim=dim, alpha=cfg.cvar_alpha,
                                          gamma=cfg.auc_gamma, lr=cfg.lr, weight_decay=cfg.weight_decay)
        base_setup_s = clock(device) - t

        for _, c in variants:
            warm_up_ours(data, c, device)
        base.train_pass(max_steps=2)
        # Rounds interleave ours (each variant) and the baseline, so a busy spell on a shared machine hits all alike.
        ours: dict[str, list[float]] = {label: [] for label, _ in variants}
        epochs = []
        for r in range(args.rounds):
            for label, c in variants:
                ours[label] += time_ours(data, c, device)
            epochs.append(base.epoch())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in ours.items())
                  + f", baseline {epochs[-1].epoch_s:.2f}s (train {epochs[-1].train_s:.2f}s over "
                  f"{epochs[-1].train_rows} rows, val {epochs[-1].val_s:.2f}s over {epochs[-1].val_rows} rows)")
        result = summarize(args, device, info, cfg, variants, ours, epochs, (n_train, n_val, dim),
                           (full_train, full_val), (load_s, base_setup_s, export_s), auto)
        write_json(args.json, result)  # the main figures, before anything that could run out of time
        print(f"fit: speed-up {result['speedup']:.2f}x, epoch {result['ours_epoch_s']:.2f}s (SAM "
              f"{result['ours_sam_epoch_s']:.2f}s) vs baseline {result['baseline_epoch_s']:.2f}s")
        peaks = {p: matmul_peak_gflops(device, p) for p in ("fp32", "bf16")}
        ops = {label: ops_per_step(data, c) for label, c in variants if c.precision == auto}
        result.update(matmul_peak_gflops=peaks, ops_per_step=ops)
        for (label, c), row in zip(variants, result["rows"][1:]):
            row.update(peak=peaks[c.precision], of_peak=row["gflops"] / peaks[c.precision])
        write_json(args.json, result)
        auc_cfg = dataclasses.replace(make_config("paper", cuda_graphs=args.cuda_graphs), epochs=args.auc_epochs)
        aucs = auc_by_precision(data, auc_cfg, args.auc_seeds) if args.auc_seeds else {}
        result.update(val_auc_by_precision=aucs, auc_epochs=args.auc_epochs)
        write_json(args.json, result)
    report(args, result, cfg, info, device)


def summarize(args, device, info, cfg, variants, ours, epochs, sizes, full, setup, auto) -> dict:
    """The JSON of the timed round: both sides' best epochs, the speed-up, the table rows.

    sizes: (train rows, val rows, dim) of ours; full: the baseline's full (train, val) rows (its
    measured subset is extrapolated to them); setup: (our load, baseline setup, export) seconds."""
    (n_train, n_val, dim), (full_train, full_val), (load_s, base_setup_s, export_s) = sizes, full, setup
    # Best of the measured epochs on each side (the least disturbed by other load); medians go to the JSON.
    best = min(epochs, key=lambda e: e.epoch_s)
    # Extrapolation (only with --baseline-rows): each pass scaled by its own row ratio.
    scale_train, scale_val = full_train / best.train_rows, full_val / best.val_rows
    extrapolated = scale_train != 1 or scale_val != 1
    b_train, b_val = best.train_s * scale_train, best.val_s * scale_val
    b_epoch = b_train + b_val
    parts = {k: v * scale_train for k, v in best.parts.items()}
    best_ours = {label: min(v) for label, v in ours.items()}
    label_of = {(c.precision, c.sam_rho > 0): label for label, c in variants}
    o, o_sam = best_ours[label_of[auto, False]], best_ours[label_of[auto, True]]  # the headline: auto precision
    how = (f"extrapolated per row from {best.train_rows} train + {best.val_rows} val rows" if extrapolated
           else "measured")
    n = args.rounds * args.epochs
    rows = [{"what": "reference-style baseline (fp32)", "epoch": b_epoch, "train": b_train, "val": b_val,
             "how": f"{how}, best of {len(epochs)}", "speedup": 1.0}]
    for label, c in variants:
        flops = epoch_matmul_flops(c, dim, n_train, n_val)
        e = best_ours[label]
        rows.append({"what": f"ours {label}", "epoch": e, "how": f"measured, best of {n}", "speedup": b_epoch / e,
                     "gflops": flops / e / 1e9})
    return {
        "bench": "fit", "machine": info, "store": str(args.store) if args.store else "synthetic (temporary)",
        "dim": dim, "train_rows": n_train, "val_rows": n_val, "config": cfg.to_dict(),
        "epoch_includes": "training pass + validation pass; data loading excluded",
        "timing": "best of the measured epochs per side; rounds interleave ours, ours + SAM and the baseline",
        "baseline": {"epoch_s": b_epoch, "train_s": b_train, "val_s": b_val, "train_parts_s": parts,
                     "extrapolated": extrapolated, "measured_epochs": [dataclasses.asdict(e) for e in epochs],
                     "median_measured_epoch_s": statistics.median(e.epoch_s for e in epochs),
                     "setup_s": base_setup_s, "export_s": export_s},
        "ours": {label: {"epoch_s": best_ours[label], "epochs_s": v, "median_epoch_s": statistics.median(v),
                         "precision": c.precision, "sam_rho": c.sam_rho,
                         "matmul_flops": epoch_matmul_flops(c, dim, n_train, n_val)}
                 for (label, c), v in zip(variants, ours.values())},
        "load_s": load_s, "auto_precision": auto, "cuda_graphs": args.cuda_graphs, "rows": rows,
        "ours_epoch_s": o, "ours_sam_epoch_s": o_sam, "baseline_epoch_s": b_epoch,
        "baseline_extrapolated": extrapolated, "speedup": b_epoch / o, "speedup_target": TARGETS.get(device.type),
        "sam_ratio": o_sam / o, "sam_target": SAM_TARGET,
    }


def report(args, r: dict, cfg, info: dict, device) -> None:
    """The printed table and lines, from the JSON's figures."""
    target, b_train = r["speedup_target"], r["baseline"]["train_s"]
    print(f"\nfit: one epoch = train pass over {r['train_rows']} rows + validation on {r['val_rows']} rows; paper "
          f"config (MLP 3 x {r['dim']}, CVaR a={cfg.cvar_alpha} + AUC g={cfg.auc_gamma}, feature noise, batch "
          f"{cfg.batch_size}); data loading excluded; --cuda-graphs {args.cuda_graphs}\n{describe(info)}")
    print_table(r["rows"], [("what", "", ""), ("epoch", "epoch s", ".2f"), ("train", "train s", ".2f"),
                            ("val", "val s", ".2f"), ("speedup", "vs baseline", ".2f"),
                            ("gflops", "matmul GFLOP/s", ".0f"), ("peak", "peak GFLOP/s", ".0f"),
                            ("of_peak", "of peak", ".0%"), ("how", "", "")])
    print(f"speed-up {r['speedup']:.2f}x at --precision auto = {r['auto_precision']}"
          + (f" (target >= {target:.0f}x on {device.type})" if target else ""))
    print(f"SAM costs {r['sam_ratio']:.2f}x the epoch without it (target <= {SAM_TARGET}x)")
    peaks = r["matmul_peak_gflops"]
    print(f"matmul peak measured now, TF32 on for fp32 (best of "
          f"{' and '.join('x'.join(map(str, s)) for s in PEAK_SHAPES)}): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()))
    for label, count in r["ops_per_step"].items():
        print(f"ops per training step, {label}: {count['step']:.0f} in all, {count['optimizer_and_sam']:.0f} by the "
              f"optimizer{' + SAM' if 'SAM' in label else ''} (target <= 60)")
    aucs = r["val_auc_by_precision"]
    if aucs:
        diff = [b - a for a, b in zip(aucs["fp32"], aucs["bf16"])]
        print(f"val AUC over seeds 0-{args.auc_seeds - 1} ({args.auc_epochs} epochs, paper config with SAM): "
              f"fp32 {' '.join(f'{a:.4f}' for a in aucs['fp32'])}, bf16 {' '.join(f'{a:.4f}' for a in aucs['bf16'])}; "
              f"mean bf16 - fp32 {statistics.mean(diff):+.4f} (target |diff| <= 0.003)")
    print("baseline training pass by part: " + ", ".join(f"{k} {v:.2f}s ({v / b_train:.0%})"
                                                         for k, v in r["baseline"]["train_parts_s"].items()))
    print(f"loading (not in the epochs): ours store -> {device} {r['load_s']:.2f}s; baseline open file, read label "
          f"table, build model {r['baseline']['setup_s']:.2f}s (after writing its files, "
          f"{r['baseline']['export_s']:.1f}s)")


if __name__ == "__main__":
    main()
