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
                   workers: int = 2, progress: bool = True, precision: str = "auto") -> pl.DataFrame:
    """Score a folder of images (or one image file) with a trained run.

    The images are embedded exactly as the run's training store was (same model, weights,
    preprocessing and feature; embed.config.config_from_provenance), on `device` with
    `workers` decode processes, and scored with the threshold chosen at fit time. `precision`
    (auto, fp32, bf16) is the head's (heads.precision); the backbone runs at the precision the
    run's store was embedded with.
    Returns path (relative to `images`; the file name for one image), score (probability of
    fake), pred (1 fake, 0 real) and label (from real/fake folder names, -1 when none), sorted by
    path. Raises UserError when the run cannot rebuild its backbone (e.g. imported embeddings).
    """
    from dfclip.embed.extract import extract_like
    from dfclip.heads.report import load_run_config
    from dfclip.heads.run import predict_store

    provenance = load_run_config(run_dir)["provenance"]
    with tempfile.TemporaryDirectory(prefix="dfclip-predict-") as tmp:
        summary = extract_like(provenance, images, tmp, device=device, workers=workers, progress=progress)
        return predict_store(run_dir, summary["store"], device=device, precision=precision)
