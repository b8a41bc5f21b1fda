"""A K-config sweep in one heads.train.train call vs K sequential single-config calls, same epochs.

    python bench/sweep.py                                    # CPU-sized defaults, linear and MLP heads
    python bench/sweep.py --device cuda --rows 1000000 --epochs 2 --sequential-fits 3 --json sweep.json

The K configs are the paper's configuration (CVaR + AUC, feature noise, batch 256, no SAM) over
a grid alpha in {0.1, 0.3, 0.5, 0.7, 0.9, 1} x gamma in {0, 0.5} x seeds. The sweep is ONE call
heads.train.train(store, configs): one load, one batched head of K models. The baseline is K calls
heads.train.train(store, [config]), i.e. what `dfhead fit` does K times (minus process start-up and
writing run folders). Every call loads the store itself (heads.data.load_data, timed apart, then
heads.train.train on the loaded Data), so the figures are given twice: as called (loading
included on both sides) and resident (each call's loading time taken out on both sides).
--sequential-fits N times N of the K sequential calls (evenly spread over the grid) and
extrapolates to K; the table says so. --sequential-fits 0 times the sweep alone. A warm-up on a
small store runs first; --rounds R repeats sweep and fits R times and keeps each side's best.

    python bench/sweep.py --halving                          # successive halving, K=24 MLP, 10 epochs

--halving measures `dfhead sweep --halving` (heads.train.train(..., halving=Halving(eta, min_epochs)))
instead: K=24 MLP configs, alpha {0.1, 0.3, 0.5, 1} x gamma {0, 0.5} x lr {1e-4, 1e-3, 1e-2} (the lr
spread makes the configs really differ), against the same 24 configs as sequential fits (the
baseline, at the same --precision auto as the sweep) and as one full sweep (the whole grid at full length, batched).
Its table gives the times, the ratios and the best val AUC of each side: halving's best must be
within 0.005 of the full grid's best. The store is synthetic with a weak signal (--signal 1), so
the AUCs sit well below 1 and the lr matters.

Roofline: the achieved GFLOP/s of the heads' matmuls (counted analytically, bench/common.py
epoch_matmul_flops; loading excluded) next to the matmul peak measured in the same run and dtype.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (clock, describe, epoch_matmul_flops, machine_info, matmul_peak_gflops, print_table, resolve_device,
                    setup_threads, write_json)

from dfclip import heads
import dfclip.heads.train  # noqa: F401
from dfclip import store
from dfclip.heads.config import make_config
from dfclip.heads.data import load_data
from dfclip.heads.precision import resolve_precision
from dfclip.heads.run import grid
from dfclip.store.synthetic import make_synthetic_store

TARGETS = {"cpu": 6.0, "cuda": 15.0}
ALPHAS, GAMMAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0), (0.0, 0.5)


def grid_configs(head: str, k: int, epochs: int, cuda_graphs: str = "auto") -> list:
    """K paper configs (SAM off) over alpha x gamma, then more seeds until there are K."""
    base = make_config("paper", head=head, sam_rho=0.0, epochs=epochs, cuda_graphs=cuda_graphs)
    seeds = range(-(-k // (len(ALPHAS) * len(GAMMAS))))
    combos = itertools.product(seeds, ALPHAS, GAMMAS)
    return [dataclasses.replace(base, seed=s, cvar_alpha=a, auc_gamma=g) for s, a, g in itertools.islice(combos, k)]


HALVING_ALPHAS, HALVING_GAMMAS, HALVING_LRS = (0.1, 0.3, 0.5, 1.0), (0.0, 0.5), (1e-4, 1e-3, 1e-2)


def halving_configs(epochs: int) -> list:
    """The 24 MLP configs of the halving comparison: the paper config (SAM off), lr x alpha x gamma, one seed."""
    base = make_config("paper", head="mlp", sam_rho=0.0, epochs=epochs)
    return grid(base, lr=list(HALVING_LRS), cvar_alpha=list(HALVING_ALPHAS), auc_gamma=list(HALVING_GAMMAS))


def bench_halving(store_dir: Path, warm_dir: Path, args, device) -> dict:
    """Halving sweep vs the full sweep vs K sequential fits of the same grid; times and best val AUCs."""
    from dfclip.heads.train import Halving

    cfgs = halving_configs(args.epochs)
    plan = Halving(args.eta, args.min_epochs)
    quiet = {"log": lambda line: None}
    warm = halving_configs(1)[:2]
    heads.train.train(load_data(warm_dir, warm[0], device=device), warm, **quiet)  # warm-up
    data = load_data(store_dir, cfgs[0], device=device)  # resident on every side: training alone is timed

    def timed(fn):
        t = clock(device)
        out = fn()
        return clock(device) - t, out

    best_auc = lambda results: max(r.reports["val"]["auc"] for r in results)
    halving_s, halved = timed(lambda: heads.train.train(data, cfgs, halving=plan, **quiet)[0])
    stops = [int(r.history["epoch"].max()) for r in halved]
    print(f"halving: {halving_s:.2f}s, configs per stop epoch {dict(sorted(collections.Counter(stops).items()))}")
    full_s, full = timed(lambda: heads.train.train(data, cfgs, **quiet)[0])
    print(f"full sweep: {full_s:.2f}s")
    n_seq = len(cfgs) if args.sequential_fits is None else min(args.sequential_fits, len(cfgs))
    picks = np.unique(np.linspace(0, len(cfgs) - 1, n_seq).round().astype(int)) if n_seq else []
    fits_s, fits = timed(lambda: [heads.train.train(data, [cfgs[i]], **quiet)[0][0] for i in picks])
    seq_s = fits_s * len(cfgs) / len(picks) if n_seq else None
    print(f"{len(picks)} sequential fits: {fits_s:.2f}s")
    # Each config's full-length val AUC: from the fits where measured (all K by default), else the full sweep.
    grid_auc = {i: r.reports["val"]["auc"] for i, r in enumerate(full)} | \
               {int(i): r.reports["val"]["auc"] for i, r in zip(picks, fits)}
    winner = halved[int(np.argmax([r.reports["val"]["auc"] if s == args.epochs else -1 for r, s in zip(halved, stops)]))]
    return {"k": len(cfgs), "epochs": args.epochs, "eta": args.eta, "min_epochs": args.min_epochs,
            "rungs": plan.rungs(args.epochs), "stop_epochs": stops, "epochs_trained": sum(stops),
            "halving_s": halving_s, "full_sweep_s": full_s, "sequential_s": seq_s,
            "sequential_measured": len(picks), "ratio_vs_fits": seq_s / halving_s if seq_s else None,
            "ratio_vs_full_sweep": full_s / halving_s,
            "halving_best_val_auc": winner.reports["val"]["auc"], "halving_best_config": {
                "cvar_alpha": winner.config.cvar_alpha, "auc_gamma": winner.config.auc_gamma, "lr": winner.config.lr},
            "grid_best_val_auc": max(grid_auc.values()), "grid_worst_val_auc": min(grid_auc.values()),
            "full_sweep_best_val_auc": best_auc(full)}


def print_halving(r: dict, info: dict, n_rows: int, dim: int) -> None:
    print(f"\nhalving: K={r['k']} MLP configs (alpha x gamma x lr, paper config without SAM), {r['epochs']} epochs "
          f"on {n_rows} x {dim} rows (80% train), eta {r['eta']}, rungs {r['rungs']}: "
          f"{r['epochs_trained']} config-epochs instead of {r['k'] * r['epochs']}\n{describe(info)}")
    how = "measured" if r["sequential_measured"] == r["k"] else \
        f"extrapolated from {r['sequential_measured']} of {r['k']} fits"
    print_table([
        {"side": "sweep --halving", "s": r["halving_s"], "x": 1.0, "auc": r["halving_best_val_auc"]},
        {"side": "full sweep (batched)", "s": r["full_sweep_s"], "x": r["full_sweep_s"] / r["halving_s"],
         "auc": r["full_sweep_best_val_auc"]},
        {"side": f"{r['k']} sequential fits ({how})", "s": r["sequential_s"], "x": r["ratio_vs_fits"],
         "auc": r["grid_best_val_auc"]},
    ], [("side", "side", ""), ("s", "seconds", ".2f"), ("x", "x halving's time", ".2f"), ("auc", "best val AUC", ".4f")])
    gap = r["grid_best_val_auc"] - r["halving_best_val_auc"]
    print(f"halving vs sequential fits: {r['ratio_vs_fits']:.2f}x (target >= 4); best val AUC {r['halving_best_val_auc']:.4f} "
          f"vs the grid's {r['grid_best_val_auc']:.4f}: gap {gap:.4f} (target <= 0.005); the grid's worst is "
          f"{r['grid_worst_val_auc']:.4f}; halving picked {r['halving_best_config']}")


def timed_train(store_dir, cfgs, device) -> tuple[float, float, tuple[int, int, int]]:
    """(total seconds, of which loading, (dim, train rows, val rows)) of one load + heads.train.train call."""
    t = clock(device)
    data = load_data(store_dir, cfgs[0], device=device)
    loaded = clock(device)
    heads.train.train(data, cfgs, log=lambda line: None)
    return clock(device) - t, loaded - t, (data.dim, data.counts["train"], data.counts["val"])


def bench_head(head: str, store_dir: Path, warm_dir: Path, args, device) -> dict:
    """Sweep and sequential fits of one head kind, --rounds times interleaved; best round of each side."""
    cfgs = grid_configs(head, args.k, args.epochs, args.cuda_graphs)
    timed_train(warm_dir, cfgs[:2], device)  # warm-up: kernels, BLAS handles, allocator
    timed_train(warm_dir, cfgs[:1], device)
    n_seq = args.k if args.sequential_fits is None else min(args.sequential_fits, args.k)
    picks = np.unique(np.linspace(0, args.k - 1, n_seq).round().astype(int)) if n_seq else []
    scale = args.k / len(picks) if n_seq else 0.0  # 1 unless --sequential-fits < K
    sweeps, seqs = [], []  # per round: (total s, loading s)
    for r in range(args.rounds):
        *times, (dim, n_train, n_val) = timed_train(store_dir, cfgs, device)
        sweeps.append(tuple(times))
        print(f"{head} round {r + 1}: sweep of {args.k} in {sweeps[-1][0]:.2f}s (loading {sweeps[-1][1]:.2f}s)")
        if n_seq:
            fits = [timed_train(store_dir, [cfgs[i]], device) for i in picks]
            seqs.append((scale * sum(f[0] for f in fits), scale * sum(f[1] for f in fits)))
            print(f"{head} round {r + 1}: {len(picks)} fits in {sum(f[0] for f in fits):.2f}s "
                  f"(loading {sum(f[1] for f in fits):.2f}s)")
    sweep_s, sweep_load = min(sweeps)
    flops = sum(epoch_matmul_flops(c, dim, n_train, n_val) * c.epochs for c in cfgs)
    out = {"head": head, "k": args.k, "sweep_s": sweep_s, "sweep_load_s": sweep_load, "sweep_rounds": sweeps,
           "sequential_measured": len(picks), "matmul_flops": flops,
           "sweep_gflops": flops / (sweep_s - sweep_load) / 1e9}
    if n_seq:
        seq_s, seq_load = min(seqs)
        out.update(sequential_extrapolated=scale != 1, sequential_s=seq_s, sequential_load_s=seq_load,
                   sequential_rounds=seqs, ratio_as_called=seq_s / sweep_s,
                   ratio_resident=(seq_s - seq_load) / (sweep_s - sweep_load),
                   sequential_gflops=flops / (seq_s - seq_load) / 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--epochs", type=int, default=None, help="default 1, with --halving 10")
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--rounds", type=int, default=1, help="repeat sweep + fits, report the best round of each")
    p.add_argument("--heads", default="linear,mlp", help="comma list of head kinds")
    p.add_argument("--device", default="auto")
    p.add_argument("--sequential-fits", type=int, default=None,
                   help="time this many of the K sequential fits and extrapolate to K (default: all K)")
    p.add_argument("--store", type=Path, default=None,
                   help="use this store (a synthetic one is written there if it does not exist)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); on a busy shared machine 1 is steadier")
    p.add_argument("--json", type=Path, default=None,
                   help="write the results here (after each head kind, so a run stopped later keeps the first)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                   help="--cuda-graphs of every sweep and fit (a GPU only)")
    p.add_argument("--halving", action="store_true", help="the successive-halving comparison instead (see above)")
    p.add_argument("--eta", type=int, default=3)
    p.add_argument("--min-epochs", type=int, default=1)
    p.add_argument("--signal", type=float, default=None, help="synthetic signal (default 3, with --halving 1)")
    args = p.parse_args()
    args.epochs = args.epochs or (10 if args.halving else 1)
    signal = args.signal if args.signal is not None else (1.0 if args.halving else 3.0)

    setup_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    kinds = [h.strip() for h in args.heads.split(",") if h.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = args.store or Path(tmp) / "embeddings"
        t = time.perf_counter()
        if not store_dir.exists():
            make_synthetic_store(store_dir, n=args.rows, dim=args.dim, signal=signal)
            print(f"synthetic store {args.rows} x {args.dim} float16 written in {time.perf_counter() - t:.1f}s")
        opened = store.open(store_dir)
        n_rows, dim = len(opened), opened.dim
        warm_dir = make_synthetic_store(Path(tmp) / "warm", n=2048, dim=dim, signal=3.0)
        if args.halving:
            result = bench_halving(store_dir, warm_dir, args, device)
            print_halving(result, info, n_rows, dim)
            write_json(args.json, {"bench": "sweep --halving", "machine": info, "n_rows": n_rows, "dim": dim,
                                   "signal": signal, "target": 4.0, "result": result})
            return
        precision = resolve_precision("auto", device)  # what the configs' --precision auto runs at here
        head_json = {"bench": "sweep", "machine": info, "n_rows": n_rows, "dim": dim, "rounds": args.rounds,
                     "precision": precision, "cuda_graphs": args.cuda_graphs, "epochs": args.epochs, "k": args.k,
                     "target": TARGETS.get(device.type)}
        results = []
        for h in kinds:
            results.append(bench_head(h, store_dir, warm_dir, args, device))
            write_json(args.json, {**head_json, "results": results})
    peak = matmul_peak_gflops(device, precision)

    target = TARGETS.get(device.type)
    print(f"\nsweep: K={args.k} configs (alpha x gamma x seed, paper config without SAM), {args.epochs} epoch(s) "
          f"on {n_rows} x {dim} rows (80% train), one heads.train.train call vs K calls\n{describe(info)}")
    rows = []
    for r in results:
        how = "measured" if not r.get("sequential_extrapolated") else \
            f"extrapolated from {r['sequential_measured']} of {args.k} fits"
        rows.append({"head": r["head"], "sweep": r["sweep_s"], "seq": r.get("sequential_s"),
                     "called": r.get("ratio_as_called"), "resident": r.get("ratio_resident"),
                     "sweep_load": r["sweep_load_s"], "seq_load": r.get("sequential_load_s"),
                     "sweep_gflops": r["sweep_gflops"], "seq_gflops": r.get("sequential_gflops"),
                     "how": how if "sequential_s" in r else "sweep only"})
    print_table(rows, [("head", "head", ""), ("sweep", "sweep s", ".2f"), ("seq", f"{args.k} fits s", ".2f"),
                       ("resident", "ratio, loading excluded", ".2f"), ("called", "ratio, as called", ".2f"),
                       ("sweep_load", "sweep load s", ".2f"), ("seq_load", "fits load s", ".2f"),
                       ("sweep_gflops", "sweep GFLOP/s", ".1f"), ("seq_gflops", "fits GFLOP/s", ".1f"),
                       ("how", "sequential", "")])
    print(f"matmuls in {precision} (--precision auto); {precision} matmul peak measured now: {peak:.0f} GFLOP/s "
          "(GFLOP/s: the heads' matmul FLOPs over the time without loading)")
    if target:
        print(f"target >= {target:.0f}x on {device.type}; best of {args.rounds} round(s) per side")
    write_json(args.json, {**head_json, "matmul_peak_gflops": peak, "results": results})


if __name__ == "__main__":
    main()
