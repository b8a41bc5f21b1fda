"""Images straight to scores: the one place that knows both embed/ and heads/.

    from dfclip.pipeline import predict_images
    scores = predict_images("runs/paper", "new_images/")   # path, score, pred, label

embed/ never knows heads and heads/ never knows images, so chaining them lives here: the
images are embedded with the run's recorded backbone into a temporary store, which
heads.run.predict_store scores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from typing import Callable

import numpy as np
import polars as pl

from dfclip.errors import UserError
from dfclip.runtime import process_alive

TEMP_PREFIX = "dfclip-predict-"  # + "<pid>-": whose temporary store it is


def remove_dead_temps() -> list[Path]:
    """Delete the temporary stores of predicts that were killed (SIGKILL leaves no chance to clean up).

    Each temporary folder carries its process id; a folder whose process is gone is garbage."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-")[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def predict_images(run_dir: str | os.PathLike, images: str | os.PathLike, *, device: str = "auto",
                   workers: int = 2, progress: bool = True, failures_csv: str | os.PathLike | None = None,
                   precision: str = "auto", log: Callable[[str], None] = print, pool: str | None = None,
                   temperature: float | None = None, frame_scores: str | os.PathLike | None = None,
                   score_means: str = "fake") -> pl.DataFrame:
    """Score a folder of images and videos (or one file) with a trained run (a run folder or a `dfhead export` file).

    The images are embedded exactly as the run's training store was (same model, weights,
    preprocessing and feature, and the blocks of its --feature; embed.config.config_from_provenance), once
    per backbone for a run trained on fused stores (`dfhead fit A --with B`), on `device` with
    `workers` decode processes, and scored with the threshold chosen at fit time. `precision`
    (auto, fp32, bf16) is the head's (heads.precision); the backbone runs at the precision the
    run's store was embedded with.
    Returns path (relative to `images`; the file name for one image), score (the run's calibrated
    probability of fake; score_means="real": score_real = 1 - that), pred (1 fake, 0 real) and label
    (from real/fake folder names, -1 when none), sorted by path. Images that cannot be read get no row: they are written with their reason to
    `failures_csv` (path, error, message) when given. Raises UserError when the run cannot
    rebuild its backbone (e.g. imported embeddings) or when no image could be read.
    Videos among the inputs are scored frame by frame and come back as one row per video (path,
    n_frames, n_faces, score, pred, label; still images keep one row each), the frames pooled by
    `pool` (mean, max or lse with `temperature`; None = the run's --video-pool), as
    heads.run.verdicts does; `frame_scores` (a CSV path) receives the per-frame scores.

    One process embeds every image, even where RANK and WORLD_SIZE are set, unless torchrun started
    it (runtime.without_stray_ranks). Under torchrun each rank embeds and scores its share, the
    ranks exchange their rows (gloo), every rank returns all of them, and rank 0 alone writes
    `failures_csv`.
    """
    from dfclip.heads.calibration import as_score_means
    from dfclip.heads.report import load_run_config
    from dfclip.heads.run import run_pooling
    from dfclip.runtime import without_stray_ranks

    config = load_run_config(run_dir)
    run_pooling(config, pool, temperature)  # a bad --pool is refused before anything is embedded
    as_score_means(np.zeros(0), score_means)  # and so is a bad --score-means
    pooling = {"pool": pool, "temperature": temperature, "score_means": score_means}
    remove_dead_temps()
    with without_stray_ranks(log) as me:
        scores, failures, error = None, None, None
        try:
            # Under torchrun each rank writes its frames aside; rank 0 joins them after the merge.
            mine_frames = frame_scores if me.world == 1 or frame_scores is None else f"{frame_scores}.rank{me.rank}"
            scores, failures = _predict_mine(run_dir, config, images, device, workers, progress, precision, log,
                                             frame_scores=mine_frames, **pooling)
        except UserError as e:
            if me.world == 1:
                raise
            error = str(e)  # the peers must hear it, or they wait for this rank forever
        if me.world > 1:
            scores, failures = _merge_ranks(scores, failures, error)
            if frame_scores is not None and me.rank == 0:
                _join_frame_scores(frame_scores, me.world)
    if failures is not None and failures_csv is not None and me.rank == 0:
        failures.select("path", "error", "message").sort("path").write_csv(failures_csv)
    if scores is None:
        reasons = ", ".join(f"{n} {k}" for k, n in failures["error"].value_counts(sort=True).iter_rows()) \
            if failures is not None else "no images found"
        where = f"; listed in {failures_csv}" if failures is not None and failures_csv is not None else ""
        raise UserError(f"nothing in {images} could be scored ({reasons}){where}")
    return scores


def _predict_mine(run_dir, config: dict, images, device: str, workers: int, progress: bool, precision: str,
                  log: Callable[[str], None], **pooling) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """(scores, failures) of this process's images (all of them, or its rank's share); None when none."""
    from dfclip import store
    from dfclip.embed.extract import extract_like
    from dfclip.heads.run import predict_store

    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        stores, failures, source = [], [], images
        # One temporary store per backbone of the run (one for most runs; one per fused store otherwise),
        # each holding exactly what the run's feature reads of it: the projected embedding plus its blocks.
        for i, (provenance, blocks) in enumerate(_backbones(config)):
            summary = extract_like(provenance, source, Path(tmp) / f"backbone{i}", device=device, workers=workers,
                                   progress=progress, layers=blocks)
            if i == 0 and Path(images).is_file() and (summary["embedded"] or summary["failed"]):
                # One image is embedded through a folder linking it: the other backbones read that same folder,
                # so the fused stores share one input root.
                source = store.open(summary["store"]).provenance.get("input_root") or images
            if summary["failed"]:
                failures.append(store.open(summary["store"]).failures.select("path", "error", "message"))
            stores.append(summary["store"] if summary["embedded"] else None)
        failures = pl.concat(failures).unique("path", keep="first", maintain_order=True) if failures else None
        scores = predict_store(run_dir, stores[0], device=device, precision=precision, log=log,
                               with_stores=stores[1:], **pooling) if all(stores) else None
    if Path(images).is_file():  # one image: its own name, not that of the link it was embedded through
        name = pl.lit(Path(images).name)
        scores = scores.with_columns(path=name) if scores is not None else None
        failures = failures.with_columns(path=name) if failures is not None else None
    return scores, failures


def _backbones(config: dict) -> list[tuple[dict, list[int]]]:
    """(provenance, blocks to store) of each store a run was trained on, in its order: the run's own store,
    or each of its fused stores (store.format.FUSION_KEY) with the blocks its feature reads of that store."""
    from dfclip.store.format import FUSION_KEY, feature_blocks, fused_feature

    feature = config["run"]["feature"]
    members = config["provenance"].get(FUSION_KEY)
    if not members:
        return [(config["provenance"], feature_blocks(feature))]
    pairs = fused_feature(feature, [m["name"] for m in members])
    return [(m["provenance"], feature_blocks("+".join(p for j, p in pairs if j == i) or "proj"))
            for i, m in enumerate(members)]


def _join_frame_scores(path: str | os.PathLike, world: int) -> None:
    """Concatenate the ranks' per-frame CSVs (`path`.rankR) into `path`, sorted by path."""
    parts = [Path(f"{path}.rank{r}") for r in range(world)]
    frames = [pl.read_csv(p) for p in parts if p.is_file()]
    if frames:
        pl.concat(frames).sort("path").write_csv(path)
    for p in parts:
        p.unlink(missing_ok=True)


def _merge_ranks(scores: pl.DataFrame | None, failures: pl.DataFrame | None, error: str | None
                 ) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """Every torchrun rank's (scores, failures), concatenated and sorted by path, on every rank; a
    rank's UserError is raised on all of them."""
    import torch.distributed as dist

    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo")
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (scores, failures, error))
    if mine:
        dist.destroy_process_group()
    errors = sorted({e for _, _, e in parts if e is not None})
    if errors:
        raise UserError("; ".join(errors))

    def merged(i: int) -> pl.DataFrame | None:
        frames = [p[i] for p in parts if p[i] is not None]
        return pl.concat(frames).sort("path") if frames else None

    return merged(0), merged(1)
