"""The notebook-level API behind `dfhead`: fit, sweep, evaluate, predict, list runs.

    from dfclip.heads.run import fit, sweep, grid
    from dfclip.heads.config import make_config
    run_dir = fit("embeddings", make_config("paper", cvar_alpha=0.3))
    board = sweep("embeddings", grid(make_config(), cvar_alpha=[0.1, 0.3, 1.0], seeds=3))

`fit` is a sweep of one configuration: both go through heads.train.train.
"""

from __future__ import annotations

import contextlib
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
from dfclip.heads.calibration import Calibration, as_score_means, calibration_from_config, scores_report, threshold_rates
from dfclip.heads.config import RunConfig, validate
from dfclip.heads.data import finite_rows, missing_inputs_note, non_finite_note
from dfclip.heads.report import (TRAIN_ROWS_FILE, check_writable_dir, default_run_name, leaderboard, load_run,
                                 load_run_config, plot_heatmap, replacing_dir, result_row, safe_name, save_run,
                                 varying_columns)
from dfclip.heads.models import HEAD_KINDS, head_options
from dfclip.heads.precision import resolve_precision
from dfclip.heads.train import EVAL_CHUNK, Halving, predict_logits, train
from dfclip.runtime import rank_from_env, resolve_device, tf32_precision
from dfclip.errors import UserError


def fit(store_dir: str | os.PathLike, config: RunConfig, *, val_store=None, runs_dir: str | os.PathLike = "runs",
        name: str | None = None, device: str = "auto", log: Callable[[str], None] = print,
        progress: bool = False, with_stores: list[str | os.PathLike] = ()) -> Path:
    """Train one head and write its run directory; returns the directory.

    with_stores: stores of the same images from other backbones (`--with`), fused with store_dir by path
    (store.fused): the head trains on the concatenation of config.feature over every store, or on the
    named parts ("A:proj+B:block12"); the run records every store's provenance.

    Refused before training: a --runs-dir that cannot be written, a head too big for memory.
    A head whose loss goes NaN or infinite is an error naming the epoch (nothing is written).
    """
    config = validate(config)
    check_writable_dir(runs_dir, "--runs-dir")
    s, vs = _open_stores(store_dir, val_store, with_stores)
    _check_memory([s] + ([vs] if vs is not None else []), [config], resolve_device(device))
    results, data = train(s, [config], val_store=vs, device=device, log=log, progress=progress)
    if results[0].diverged:
        raise UserError(f"training diverged at epoch {results[0].diverged}: the loss became NaN or infinite "
                        f"({_divergence_hint(config)}); nothing was saved")
    run_dir = Path(runs_dir) / safe_name(name or default_run_name(config))
    if name is None:  # the default name omits most settings: never let it replace an earlier run
        base, n = run_dir, 2
        while run_dir.exists():
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    save_run(results[0], run_dir, provenance=data.provenance, counts=data.counts, train_paths=data.train_paths)
    _add_test_report(run_dir, s, device, log)
    return run_dir


