"""The notebook-level API behind `dfhead`: fit, sweep, evaluate, predict, list runs.

    from dfclip.heads.run import fit, sweep, grid
    from dfclip.heads.config import make_config
    run_dir = fit("embeddings", make_config("paper", cvar_alpha=0.3))
    board = sweep("embeddings", grid(make_config(), cvar_alpha=[0.1, 0.3, 1.0], seeds=3))

`fit` is a sweep of one configuration: both go through heads.train.train.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import torch

from dfclip import store
from dfclip.heads import metrics
from dfclip.heads.config import RunConfig, validate
from dfclip.heads.report import (default_run_name, leaderboard, load_run, plot_heatmap, result_row, safe_name, save_run,
                          selection_order, varying_columns)
from dfclip.heads.models import HEAD_KINDS, head_options
from dfclip.heads.precision import resolve_precision
from dfclip.heads.train import EVAL_CHUNK, predict_logits, train
from dfclip.runtime import rank_from_env, resolve_device
from dfclip.errors import UserError


def fit(store_dir: str | os.PathLike, config: RunConfig, *, val_store=None, runs_dir: str | os.PathLike = "runs",
        name: str | None = None, device: str = "auto", log: Callable[[str], None] = print,
        progress: bool = False) -> Path:
    """Train one head and write its run directory; returns the directory."""
    results, data = train(store_dir, [validate(config)], val_store=val_store, device=device, log=log,
                          progress=progress)
    run_dir = Path(runs_dir) / safe_name(name or default_run_name(config))
    if name is None:  # the default name omits most settings: never let it replace an earlier run
        base, n = run_dir, 2
        while run_dir.exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    save_run(results[0], run_dir, provenance=data.provenance, counts=data.counts)
    return run_dir


def grid(base: RunConfig, *, seeds: int = 1, **options) -> list[RunConfig]:
    """The cartesian product of option lists over `base`, times `seeds` consecutive seeds from base.seed."""
    for k in options:
        if k not in {f.name for f in dataclasses.fields(RunConfig)}:
            raise UserError(f"unknown sweep option {k!r}")
    lists = {k: (v if isinstance(v, (list, tuple)) and k != "holdout_sources" else [v]) for k, v in options.items()}
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    out = []
    for combo in itertools.product(*lists.values()):
        cfg = dataclasses.replace(base, **dict(zip(lists, combo)))
        for s in range(seeds):
            out.append(validate(dataclasses.replace(cfg, seed=cfg.seed + s)))
    return out


def sweep_memory_bytes(n_rows: int, dim: int, cfgs: list[RunConfig], itemsize: int = 4) -> int:
    """A conservative estimate of the device memory a sweep needs, in bytes.

    The embeddings once (n_rows x dim of `itemsize` bytes: 4 for float32 on a CPU, the store's
    dtype on a GPU), then per model, all as float32 (each kind's sizes: heads.models.HEAD_KINDS):
    - weights, grads, 2 AdamW moments, the best copy and SAM's saved copy: 6 x params;
    - a training step: about 8 floats per activation of a batch (outputs, masks, grads),
      the batch's float32 copy and the [B, B] AUC pair matrices; B doubled by feature noise;
    - validation: an eval chunk (min(EVAL_CHUNK, n_rows) rows) holds up to 5 of the widest
      layer's outputs at once (the shared-input matmul, its per-head copy, BatchNorm's temporaries),
      with the chunk's float32 copy.
    Training and validation are counted together, though they alternate, to stay on the safe side.
    """
    chunk = min(EVAL_CHUNK, n_rows)
    total = n_rows * dim * itemsize
    for c in cfgs:
        kind, opts = HEAD_KINDS[c.head], head_options(c)
        b = c.batch_size * (2 if c.feature_noise else 1)
        train_act = 8 * b * kind.activations(dim, **opts) + b * dim + 4 * b * b
        eval_act = 5 * chunk * kind.width(dim, **opts) + chunk * dim
        total += 4 * (6 * kind.params(dim, **opts) + train_act + eval_act)
    return total


def free_memory_bytes(device: torch.device) -> int:
    """Memory a sweep may still use on `device`: free GPU memory, or the OS's MemAvailable on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # MemAvailable counts reclaimable page cache; MemFree alone would refuse sweeps that fit
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(stores: list[store.Store], cfgs: list[RunConfig], device: torch.device) -> None:
    # load_data keeps the store's dtype on a GPU and converts to float32 on the CPU (data._to_device).
    itemsize = 4 if device.type == "cpu" else np.dtype(stores[0].provenance.get("dtype", "float32")).itemsize
    need = sweep_memory_bytes(sum(len(s) for s in stores), stores[0].dim, cfgs, itemsize=itemsize)
    free = free_memory_bytes(device)
    if need > 0.9 * free:
        raise UserError(f"this sweep needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free on "
                        f"{device}; split the grid into smaller sweeps (fewer values per option or --seeds)")


