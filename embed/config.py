"""EmbedConfig: every setting of the backbone pass as data.

    from dfclip.embed import EmbedConfig, extract
    extract("images", "embeddings", EmbedConfig(model="ViT-L-14", pretrained="openai"))

It is recorded in each shard's provenance (`embed_config`), so `config_from_provenance` can
embed new images exactly as a store (or the store a run was trained on) was embedded. Which
embeddings are comparable is still decided by store.format's identity keys, never by this
record: device, workers or batch size do not change what a feature means.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfclip.errors import UserError
from dfclip.store import format as fmt

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TAPS = ("resid", "ln2")  # embed.backbone.TAPS
FACE_MODES = ("none", "largest", "all")
FACE_FALLBACKS = ("none", "center")
# Settings of the machine that runs the pass, not of the embedding: never taken from a record.
# (`detections` names another store's detection cache: an input of one run, not a setting.)
MACHINE_FIELDS = ("device", "batch_size", "workers", "detections")


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed images. Validated on construction (UserError).

    model: an open_clip model name ("ViT-L-14"), a name from embed/model_configs/
        ("dfclip-tiny"), a path to an open_clip model-config JSON, or a timm model
        ("timm:vit_large_patch14_dinov2.lvd142m", or a JSON {"timm": NAME, "kwargs": {...}}).
    pretrained: an open_clip tag ("openai"), a checkpoint file, or "none" (random init). For a
        timm model the tag is the one in its name (this default means: that tag).
    feature: "proj" (the CLIP image embedding; a timm model's output) or "pre" (pooled, before
        the projection; before a timm model's head).
    quick_gelu: None = auto (embed.backbone's rule), True/False to force.
    cache_dir: where tagged weights are cached / downloaded; None = open_clip's default.
    precision: "auto" (fp16 autocast on CUDA, fp32 elsewhere),
        "fp32", "bf16" or "fp16".
    device: "auto", "cpu", "cuda" or "cuda:N" (torchrun ranks use LOCAL_RANK).
    batch_size: images per batch; None = 256 on CUDA, 64 on CPU.
    workers: decode processes per rank, 0 = decode in the main process; None = the cores per
        rank minus one, at most 16.
    shard_size: rows per HDF5 shard (a killed run redoes at most one shard).
    dtype: stored embedding dtype, "float16" or "float32".
    layers: also store the class token after these transformer blocks ("8,16,24", "all", "every:4";
        "" = none) as features/block{i}; part of the store's identity.
    tap: where those block features are read: "resid" (the residual stream after the block) or
        "ln2" (the output of the block's second LayerNorm, as RINE reads them); part of the
        store's identity. Without layers nothing is tapped, and it is kept as "resid".
    perturb: degrade every decoded image before preprocessing ("jpeg:75", "resize:0.5", "blur:1",
        "noise:0.02", composed with +; "" = none; embed.perturb), deterministically per path, for
        robustness stores; recorded in canonical form and part of the store's identity.
    frames: frames taken from each video, spread evenly over it (embed.video.sample_positions);
        None = every frame. frame_stride: every S-th frame instead (overrides frames).
    faces: "none" (the whole image or frame), "largest" (the largest detected face) or "all" (one
        row per face). Faces are found by `face_detector` (embed.faces.DETECTORS), aligned on their
        5 landmarks, cropped with margin `face_scale` and made at the model's input size.
        min_face_score / min_face_size (pixels, the box's shorter side) filter detections;
        face_fallback "center" takes a centre crop of a frame without a face (n_faces 0) instead of
        recording the failure "no_face". detections: a store whose detection cache to reuse.
    """

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    feature: str = "proj"
    quick_gelu: bool | None = None
    cache_dir: str | None = None
    precision: str = "auto"
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    shard_size: int = 16384
    dtype: str = "float16"
    layers: str = ""
    tap: str = "resid"
    perturb: str = ""
    frames: int | None = 32
    frame_stride: int | None = None
    faces: str = "none"
    face_detector: str = "mtcnn"
    face_scale: float = 1.3
    min_face_score: float = 0.9
    min_face_size: float = 0.0
    face_fallback: str = "none"
    detections: str | None = None

    def __post_init__(self) -> None:
        # Paths given as PathLike are kept as text: the config is recorded as JSON.
        for name in ("model", "pretrained", "cache_dir"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, str(value))
        if not isinstance(self.layers, str):  # a list of block numbers reads as its spec
            object.__setattr__(self, "layers", ",".join(map(str, self.layers)))
        from dfclip.embed.perturb import canonical

        object.__setattr__(self, "perturb", canonical(self.perturb))
        if self.tap not in TAPS:
            raise UserError(f"unknown --tap {self.tap!r}; use one of {', '.join(TAPS)}")
        if not self.layers:  # nothing is tapped (and a record's tap must not outlive its layers)
            object.__setattr__(self, "tap", "resid")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        fmt.check_layout(self.dtype, self.shard_size)
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        self._check_video_and_faces()

    def _check_video_and_faces(self) -> None:
        if isinstance(self.frames, str):
            from dfclip.embed.video import parse_frames

            object.__setattr__(self, "frames", parse_frames(self.frames))
        if self.frames is not None and (not isinstance(self.frames, int) or self.frames < 1):
            raise UserError(f"--frames must be a number >= 1 or all, got {self.frames!r}")
        if self.frame_stride is not None and self.frame_stride < 1:
            raise UserError(f"--frame-stride must be >= 1, got {self.frame_stride}")
        if self.faces not in FACE_MODES:
            raise UserError(f"unknown --faces {self.faces!r}; use one of {', '.join(FACE_MODES)}")
        if self.face_fallback not in FACE_FALLBACKS:
            raise UserError(f"unknown --face-fallback {self.face_fallback!r}; use one of {', '.join(FACE_FALLBACKS)}")
        if self.face_fallback == "center" and self.faces != "largest":
            raise UserError("--face-fallback center needs --faces largest (one crop per frame)")
        if not (math.isfinite(self.face_scale) and self.face_scale >= 1.0):
            raise UserError(f"--face-scale must be a number >= 1 (1.3 = a 30% margin), got {self.face_scale}")
        if not (math.isfinite(self.min_face_score) and 0.0 <= self.min_face_score <= 1.0):
            raise UserError(f"--min-face-score must be in [0, 1], got {self.min_face_score}")
        if not (math.isfinite(self.min_face_size) and self.min_face_size >= 0):
            raise UserError(f"--min-face-size must be >= 0 pixels, got {self.min_face_size}")
        if self.detections is not None and self.faces == "none":
            raise UserError("--detections reuses face detections: add --faces largest or --faces all")

    def video_settings(self) -> dict[str, Any]:
        """How frames are taken from videos: part of the store's identity (provenance "video")."""
        return {"frames": None if self.frame_stride else self.frames, "stride": self.frame_stride}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable record kept in the store's provenance."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "EmbedConfig":
        """A config from its record; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def config_from_provenance(provenance: dict, workdir: str | os.PathLike) -> EmbedConfig:
    """The EmbedConfig that embeds new images exactly as the store of `provenance` was embedded.

    The recorded `embed_config` gives the settings (precision, dtype, cache dir ...; stores
    written before it was recorded get the defaults), less MACHINE_FIELDS, which are left at
    their defaults for the caller to set. Model, weights, feature and QuickGELU come from the
    provenance itself, which says what was actually built: a model that came from a config
    file is re-registered from the recorded config (written into `workdir`; for a timm model, a
    JSON of its name and create_model kwargs); a checkpoint file
    must still exist where it was and have the same sha256. Raises UserError when the
    provenance cannot rebuild its backbone (imported or synthetic embeddings).
    """
    import open_clip

    import dfclip.embed.backbone  # noqa: F401  registers embed/model_configs with open_clip

    name = provenance.get("model")
    if not name:
        raise UserError("this run's provenance names no model (imported or synthetic embeddings?); "
                        "embed the images yourself with `dfembed extract` and use `dfhead predict RUN --store`")
    model = name
    timm_config = provenance.get("model_config") or {}
    if provenance.get("library") == "timm":
        if timm_config.get("kwargs"):  # rebuilt from its recorded name and create_model kwargs
            model = str(Path(workdir) / "timm-model.json")
            Path(model).write_text(json.dumps({"timm": timm_config["name"], "kwargs": timm_config["kwargs"]}))
    elif name not in open_clip.list_models():
        if not provenance.get("model_config"):
            raise UserError(f"model {name!r} of this run is not an open_clip name and its config was not recorded; "
                            "embed the images yourself and use `dfhead predict RUN --store`")
        cfg = {k: v for k, v in provenance["model_config"].items() if k != "quick_gelu"}
        model = str(Path(workdir) / f"{name}.json")
        Path(model).write_text(json.dumps(cfg))
    weights = provenance.get("pretrained") or {}
    if isinstance(weights, str):  # an imported store declares a tag (or "none") as a plain string
        weights = {"kind": "none"} if weights.lower() == "none" else {"kind": "tag", "tag": weights}
    kind = weights.get("kind")
    if kind == "tag":
        pretrained = weights["tag"]
    elif kind == "none":
        pretrained = "none"
    elif kind == "file":
        pretrained = weights.get("file_path") or ""
        if not Path(pretrained).is_file():
            raise UserError(f"the run's checkpoint {weights.get('file')} is no longer at {pretrained or '?'}; put it back "
                            "or embed with `dfembed extract --pretrained PATH` and use `dfhead predict RUN --store`")
        if fmt.sha256_file(pretrained) != weights.get("sha256"):
            raise UserError(f"{pretrained} changed since the run was trained (sha256 differs); restore the original "
                            "checkpoint or retrain")
    else:
        raise UserError("this run's provenance does not say which weights made its embeddings; "
                        "embed the images yourself and use `dfhead predict RUN --store`")
    recorded = {k: v for k, v in (provenance.get("embed_config") or {}).items() if k not in MACHINE_FIELDS}
    if recorded.get("cache_dir") and not Path(recorded["cache_dir"]).is_dir():
        recorded["cache_dir"] = None  # gone since: open_clip's default cache, as for any other run
    return dataclasses.replace(EmbedConfig.from_dict(recorded), model=model, pretrained=pretrained,
                               feature=provenance.get("feature", "proj"), quick_gelu=provenance.get("quick_gelu"),
                               layers=",".join(map(str, provenance.get("layers") or [])),
                               tap=provenance.get("tap", "resid"),
                               perturb="")  # new images are scored as they are, never degraded
