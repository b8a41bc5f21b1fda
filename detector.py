"""A ready-to-use detector from one file: images in, calibrated P(fake) out.

    from dfclip import Detector
    det = Detector.load("paper.dfclip")        # written by `dfhead export RUN paper.dfclip`
    det("new_images/")                          # a polars frame: path, score, pred, label
    det([Image.open("a.jpg"), "b.png"])         # PIL images and paths, in the order given

The file (heads.export) carries the head, its threshold and calibration, and the provenance of
the store it was trained on; the images are embedded with that backbone exactly as that store
was (embed.config.config_from_provenance: the weights from the usual open_clip / timm caches or
the recorded checkpoint, checked by sha256), then scored by the same code as `dfhead predict`
(pipeline.predict_images), so the scores are those of the run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import polars as pl

from dfclip.errors import UserError

PIL_NAME = "image-{:06d}.png"  # a PIL image's row path: its position in the input list


class Detector:
    """An exported run, checked and ready to score images (see the module docstring)."""

    def __init__(self, path: Path, config: dict, *, device: str = "auto", workers: int = 0,
                 precision: str = "auto") -> None:
        self.path, self.config = path, config
        self.device, self.workers, self.precision = device, workers, precision

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "auto", workers: int = 0,
             precision: str = "auto") -> "Detector":
        """The detector in `path` (a file from `dfhead export`).

        Refused with one UserError line: a file that is not a dfclip export, and one whose backbone
        cannot be rebuilt here (a model name this open_clip / timm does not know, a checkpoint that
        is gone or whose sha256 differs from the recorded one, embeddings that were imported).
        device, workers (decode processes; 0 = in this process) and precision (of the head) apply to
        every call.
        """
        from dfclip.embed.config import config_from_provenance
        from dfclip.heads.export import read_export

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} is not a file; give a detector written by `dfhead export RUN OUT.dfclip`")
        config = read_export(path)[0]
        with tempfile.TemporaryDirectory(prefix="dfclip-detector-") as tmp:
            config_from_provenance(config["provenance"], tmp)  # refuses a backbone it cannot rebuild, in one line
        return cls(path, config, device=device, workers=workers, precision=precision)

    @property
    def threshold(self) -> float:
        """The decision threshold in the calibrated scale (pred = 1 when score >= it, ties aside)."""
        from dfclip.heads.calibration import calibration_from_config

        return calibration_from_config(self.config).threshold

    def __call__(self, images, *, score_means: str = "fake", progress: bool = False,
                 log: Callable[[str], None] = lambda line: None) -> pl.DataFrame:
        """Scores of `images`: a folder or one file (path or str), a PIL image, or a list of paths and PIL images.

        Returns predict's table: path, score (calibrated P(fake); score_means="real": score_real = 1 - P(fake)),
        pred (1 fake, 0 real, at the run's threshold) and label (from real/fake folder names, -1 otherwise); a
        video is one row. A folder's rows are sorted by path (relative to it); a list's come in its order, a
        path as given and a PIL image as image-NNNNNN.png (its position). Files that cannot be read get no row.
        """
        from dfclip.pipeline import predict_images

        run = dict(device=self.device, workers=self.workers, progress=progress, precision=self.precision, log=log,
                   score_means=score_means)
        if isinstance(images, (str, os.PathLike)):
            return predict_images(self.path, images, **run)
        items = [images] if not isinstance(images, Sequence) else list(images)
        if not items:
            raise UserError("no images given")
        from dfclip.pipeline import TEMP_PREFIX

        # Named as predict's temporary stores, so a killed call's folder is removed by the next predict.
        with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
            names = _gather(items, Path(tmp))
            table = predict_images(self.path, tmp, **run)
        order = {link: i for i, link in enumerate(names)}
        given = [PIL_NAME.format(i) if not isinstance(x, (str, os.PathLike)) else str(x) for i, x in enumerate(items)]
        table = table.filter(pl.col("path").is_in(list(order)))
        index = table["path"].replace_strict(order, return_dtype=pl.Int64)
        return (table.with_columns(pl.Series("path", [given[i] for i in index]), index.alias("_order"))
                .sort("_order").drop("_order"))


def _gather(items: list, folder: Path) -> list[str]:
    """Put each item into `folder` under a name that keeps it apart and in order: a path as a link to it, a
    PIL image as a PNG (lossless, so it decodes to the same pixels); the names, in order."""
    from PIL import Image

    names = []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            name = PIL_NAME.format(i)
            item.save(folder / name)
        elif isinstance(item, (str, os.PathLike)):
            source = Path(item)
            if not source.is_file():
                raise UserError(f"{source} is not a file; give image files, PIL images, or one folder")
            name = f"{i:06d}-{source.name}"
            (folder / name).symlink_to(source.resolve())
        else:
            raise UserError(f"cannot score a {type(item).__name__}; give image paths or PIL images")
        names.append(name)
    return names