BARRIER_TIMEOUT = datetime.timedelta(days=2)


def sweep(store_dir: str | os.PathLike, cfgs: list[RunConfig], *, val_store=None,
          runs_dir: str | os.PathLike = "runs", name: str = "sweep", device: str = "auto",
          log: Callable[[str], None] = print, progress: bool = False) -> tuple[Path, pl.DataFrame]:
    """Train every config at once; write the leaderboard, a heatmap and the best run directory.

    Under torchrun each rank trains a disjoint slice of the grid (configs rank, rank+world, ...)
    and writes its rows; rank 0 waits for all ranks, merges the leaderboard and keeps the best.
    """
    me = rank_from_env()
    rank, world = me.rank, me.world
    out = Path(runs_dir) / safe_name(name)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    # Rows of an earlier sweep of this name (maybe with more ranks) must not leak into this leaderboard.
    (parts / f"rows-r{rank:03d}.parquet").unlink(missing_ok=True)
    mine = cfgs[rank::world]
    select = cfgs[0].select if len({c.select for c in cfgs}) == 1 else "auc"  # ranks runs and picks best/
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        # Ranks finish their slices at different times; gloo's default 30-minute timeout would
        # kill the early ones at the barrier and lose the merge, so wait as long as a sweep can take.
        torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    if mine:
        dev = resolve_device(device)
        s = store.open(store_dir)
        vs = store.open(val_store) if val_store is not None else None
        _check_memory([s] + ([vs] if vs is not None else []), mine, dev)
        t0 = time.perf_counter()
        results, data = train(s, mine, val_store=vs, device=device, log=log, progress=progress)
        log(f"rank {rank}: trained {len(mine)} heads in {time.perf_counter() - t0:.1f}s")
        rows = pl.DataFrame([result_row(r) | {"rank": rank, "index": i} for i, r in enumerate(results)])
        col, desc = selection_order(select)
        best_i = int(rows.with_row_index("i").sort(col, descending=desc, nulls_last=True)["i"][0])
        save_run(results[best_i], parts / f"best-r{rank:03d}", provenance=data.provenance, counts=data.counts)
        tmp = parts / f".rows-r{rank:03d}.parquet.tmp"
        rows.write_parquet(tmp)
        os.replace(tmp, parts / f"rows-r{rank:03d}.parquet")
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return out, pl.DataFrame()
    files = [p for r in range(world) if (p := parts / f"rows-r{r:03d}.parquet").is_file()]
    rows = pl.concat([pl.read_parquet(p) for p in files], how="diagonal_relaxed")
    runs, summary = leaderboard(rows, select)
    runs.write_parquet(out / "runs.parquet")
    summary.write_parquet(out / "leaderboard.parquet")
    plot_heatmap(summary, out / "heatmap_alpha_gamma.png")
    best = runs.row(0, named=True)
    best_dir = out / "best"
    if best_dir.exists():
        shutil.rmtree(best_dir)
    shutil.copytree(parts / f"best-r{best['rank']:03d}", best_dir)
    (out / "sweep.json").write_text(json.dumps({"configs": len(cfgs), "world_size": world, "best": best,
                                                "varying": varying_columns(rows)}, indent=2, default=str))
    return out, summary