def _add_test_report(run_dir: Path, s: store.Store, device: str, log: Callable[[str], None]) -> None:
    """Add the metrics of the store's labelled "test" rows (never trained on, nor validated on) to report.json as
    "test", so the threshold's FPR and TPR and the calibration are shown on unseen rows; nothing without such rows."""
    if s.select(label=[0, 1], split="test").height == 0:
        return
    try:
        rep = evaluate_run(run_dir, s.root, device=device, split="test", log=log)
    except UserError as e:  # e.g. every test row's embedding is NaN: the run is saved, the test report is not
        log(f"warning: no test report ({e})")
        return
    path = run_dir / "report.json"
    report = json.loads(path.read_text()) | {"test": rep}
    tmp = path.with_name(f".report.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


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


def _divergence_hint(cfg: RunConfig) -> str:
    hint = f"lower --lr (now {cfg.lr:g})"
    if cfg.sam_rho > 0:
        hint += f" or --sam-rho (now {cfg.sam_rho:g})"
    return hint


def _open_stores(store_dir, val_store, with_stores=()) -> tuple[store.Store | store.FusedStore, store.Store | None]:
    """The training store (fused with `with_stores`, if any) and the validation store."""
    s = store.fuse([store_dir, *with_stores]) if with_stores else store.open(store_dir)
    return s, (store.open(val_store) if val_store is not None else None)


def _check_memory(stores: list[store.Store], cfgs: list[RunConfig], device: torch.device) -> None:
    """UserError when training `cfgs` on these stores would not fit in `device`'s free memory.

    When even the largest head alone does not fit, the fix is a smaller head, not a smaller grid.
    """
    # load_data keeps the store's dtype on a GPU and converts to float32 on the CPU (data._to_device).
    # Fused stores are read in the widest of their dtypes (store.fused.FusedStore.load).
    members = stores[0].provenance.get(store.format.FUSION_KEY) or [{"provenance": stores[0].provenance}]
    stored = max(np.dtype(m["provenance"].get("dtype", "float32")).itemsize for m in members)
    itemsize = 4 if device.type == "cpu" else stored
    rows = sum(len(s) for s in stores)
    # One feature's rows are resident at a time: the widest one counts (the heads of every feature, to be safe).
    dim = max(stores[0].feature_dim(c.feature) for c in cfgs)
    need = sweep_memory_bytes(rows, dim, cfgs, itemsize=itemsize)
    free = free_memory_bytes(device)
    if need <= 0.9 * free:
        return
    largest = max(cfgs, key=lambda c: sweep_memory_bytes(rows, dim, [c], itemsize=itemsize))
    alone = sweep_memory_bytes(rows, dim, [largest], itemsize=itemsize)
    what = "this head" if len(cfgs) == 1 else "this sweep"
    if alone > 0.9 * free:
        if "hidden" in HEAD_KINDS[largest.head].options:  # an MLP inside (mlp, layermix)
            fix = (f"lower --hidden or --depth (--head {largest.head} --hidden {HEAD_KINDS[largest.head].width(dim, **head_options(largest))} "
                   f"--depth {largest.depth}), or --batch-size {largest.batch_size}")
        else:
            fix = f"lower --batch-size ({largest.batch_size}), or use a smaller --feature"
    else:
        fix = "split the grid into smaller sweeps (fewer values per option or --seeds)"
    raise UserError(f"{what} needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free on {device}; {fix}")


BARRIER_TIMEOUT = datetime.timedelta(days=2)


def sweep(store_dir: str | os.PathLike, cfgs: list[RunConfig], *, val_store=None,
          runs_dir: str | os.PathLike = "runs", name: str = "sweep", device: str = "auto",
          log: Callable[[str], None] = print, progress: bool = False, halving: bool = False, eta: int = 3,
          min_epochs: int = 1, with_stores: list[str | os.PathLike] = ()) -> tuple[Path, pl.DataFrame]:
    """Train every config at once; write the leaderboard, a heatmap and the best run directory.

    Under torchrun each rank trains a disjoint slice of the grid (configs rank, rank+world, ...)
    and writes its rows; rank 0 waits for all ranks, merges the leaderboard and keeps the best.
    halving: successive halving with `eta` and `min_epochs` (heads.train.Halving); the leaderboard's
    stop_epoch says where each config stopped, and best/ is a full-length run. Under torchrun each
    rank halves its own slice (no communication per rung), so every rank brings at least one
    full-length run and the merged leaderboard ranks them; a single process ranks the whole grid.
    with_stores: as in fit; configs of different features (e.g. A:proj, B:proj, A:proj+B:proj) then
    compare backbones and their fusion on the same joined rows.
    """
    plan = Halving(eta, min_epochs) if halving else None
    if plan is not None:
        plan.check(cfgs)  # every rank refuses bad settings before any trains
    me = rank_from_env()
    rank, world = me.rank, me.world
    out = Path(runs_dir) / safe_name(name)
    parts = out / "parts"
    check_writable_dir(runs_dir, "--runs-dir")
    mine = cfgs[rank::world]
    if mine:  # refused sweeps leave nothing behind: check before the first folder is made
        dev = resolve_device(device)
        s, vs = _open_stores(store_dir, val_store, with_stores)
        _check_memory([s] + ([vs] if vs is not None else []), mine, dev)
    parts.mkdir(parents=True, exist_ok=True)
    # Rows of an earlier sweep of this name (maybe with more ranks) must not leak into this leaderboard.
    (parts / f"rows-r{rank:03d}.parquet").unlink(missing_ok=True)
    select = cfgs[0].select if len({c.select for c in cfgs}) == 1 else "auc"  # ranks runs and picks best/
    if world > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        # Ranks finish their slices at different times; gloo's default 30-minute timeout would
        # kill the early ones at the barrier and lose the merge, so wait as long as a sweep can take.
        torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    if mine:
        t0 = time.perf_counter()
        results, data = train(s, mine, val_store=vs, device=device, log=log, progress=progress, halving=plan)
        log(f"rank {rank}: trained {len(mine)} heads in {time.perf_counter() - t0:.1f}s")
        diverged = sum(r.diverged is not None for r in results)
        if diverged:
            log(f"{diverged} of {len(mine)} configs diverged (NaN or infinite loss); the leaderboard ranks them "
                "last, with the epoch in its `diverged` column")
        rows = pl.DataFrame([result_row(r) | {"rank": rank, "index": i} for i, r in enumerate(results)],
                            infer_schema_length=None)
        best_i = int(leaderboard(rows, select, halving=halving)[0]["index"][0])
        if results[best_i].diverged is None:  # no best run from a rank whose every config diverged
            save_run(results[best_i], parts / f"best-r{rank:03d}", provenance=data.provenance, counts=data.counts,
                     train_paths=data.train_paths)
        tmp = parts / f".rows-r{rank:03d}.parquet.tmp"
        rows.write_parquet(tmp)
        os.replace(tmp, parts / f"rows-r{rank:03d}.parquet")
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return out, pl.DataFrame()
    files = [p for r in range(world) if (p := parts / f"rows-r{r:03d}.parquet").is_file()]
    rows = pl.concat([pl.read_parquet(p) for p in files], how="diagonal_relaxed")
    runs, summary = leaderboard(rows, select, halving=halving)
    best = runs.row(0, named=True)
    halving_info = {"eta": eta, "min_epochs": min_epochs, "rungs": plan.rungs(cfgs[0].epochs),
                    "per_rank": world > 1} if plan is not None else None
    # The sweep folder is assembled aside and swapped in whole: nothing of an earlier sweep of this
    # name (a heatmap this grid has none of, another rank count's parts) survives.
    with replacing_dir(out) as new:
        (new / "parts").mkdir()
        for r in range(world):
            for part in (f"rows-r{r:03d}.parquet", f"best-r{r:03d}"):
                if (parts / part).exists():
                    os.rename(parts / part, new / "parts" / part)
        runs.write_parquet(new / "runs.parquet")
        summary.write_parquet(new / "leaderboard.parquet")
        plot_heatmap(summary, new / "heatmap_alpha_gamma.png")
        if best["diverged"] is None:
            shutil.copytree(new / "parts" / f"best-r{best['rank']:03d}", new / "best")
            (new / "sweep.json").write_text(json.dumps({"configs": len(cfgs), "world_size": world, "best": best,
                                                        "varying": varying_columns(rows), "halving": halving_info},
                                                       indent=2, default=str))
    if best["diverged"] is not None:
        raise UserError(f"every config of the sweep diverged (NaN or infinite loss; leaderboard in {out}); "
                        f"lower --lr (lowest now {min(c.lr for c in cfgs):g})")
    return out, summary


def evaluate_run(run_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None, *,
                 device: str = "auto", split: str | None = None, precision: str = "auto",
                 include_train: bool = False, log: Callable[[str], None] = print, pool: str | None = None,
                 temperature: float | None = None, with_stores: list[str | os.PathLike] = ()) -> dict:
    """Metrics of a trained run on a store (default: its validation numbers from report.json).

    with_stores: for a run trained on fused stores, the stores of its other backbones, in the run's order
    (`dfhead eval RUN --store A --with B`); see open_for_run.

    split: only the store's rows of this split (e.g. "test"); None = every labelled row.
    include_train: also score the rows the run trained on. By default they are left out (one note
    through `log` gives their count): metrics over training rows are optimistic. A row is a
    training row when its path is in the run's train_rows.parquet and the store is the run's own
    training store or holds the same input folder's images (a perturbed copy, say).
    precision: of the head's hidden matmuls on the store (heads.precision: auto, fp32 or bf16). Rows
    whose embeddings are NaN or inf are left out, with one warning line through `log`; rows whose
    image file is gone from the store's input folder are counted in one warning line.
    pool, temperature: how the video-level metrics ("video", over the rows' groups) pool frame
    scores (heads.metrics.pool_groups); None = the run's --video-pool / --pool-temperature.
    """
    run_dir = Path(run_dir)
    if store_dir is None:
        if not (run_dir / "report.json").is_file():
            raise UserError(f"{run_dir} is not a dfclip run directory (no report.json); pass a directory written "
                            "by `dfhead fit` or `dfhead sweep`")
        return json.loads((run_dir / "report.json").read_text())
    dev = resolve_device(device)
    head, config = load_run(run_dir, dev)
    s = open_for_run(config, store_dir, with_stores)
    return _evaluate_loaded(head, config, _trained_paths(run_dir), s, dev, split, precision,
                            include_train, log, pool=pool, temperature=temperature)


def open_for_run(config: dict, store_dir: str | os.PathLike, with_stores: list[str | os.PathLike] = ()
                 ) -> store.Store | store.FusedStore:
    """The store a run scores: `store_dir`, fused with `with_stores` when the run was trained on fused stores.

    A fused run needs as many stores as it fused, given in its order; each is named as the run named its
    store, so its feature ("st_clip:proj+st_dino:proj") reads the same parts whatever the folders are called.
    """
    members = config["provenance"].get(store.format.FUSION_KEY) or []
    names = [m["name"] for m in members]
    if not with_stores and not members:
        return store.open(store_dir)
    if not members:
        raise UserError(f"the run was trained on one store, so it scores one: drop --with "
                        f"({', '.join(map(str, with_stores))})")
    if len(with_stores) + 1 != len(members):
        raise UserError(f"the run fuses {len(members)} stores ({', '.join(names)}): give the first as --store and the "
                        f"others with --with, in that order (got {1 + len(with_stores)} stores)")
    return store.fuse([store_dir, *with_stores], names=names)


def _trained_paths(run_dir: Path) -> pl.Series | None:
    """The paths the run trained on (train_rows.parquet); None for runs written before it was recorded."""
    file = Path(run_dir) / TRAIN_ROWS_FILE
    return pl.read_parquet(file)["path"] if file.is_file() else None


def _training_rows(config: dict, trained: pl.Series | None, s: store.Store, rows: pl.DataFrame) -> pl.Series:
    """Which of `rows` (of store `s`) the run trained on, as a boolean mask, matched on path.

    Paths are relative to a store's input folder, so a path means the same image only in the run's
    own store or in a store of the same input folder (perturbed copies); elsewhere no row matches.
    """
    if trained is None or not _same_images(config, s):
        return pl.Series([False] * rows.height, dtype=pl.Boolean)
    return rows["path"].is_in(trained.implode())


def _same_images(config: dict, s: store.Store) -> bool:
    """Whether store `s` may hold the run's training images: it is the run's training store, or a store of
    the same input folder. Runs from before store_root was recorded compare the store path as given."""
    data, root = config.get("data") or {}, config["provenance"].get("input_root")
    trained_on = data.get("store_root") or (str(Path(data["store"]).resolve()) if data.get("store") else None)
    return trained_on == str(s.root.resolve()) or (root is not None and root == s.provenance.get("input_root"))


def _leave_out_training_rows(config: dict, trained: pl.Series | None, s: store.Store, rows: pl.DataFrame,
                             include_train: bool, where: str, log: Callable[[str], None]) -> pl.DataFrame:
    if trained is None and _same_images(config, s):
        log(f"warning: the run does not record the rows it trained on (it predates {TRAIN_ROWS_FILE}), and store "
            f"{s.root} may hold them: these metrics may be optimistic; re-run `dfhead fit` to record them")
        return rows
    hit = _training_rows(config, trained, s, rows)
    n = int(hit.sum())
    if n == 0:
        return rows
    if include_train:
        log(f"warning: {n} of the {rows.height} rows of store {s.root}{where} are rows the run trained on: scored "
            "(--include-train), so these metrics are optimistic")
        return rows
    if n == rows.height:
        raise UserError(f"every labelled row of store {s.root}{where} is a row the run trained on; evaluate on other "
                        "images, or pass --include-train to score them anyway (optimistic)")
    log(f"note: left out {n} of the {rows.height} rows of store {s.root}{where} that the run trained on; "
        "--include-train scores them too (optimistic)")
    return rows.filter(~hit)


def _evaluate_loaded(head, config: dict, trained: pl.Series | None, s: store.Store, dev: torch.device,
                     split: str | None, precision: str, include_train: bool, log: Callable[[str], None], *,
                     pool: str | None = None, temperature: float | None = None) -> dict:
    """evaluate_run on a loaded run and an open store (a robustness table loads the run once)."""
    _check_same_model(config, s)
    rows = s.select(label=[0, 1], split=split)
    if s.join_note is not None:
        log(s.join_note)
    where = f" in split {split!r}" if split is not None else ""
    if rows.height == 0:
        raise UserError(f"store {s.root} has no labelled rows{where} to evaluate on; use `dfhead predict` for "
                        "unlabelled data" + (" or another --split" if where else ""))
    rows = _leave_out_training_rows(config, trained, s, rows, include_train, where, log)
    if (note := missing_inputs_note(s, rows)) is not None:
        log(note)
    x, rows = _finite(*s.load(rows, feature=config["run"]["feature"]), s, log)
    logits = _logits(head, config, x, dev, precision)
    y = torch.from_numpy(rows["label"].to_numpy().astype(np.int64)).to(dev)
    groups = rows["group"].to_list() if (rows["group"] != "").any() else None
    pool, temperature = run_pooling(config, pool, temperature)
    rep = metrics.evaluate(torch.sigmoid(logits), y, sources=rows["source"].to_list(), groups=groups,
                           threshold=config["threshold"], pool=pool, temperature=temperature)[0]
    # ECE, NLL and Brier of the raw and the calibrated scores; the rates at the run's threshold.
    rep["calibration"] = scores_report(logits[0].cpu().numpy(), rows["label"].to_numpy(), calibration_from_config(config))
    return rep | {f"{k}@threshold": v for k, v in threshold_rates(rep).items()}


def run_pooling(config: dict, pool: str | None = None, temperature: float | None = None) -> tuple[str, float]:
    """(pool, temperature) for a run's video verdicts: the given ones, else the run's settings (config.json "run"),
    checked (a UserError naming --pool / --temperature)."""
    pool = config["run"]["video_pool"] if pool is None else pool
    temperature = config["run"]["pool_temperature"] if temperature is None else temperature
    metrics.check_pool(pool, temperature)
    return pool, temperature


ROBUSTNESS_METRICS = ("auc", "ap", "eer", "acc")
ROBUSTNESS_FILES = ("robustness.parquet", "robustness.png")


def evaluate_stores(run_dir: str | os.PathLike, store_dirs: list[str | os.PathLike], *,
                    device: str = "auto", split: str | None = None, precision: str = "auto",
                    include_train: bool = False, write: bool = True,
                    log: Callable[[str], None] = print, with_stores: list[str | os.PathLike] = ()) -> pl.DataFrame:
    """A run's metrics on several labelled stores of its model: the robustness table.

    One row per store, in the order given: store (its folder name), perturb (from its
    provenance, "none" for a clean store), n, and AUC, AP, EER and accuracy at the run's
    threshold, over every labelled row (or those of `split`) but the rows the run trained on
    (include_train: as evaluate_run). write: also save it into the run directory
    (write_robustness); returned. with_stores: of a fused run, its other stores; every store of
    `store_dirs` is fused with them (open_for_run).
    """
    dev = resolve_device(device)
    head, config = load_run(run_dir, dev)
    trained = _trained_paths(Path(run_dir))
    rows = []
    for store_dir in store_dirs:
        s = open_for_run(config, store_dir, with_stores)
        rep = _evaluate_loaded(head, config, trained, s, dev, split, precision, include_train, log)
        rows.append({"store": Path(store_dir).name, "perturb": s.provenance.get("perturb") or "none", "n": rep["n"],
                     **{k: rep.get(k) for k in ROBUSTNESS_METRICS}, "path": str(Path(store_dir).resolve())})
    table = pl.DataFrame(rows)
    if write:
        write_robustness(table, run_dir, log=log)
    return table


def write_robustness(table: pl.DataFrame, run_dir: str | os.PathLike, *, log: Callable[[str], None] = print
                     ) -> list[Path]:
    """Save the robustness table into the run directory as robustness.parquet and robustness.png (a bar
    chart of AUC and accuracy per store); the paths written.

    Saving is a by-product of `dfhead eval`: a run folder that cannot be written (read-only, full)
    gives one warning line through `log` and no files (each is written aside, then renamed), not an error.
    """
    run_dir = Path(run_dir)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    tmps = [run_dir / f".{name}.tmp{tag}{Path(name).suffix}" for name in ROBUSTNESS_FILES]
    try:
        table.write_parquet(tmps[0])
        plot_robustness(table, tmps[1], title=run_dir.name)
        for tmp, name in zip(tmps, ROBUSTNESS_FILES):
            os.replace(tmp, run_dir / name)
    except OSError as e:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        log(f"warning: the robustness table could not be saved in {run_dir} ({e.strerror or e}); it is only printed")
        return []
    return [run_dir / name for name in ROBUSTNESS_FILES]


def plot_robustness(table: pl.DataFrame, path: Path, *, title: str = "") -> None:
    """Grouped bars: AUC and accuracy per store (x axis: store name and its perturbation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s if p == "none" else f"{s}\n({p})" for s, p in zip(table["store"], table["perturb"])]
    x = np.arange(table.height)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * table.height, 4))
    for offset, metric in ((-0.2, "auc"), (0.2, "acc")):
        values = table[metric].fill_null(float("nan")).to_numpy()
        bars = ax.bar(x + offset, values, width=0.4, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylim=(0, 1.08), ylabel="score", title=f"robustness of {title}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scores(head, config: dict, x: np.ndarray, dev: torch.device, precision: str = "auto") -> torch.Tensor:
    """Raw probabilities [K, N] (sigmoid of `_logits`); calibration is applied after any video pooling."""
    return torch.sigmoid(_logits(head, config, x, dev, precision))


def _logits(head, config: dict, x: np.ndarray, dev: torch.device, precision: str = "auto") -> torch.Tensor:
    """Logits [K, N] of a loaded run on rows x: its l2 normalisation applied, hidden matmuls in
    `precision` (heads.precision), fp32 matmuls as TF32 on GPUs as in training (runtime.tf32_precision)."""
    with tf32_precision():
        return predict_logits(head, torch.from_numpy(x).to(dev), l2_normalize=config["run"]["l2_normalize"],
                              precision=resolve_precision(precision, dev))


def _check_same_model(config: dict, s: store.Store) -> None:
    store.format.require_compatible(s.provenance, config["provenance"], what=f"store {s.root}",
                                    fix="the run was trained on the latter: embed with the run's model")


def _finite(x: np.ndarray, rows: pl.DataFrame, s: store.Store, log: Callable[[str], None]):
    x, rows, dropped = finite_rows(x, rows)
    if (note := non_finite_note({str(s.root): dropped})) is not None:
        log(note)
    if rows.height == 0:
        raise UserError(f"store {s.root} has no rows with finite embeddings to score; re-extract it")
    return x, rows


def predict_store(run_dir: str | os.PathLike, store_dir: str | os.PathLike, *, device: str = "auto",
                  precision: str = "auto", log: Callable[[str], None] = print, pool: str | None = None,
                  temperature: float | None = None, frame_scores: str | os.PathLike | None = None,
                  with_stores: list[str | os.PathLike] = (), score_means: str = "fake") -> pl.DataFrame:
    """path, score (calibrated probability of fake) and predicted label (1 fake, 0 real) for every row of a store.

    score_means="real": the column is score_real = 1 - P(fake) instead (see `verdicts`).

    with_stores: of a run trained on fused stores, its other backbones' stores (open_for_run); rows
    held by some of the stores only get no score (one note through `log`).

    precision: of the head's hidden matmuls (heads.precision: auto, fp32 or bf16).
    Rows whose embeddings are NaN or inf get no score: they are left out, with one warning line through `log`.
    When rows are video frames (a `frame` column >= 0), the table has one row per video instead
    (see `verdicts`): frames pooled by `pool` / `temperature` (None = the run's), and
    `frame_scores` (a CSV path) receives the per-row scores.
    """
    dev = resolve_device(device)
    head, config = load_run(run_dir, dev)
    run_pooling(config, pool, temperature)  # refused before scoring, with or without videos
    s = open_for_run(config, store_dir, with_stores)
    _check_same_model(config, s)
    if s.join_note is not None:
        log(s.join_note)
    x, rows = _finite(*s.load(feature=config["run"]["feature"]), s, log)
    scores = _scores(head, config, x, dev, precision)[0]
    scores = scores.cpu().numpy()
    return verdicts(rows, scores, config, pool=pool, temperature=temperature, frame_scores=frame_scores,
                    score_means=score_means)


FRAME_SUFFIX = r"#f\d+(@\d+)?$"  # a video row's path is VIDEO#fNNNNNN, plus @K for its face K


def frame_table(rows: pl.DataFrame, scores: np.ndarray) -> pl.DataFrame:
    """Per-row scores: path, video (the video file of a frame row, "" for a still image), frame (-1 for a
    still image, and for every row of a store without a `frame` column), face_index (null without the
    column), score and label."""
    frame = rows["frame"].cast(pl.Int64) if "frame" in rows.columns else pl.Series([-1] * rows.height, dtype=pl.Int64)
    face = rows["face_index"].cast(pl.Int64) if "face_index" in rows.columns else pl.Series([None] * rows.height,
                                                                                              dtype=pl.Int64)
    table = pl.DataFrame({"path": rows["path"], "frame": frame.fill_null(-1), "face_index": face,
                          "score": scores, "label": rows["label"]})
    video = pl.when(pl.col("frame") >= 0).then(pl.col("path").str.replace(FRAME_SUFFIX, "")).otherwise(pl.lit(""))
    return table.with_columns(video.alias("video")).select("path", "video", "frame", "face_index", "score", "label")


def verdicts(rows: pl.DataFrame, scores: np.ndarray, config: dict, *, pool: str | None = None,
             temperature: float | None = None, frame_scores: str | os.PathLike | None = None,
             score_means: str = "fake") -> pl.DataFrame:
    """predict's table from scored store rows (raw probabilities `scores`) and a run's config.json.

    Without video frames among the rows: path, score, pred, label, one row per image. With them:
    heads.metrics.pool_table's one row per video (and per still image), path, n_frames, n_faces,
    score, pred, label, the frames pooled by `pool` / `temperature` (None = the run's) and judged at
    the run's threshold. frame_scores: also write the per-row scores (frame_table) to this CSV.
    pred is decided on the raw probabilities (pooled for a video) at the run's threshold; the score
    written is then the run's calibrated P(fake) of that probability (heads.calibration; the raw one
    for runs without a calibration), or with score_means="real" 1 - P(fake) in a column named
    score_real (DFWild-Cup's convention; pred still says 1 = fake).
    """
    as_score_means(np.zeros(0), score_means)  # a bad value is refused before anything is written
    cal = calibration_from_config(config)
    table = frame_table(rows, scores)
    if frame_scores is not None:
        _calibrated(table, cal, score_means).sort("path").write_csv(frame_scores)
    if not (table["frame"] >= 0).any():
        pred = (scores >= config["threshold"]).astype(np.int8)
        raw = pl.DataFrame({"path": rows["path"], "score": scores, "pred": pred, "label": rows["label"]})
    else:
        raw = metrics.pool_table(table, *run_pooling(config, pool, temperature), config["threshold"])
    return _calibrated(raw, cal, score_means).sort("path")


def _calibrated(table: pl.DataFrame, cal: Calibration, score_means: str) -> pl.DataFrame:
    """`table` with its raw `score` column replaced by the calibrated P(fake) (float64), or by 1 - P(fake) in a
    column `score_real` (score_means="real"), in the same place."""
    p = as_score_means(cal.from_probabilities(table["score"].to_numpy()), score_means)
    name = "score" if score_means == "fake" else "score_real"
    return table.with_columns(pl.Series("score", p, dtype=pl.Float64)).rename({"score": name})


def list_runs(runs_dir: str | os.PathLike = "runs") -> pl.DataFrame:
    """One row per run directory under runs_dir (sweeps' best runs included), newest first.

    `status` is "ok", "no weights" (head.safetensors is missing: predict and eval will refuse
    the run) or "bad config.json" (it fails the checks predict and eval make, load_run_config: say a
    NaN threshold; its settings columns show what could be read). Folders being written (hidden) are skipped.
    """
    rows = []
    for cfg_path in sorted(Path(runs_dir).glob("**/config.json")):
        rel = cfg_path.relative_to(runs_dir)
        if "parts" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        run = cfg_path.parent
        try:
            r = json.loads(cfg_path.read_text())["run"]
            rep = json.loads((run / "report.json").read_text()) if (run / "report.json").exists() else {}
            if not isinstance(r, dict) or not isinstance(rep, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, KeyError, TypeError):
            r, rep = {}, {}
        status = "no weights" if not (run / "head.safetensors").is_file() else _config_status(run)
        rows.append({"run": str(run.relative_to(runs_dir)), "status": status, "head": r.get("head"),
                     "alpha": r.get("cvar_alpha"), "gamma": r.get("auc_gamma"), "rho": r.get("sam_rho"),
                     "lr": r.get("lr"), "epochs": r.get("epochs"), "seed": r.get("seed"), "feature": r.get("feature", "proj"),
                     "val_auc": (rep.get("val") or {}).get("auc"), "val_eer": (rep.get("val") or {}).get("eer"),
                     "val_video_auc": ((rep.get("val") or {}).get("video") or {}).get("auc"),
                     "holdout_auc": (rep.get("holdout") or {}).get("auc"), "modified": cfg_path.stat().st_mtime})
    if not rows:
        raise UserError(f"no runs under {runs_dir}; train one with `dfhead fit`")
    return pl.DataFrame(rows, infer_schema_length=None).sort("modified", descending=True).drop("modified")


def _config_status(run: Path) -> str:
    try:
        load_run_config(run)
    except UserError:
        return "bad config.json"
    return "ok"
