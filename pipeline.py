"""Images straight to scores: the one place that knows both embed/ and heads/.

    from dfclip.pipeline import predict_images
    scores = predict_images("runs/paper", "new_images/")   # path, score, pred, label

embed/ never knows heads and heads/ never knows images, so chaining them lives here: the
images are embedded with the run's recorded backbone into a temporary store, which
heads.run.predict_store scores.
"""

from __future__ import annotations

import os
import tempfile

import polars as pl


def predict_images(run_dir: str | os.PathLike, images: str | os.PathLike, *, device: str = "auto",
                   workers: int = 2, progress: bool = True) -> pl.DataFrame:
    """Score a folder of images (or one image file) with a trained run.

    The images are embedded exactly as the run's training store was (same model, weights,
    preprocessing and feature, and the blocks of its --feature; embed.config.config_from_provenance), on `device` with
    `workers` decode processes, and scored with the threshold chosen at fit time.
    Returns path (relative to `images`; the file name for one image), score (probability of
    fake), pred (1 fake, 0 real) and label (from real/fake folder names, -1 when none), sorted by
    path. Raises UserError when the run cannot rebuild its backbone (e.g. imported embeddings).
    """
    from dfclip.embed.extract import extract_like
    from dfclip.heads.report import load_run_config
    from dfclip.heads.run import predict_store

    from dfclip.store.format import feature_blocks

    config = load_run_config(run_dir)
    # Exactly the run's feature: the projected embedding always, plus the blocks it reads (if any).
    blocks = feature_blocks(config["run"]["feature"])
    with tempfile.TemporaryDirectory(prefix="dfclip-predict-") as tmp:
        summary = extract_like(config["provenance"], images, tmp, device=device, workers=workers, progress=progress,
                               layers=blocks)
        return predict_store(run_dir, summary["store"], device=device)