def evaluate_run(run_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None, *,
                 device: str = "auto", precision: str = "auto") -> dict:
    """Metrics of a trained run on a store (default: its validation numbers from report.json).

    precision: of the head's hidden matmuls on the store (heads.precision: auto, fp32 or bf16).
    """
    run_dir = Path(run_dir)
    if store_dir is None:
        if not (run_dir / "report.json").is_file():
            raise UserError(f"{run_dir} is not a dfclip run directory (no report.json); pass a directory written "
                            "by `dfhead fit` or `dfhead sweep`")
        return json.loads((run_dir / "report.json").read_text())
    dev = resolve_device(device)
    head, config = load_run(run_dir, dev)
    s = store.open(store_dir)
    _check_same_model(config, s)
    rows = s.select(label=[0, 1])
    if rows.height == 0:
        raise UserError(f"store {store_dir} has no labelled rows to evaluate on; use `dfhead predict` for unlabelled data")
    x, rows = s.load(rows)
    scores = torch.sigmoid(_logits(head, config, x, dev, precision))
    y = torch.from_numpy(rows["label"].to_numpy().astype(np.int64)).to(dev)
    groups = rows["group"].to_list() if (rows["group"] != "").any() else None
    return metrics.evaluate(scores, y, sources=rows["source"].to_list(), groups=groups, threshold=config["threshold"])[0]


def _check_same_model(config: dict, s: store.Store) -> None:
    store.format.require_compatible(s.provenance, config["provenance"], what=f"store {s.root}",
                                    fix="the run was trained on the latter: embed with the run's model")


def _logits(head, config: dict, x: np.ndarray, device: torch.device, precision: str) -> torch.Tensor:
    """The run's logits [K, N] on embeddings x, its l2 normalisation applied, matmuls in `precision`."""
    return predict_logits(head, torch.from_numpy(x).to(device), l2_normalize=config["run"]["l2_normalize"],
                          precision=resolve_precision(precision, device))


def predict_store(run_dir: str | os.PathLike, store_dir: str | os.PathLike, *, device: str = "auto",
                  precision: str = "auto") -> pl.DataFrame:
    """path, score (probability of fake) and predicted label (1 fake, 0 real) for every row of a store.

    precision: of the head's hidden matmuls (heads.precision: auto, fp32 or bf16).
    """
    dev = resolve_device(device)
    head, config = load_run(run_dir, dev)
    s = store.open(store_dir)
    _check_same_model(config, s)
    x, rows = s.load()
    scores = torch.sigmoid(_logits(head, config, x, dev, precision))[0]
    scores = scores.cpu().numpy()
    return pl.DataFrame({"path": rows["path"], "score": scores,
                         "pred": (scores >= config["threshold"]).astype(np.int8), "label": rows["label"]}).sort("path")


def list_runs(runs_dir: str | os.PathLike = "runs") -> pl.DataFrame:
    """One row per run directory under runs_dir (sweeps' best runs included), newest first."""
    rows = []
    for cfg_path in sorted(Path(runs_dir).glob("**/config.json")):
        if "parts" in cfg_path.parts:
            continue
        run = cfg_path.parent
        c = json.loads(cfg_path.read_text())
        rep = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
        r = c["run"]
        rows.append({"run": str(run.relative_to(runs_dir)), "head": r["head"], "alpha": r["cvar_alpha"],
                     "gamma": r["auc_gamma"], "rho": r["sam_rho"], "lr": r["lr"], "epochs": r["epochs"],
                     "seed": r["seed"], "val_auc": (rep.get("val") or {}).get("auc"),
                     "val_eer": (rep.get("val") or {}).get("eer"),
                     "holdout_auc": (rep.get("holdout") or {}).get("auc"),
                     "modified": cfg_path.stat().st_mtime})
    if not rows:
        raise UserError(f"no runs under {runs_dir}; train one with `dfhead fit`")
    return pl.DataFrame(rows).sort("modified", descending=True).drop("modified")
