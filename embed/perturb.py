"""Perturbations for robustness stores (`dfembed extract --perturb SPEC`).

    jpeg:75              re-encode as JPEG at quality 75 (1-100)
    resize:0.5           downscale by this factor (0-1], bicubic, before CLIP's own resize
    blur:1.0             Gaussian blur, radius (PIL's standard deviation) in pixels
    noise:0.02           add Gaussian noise of this standard deviation, as a fraction of 255
    jpeg:75+resize:0.5   applied left to right

A perturbation is applied to the decoded RGB image, before CLIP preprocessing. It is
deterministic: the noise of an image comes from a generator seeded by the canonical spec and
the image's path (relative to the input root), so a resumed run, another rank, or another
machine perturbs the image the same way. Detection papers report AUC under exactly such
degradations (UniversalFakeDetect; Cozzolino et al., "Raising the Bar of AI-generated Image
Detection with CLIP").
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageFilter

from dfclip.errors import UserError

# op -> (check of its value, what the value must be)
OPS = {
    "jpeg": (lambda v: float(v).is_integer() and 1 <= v <= 100, "an integer quality 1-100"),
    "resize": (lambda v: 0 < v <= 1, "a factor in (0, 1]"),
    "blur": (lambda v: v > 0, "a radius > 0 (pixels)"),
    "noise": (lambda v: 0 < v <= 1, "a standard deviation in (0, 1] (fraction of 255)"),
}


def parse_perturb(spec: str | None) -> list[tuple[str, float]]:
    """"jpeg:75+blur:1" -> [("jpeg", 75.0), ("blur", 1.0)]; "" or "none" -> []. UserError if bad."""
    text = (spec or "").strip().lower().replace(" ", "")
    if text in ("", "none"):
        return []
    steps = []
    for part in text.split("+"):
        op, _, value = part.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = None
        if op not in OPS or number is None or not np.isfinite(number) or not OPS[op][0](number):
            what = f"{op} takes {OPS[op][1]}" if op in OPS else f"use {', '.join(OPS)}"
            raise UserError(f"bad --perturb step {part!r} in {spec!r}; {what}, e.g. --perturb jpeg:75+resize:0.5")
        steps.append((op, number))
    return steps


def canonical(spec: str | None) -> str:
    """The spelling recorded in provenance: "JPEG:75.0 + blur:1" -> "jpeg:75+blur:1"; none -> ""."""
    return "+".join(f"{op}:{value:g}" for op, value in parse_perturb(spec))


class Perturb:
    """The callable (image, path) -> image of a spec; picklable for DataLoader workers."""

    def __init__(self, spec: str) -> None:
        self.spec = canonical(spec)
        self.steps = parse_perturb(self.spec)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, image: Image.Image, path: str) -> Image.Image:
        seed = int.from_bytes(hashlib.sha256(f"{self.spec}\0{path}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        for op, value in self.steps:
            image = _apply(op, value, image.convert("RGB"), rng)
        return image


def _apply(op: str, value: float, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if op == "jpeg":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(value))
        buf.seek(0)
        with Image.open(buf) as decoded:
            return decoded.convert("RGB")
    if op == "resize":
        size = (max(1, round(image.width * value)), max(1, round(image.height * value)))
        return image.resize(size, Image.Resampling.BICUBIC)
    if op == "blur":
        return image.filter(ImageFilter.GaussianBlur(value))
    if op == "noise":
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0.0, 255.0 * value, pixels.shape).astype(np.float32)
        return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8), "RGB")
    raise ValueError(f"unknown perturbation {op!r}")
