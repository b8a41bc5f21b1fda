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
                   precision: str = "auto", log: Callable[[str], None] = print) -> pl.DataFrame:
    """Score a folder of images (or one image file) with a trained run.

    The images are embedded exactly as the run's training store was (same model, weights,
    preprocessing and feature, and the blocks of its --feature; embed.config.config_from_provenance), on `device` with
    `workers` decode processes, and scored with the threshold chosen at fit time. `precision`
    (auto, fp32, bf16) is the head's (heads.precision); the backbone runs at the precision the
    run's store was embedded with.
    Returns path (relative to `images`; the file name for one image), score (probability of
    fake), pred (1 fake, 0 real) and label (from real/fake folder names, -1 when none), sorted by
    path. Images that cannot be read get no row: they are written with their reason to
    `failures_csv` (path, error, message) when given. Raises UserError when the run cannot
    rebuild its backbone (e.g. imported embeddings) or when no image could be read.
    """
    from dfclip import store
    from dfclip.embed.extract import extract_like
    from dfclip.heads.report import load_run_config
    from dfclip.heads.run import predict_store

    from dfclip.store.format import feature_blocks

    config = load_run_config(run_dir)
    # Exactly the run's feature: the projected embedding always, plus the blocks it reads (if any).
    blocks = feature_blocks(config["run"]["feature"])
    remove_dead_temps()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        summary = extract_like(config["provenance"], images, tmp, device=device, workers=workers, progress=progress,
                               layers=blocks)
        failures = store.open(summary["store"]).failures if summary["failed"] else None
        if failures is not None and failures_csv is not None:
            failures.select("path", "error", "message").sort("path").write_csv(failures_csv)
        if summary["embedded"] == 0:
            reasons = ", ".join(f"{n} {k}" for k, n in failures["error"].value_counts(sort=True).iter_rows()) \
                if failures is not None else "no images found"
            where = f"; listed in {failures_csv}" if failures is not None and failures_csv is not None else ""
            raise UserError(f"none of the images in {images} could be scored ({reasons}){where}")
        return predict_store(run_dir, summary["store"], device=device, precision=precision, log=log)

