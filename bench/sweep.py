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
Roofline: the achieved GFLOP/s of the heads' matmuls (counted analytically, bench/common.py
epoch_matmul_flops; loading excluded) next to the matmul peak measured in the same run and dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (clock, describe, epoch_matmul_flops, machine_info, matmul_peak_gflops, print_table, resolve_device,
                    setup_threads, write_json)

from dfclip import heads  # noqa: E402
import dfclip.heads.train  # noqa: E402,F401
from dfclip import store
from dfclip.heads.config import make_config
from dfclip.heads.data import load_data
from dfclip.heads.precision import resolve_precision
from dfclip.store.synthetic import make_synthetic_store

TARGETS = {"cpu": 6.0, "cuda": 15.0}
ALPHAS, GAMMAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0), (0.0, 0.5)


def grid_configs(head: str, k: int, epochs: int) -> list:
    """K paper configs (SAM off) over alpha x gamma, then more seeds until there are K."""
    base = make_config("paper", head=head, sam_rho=0.0, epochs=epochs)
    seeds = range(-(-k // (len(ALPHAS) * len(GAMMAS))))
    combos = itertools.product(seeds, ALPHAS, GAMMAS)
    return [dataclasses.replace(base, seed=s, cvar_alpha=a, auc_gamma=g) for s, a, g in itertools.islice(combos, k)]


def timed_train(store_dir, cfgs, device) -> tuple[float, float]:
    """(total seconds, of which loading) of one load + heads.train.train call."""
    t = clock(device)
    data = load_data(store_dir, cfgs[0], device=device)
    loaded = clock(device)
    heads.train.train(data, cfgs, log=lambda line: None)
    return clock(device) - t, loaded - t


def bench_head(head: str, store_dir: Path, warm_dir: Path, args, device) -> dict:
    """Sweep and sequential fits of one head kind, --rounds times interleaved; best round of each side."""
    cfgs = grid_configs(head, args.k, args.epochs)
    timed_train(warm_dir, cfgs[:2], device)  # warm-up: kernels, BLAS handles, allocator
    timed_train(warm_dir, cfgs[:1], device)
    n_seq = args.k if args.sequential_fits is None else min(args.sequential_fits, args.k)
    picks = np.unique(np.linspace(0, args.k - 1, n_seq).round().astype(int)) if n_seq else []
    scale = args.k / len(picks) if n_seq else 0.0  # 1 unless --sequential-fits < K
    sweeps, seqs = [], []  # per round: (total s, loading s)
    for r in range(args.rounds):
        sweeps.append(timed_train(store_dir, cfgs, device))
        print(f"{head} round {r + 1}: sweep of {args.k} in {sweeps[-1][0]:.2f}s (loading {sweeps[-1][1]:.2f}s)")
        if n_seq:
            fits = [timed_train(store_dir, [cfgs[i]], device) for i in picks]
            seqs.append((scale * sum(s for s, _ in fits), scale * sum(l for _, l in fits)))
            print(f"{head} round {r + 1}: {len(picks)} fits in {sum(s for s, _ in fits):.2f}s "
                  f"(loading {sum(l for _, l in fits):.2f}s)")
    sweep_s, sweep_load = min(sweeps)
    data = load_data(store_dir, cfgs[0], device=device)  # its row counts, for the FLOPs
    flops = sum(epoch_matmul_flops(c, data.dim, data.counts["train"], data.counts["val"]) * c.epochs for c in cfgs)
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
    p.add_argument("--epochs", type=int, default=1)
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
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()

    setup_threads(args.threads)
    device = resolve_device(args.device)
    info = machine_info(device)
    kinds = [h.strip() for h in args.heads.split(",") if h.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = args.store or Path(tmp) / "embeddings"
        t = time.perf_counter()
        if not store_dir.exists():
            make_synthetic_store(store_dir, n=args.rows, dim=args.dim, signal=3.0)
            print(f"synthetic store {args.rows} x {args.dim} float16 written in {time.perf_counter() - t:.1f}s")
        opened = store.open(store_dir)
        n_rows, dim = len(opened), opened.dim
        warm_dir = make_synthetic_store(Path(tmp) / "warm", n=2048, dim=dim, signal=3.0)
        results = [bench_head(h, store_dir, warm_dir, args, device) for h in kinds]
    precision = resolve_precision("auto", device)  # what the configs' --precision auto runs at here
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
    write_json(args.json, {"bench": "sweep", "machine": info, "n_rows": n_rows, "dim": dim, "rounds": args.rounds,
                           "precision": precision, "matmul_peak_gflops": peak,
                           "epochs": args.epochs, "k": args.k, "target": target, "results": results})


if __name__ == "__main__":
    main()
