"""The frozen image tower: a model name, weights and a feature kind in; model,
preprocess and provenance out.

open_clip names (and config files) are built by open_clip, as below; "timm:NAME" towers by
timm with timm's own preprocessing (embed.timm_tower). For open_clip,
everything is built by open_clip; this module only decides *what* to build and loads the
weights itself, so that it can (a) apply the QuickGELU rule below, (b) refuse a checkpoint
that does not fit instead of silently resizing it, and (c) never sit in a network timeout.

QuickGELU rule (`quick_gelu=None`, "auto"). OpenAI trained its CLIPs with QuickGELU, and
a model built with plain GELU runs those weights with the wrong activation and gives
subtly wrong features. open_clip 3.3 builds GELU unless the config says otherwise: it
only warns when a tag disagrees, and says nothing when the weights come from a file.
Auto picks QuickGELU when:
  1. the model config sets `quick_gelu` (the *-quickgelu configs), or
  2. a pretrained tag was named and open_clip records it as QuickGELU-trained
     ("openai", and also e.g. MetaCLIP, DFN, the LAION-400M ViT-B-32 runs), or
  3. the checkpoint is OpenAI's TorchScript archive, or
  4. no tag was named (a checkpoint file or "none") and the architecture is one OpenAI
     released (RN50, RN101, RN50x4/16/64, ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336):
     such a file is assumed to hold OpenAI's weights. Pass quick_gelu=False for a file
     of GELU-trained weights (e.g. a LAION ViT-L-14 checkpoint saved to disk).
Otherwise GELU. An explicit True/False always wins. The decision and its reason are
recorded in the provenance.

Preprocessing without a tag (random init or a checkpoint file): when every pretrained tag of
the architecture shares one preprocessing (PE Core, SigLIP, MobileCLIP: mean/std 0.5 or 0,
squash, bilinear), it is used, since weights of that architecture were trained with it;
otherwise (e.g. ViT-L-14, whose tags differ) the model config's own. Recorded as
`preprocess_from`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import socket
import threading
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import open_clip
import PIL
import torch
import torchvision
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.convert import convert_state_dict
from open_clip.model import convert_to_custom_text_state_dict
from open_clip.pretrained import has_hf_hub
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from torch import nn

from dfclip.embed import timm_tower
from dfclip.errors import UserError
from dfclip.store import format as fmt
from dfclip.store.format import sha256_file

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
FEATURES = ("proj", "pre")
# Where block features are taken (`--tap`): the residual stream after the block, or the output of
# the block's second LayerNorm (open_clip `ln_2`, timm `norm2`), where RINE reads them.
TAPS = ("resid", "ln2")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# Entries of OpenAI's TorchScript archives that are metadata, not weights.
OPENAI_ARCHIVE_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _register_model_configs() -> None:
    """Make every JSON in embed/model_configs/ a model name open_clip knows."""
    ours = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if not ours <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


_register_model_configs()


@dataclass
class Backbone:
    """A frozen image tower and everything needed to reproduce its features.

    visual: the image tower (eval mode, requires_grad False, fp32 weights): open_clip's
        VisionTransformer (or other tower), or a timm_tower.TimmTower.
    preprocess: the library's own eval transform for this model (PIL image -> tensor).
    dim: feature size (embed_dim for "proj", the tower width for "pre").
    feature: "proj" (the CLIP image embedding; a timm model's output) or "pre" (pooled, before
        the projection; before a timm model's head).
    provenance: JSON-serialisable description of model, weights, preprocess and versions.
    tap: where the `layers` block features are read ("resid" or "ln2", see TAPS).
    """

    visual: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    dim: int
    feature: str
    provenance: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    layers: tuple[int, ...] = ()  # 1-based blocks whose class token encode_with_layers also returns
    tap: str = "resid"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed batch [B, 3, H, W] -> float [B, dim].

        Raw features: NOT L2-normalised (the store keeps raw features; heads normalise if
        they want to). Precision is the caller's business (wrap in torch.autocast).
        """
        images = images.to(self.device, non_blocking=True)
        if isinstance(self.visual, timm_tower.TimmTower):
            features = self.visual(images, self.feature)
        elif self.feature == "pre":
            features = pre_projection(self.visual, images)
        else:
            features = self.visual(images)
            if isinstance(features, tuple):  # towers built with output_tokens
                features = features[0]
        return features.float()

    @torch.no_grad()
    def encode_with_layers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """encode(images) and, with `layers`, the class token after each of those blocks: float
        [B, len(layers), width] (None without layers), from the same single forward pass.

        The class token is position 0 of the residual stream leaving block i (tap "resid"; for the
        last block that is before ln_post and the projection), or of block i's ln_2 output (tap
        "ln2", read by a forward hook on ln_2 during the same pass). The loop is VisionTransformer.forward written
        out (embeddings, blocks, pool, projection) so each block's output can be read on the way.
        Not open_clip's forward_intermediates: it keeps every requested block's whole token map
        until it returns (for `--layers all` on ViT-L/14, 24 x B x 257 x 1024 values), where
        only the class token of each is needed.
        """
        if not self.layers:
            return self.encode(images), None
        images = images.to(self.device, non_blocking=True)
        visual = self.visual
        if isinstance(visual, timm_tower.TimmTower):
            pooled, tokens = visual.forward_with_blocks(images, self.feature, self.layers, self.tap)
            return pooled.float(), tokens.float()
        x = visual._embeds(images)
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        wanted, tokens = set(self.layers), []
        norms = {i: blocks[i - 1].ln_2 for i in self.layers} if self.tap == "ln2" else {}
        with timm_tower.class_tokens(norms, batch_first) as seen:
            for i, block in enumerate(blocks, start=1):
                x = block(x)
                if i in wanted:
                    tokens.append(seen.pop(i) if norms else x[:, 0] if batch_first else x[0])
        if not batch_first:
            x = x.transpose(0, 1)
        pooled, _ = visual._pool(x)
        if self.feature == "proj" and visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.float(), torch.stack(tokens, dim=1).float()


def transformer_depth(visual: nn.Module) -> int:
    """How many blocks a ViT image tower has (what `--layers all` means)."""
    if isinstance(visual, timm_tower.TimmTower):
        return visual.depth()
    return len(visual.transformer.resblocks)


class HostPreprocess:
    """The PIL part of an open_clip eval transform, ending in a uint8 HWC tensor (picklable for workers)."""

    def __init__(self, pil_steps: list) -> None:
        self.pil_steps = pil_steps

    def __call__(self, image) -> torch.Tensor:
        for step in self.pil_steps:
            image = step(image)
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())


class DevicePreprocess:
    """The tensor part: uint8 [B, H, W, 3] -> ToTensor's x/255 -> Normalize, on whatever device x is on."""

    def __init__(self, mean, std) -> None:
        # as_tensor: timm's Normalize holds tensors, open_clip's tuples
        self.mean = torch.as_tensor(mean, dtype=torch.float32).clone().view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).clone().view(1, 3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on `device`, copied there once: a copy per batch would be a blocking copy from
        pageable memory, which stops the host from queueing the next batch while the GPU works."""
        if device not in self._on_device:
            self._on_device[device] = (self.mean.to(device), self.std.to(device))
        return self._on_device[device]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div_(255)
        mean, std = self.constants(x.device)
        return x.sub_(mean).div_(std)


def split_preprocess(preprocess) -> tuple[HostPreprocess, DevicePreprocess] | None:
    """open_clip's eval transform as (host: PIL -> uint8, device: uint8 batch -> normalised float).

    Decode workers then ship one byte per value instead of four, and the pinned copy and the
    normalisation arithmetic move to the GPU; the result is the same float32 maths as
    ToTensor + Normalize. None when the transform does not end in (Maybe)ToTensor, Normalize.
    """
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2:
        return None
    *pil_steps, to_tensor, normalize = steps
    if type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor") or not isinstance(
            normalize, torchvision.transforms.Normalize):
        return None
    return HostPreprocess(pil_steps), DevicePreprocess(normalize.mean, normalize.std)


def pre_projection(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The pooled ViT output before `proj`: VisionTransformer.forward minus its last matmul.

    Reads the tower without modifying it (setting `visual.proj = None` would change the
    shared module for every other user of it).
    """
    x = visual._embeds(images)
    x = visual.transformer(x)
    pooled, _ = visual._pool(x)
    return pooled


def load_backbone(
    model: str = "ViT-L-14",
    pretrained: str | None = "openai",
    *,
    feature: str = "proj",
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    layers: str | None = None,
    tap: str = "resid",
) -> Backbone:
    """Build a frozen image tower with its eval preprocess and provenance.

    model: an open_clip model name ("ViT-L-14", "ViT-L/14" also works), a name from
        embed/model_configs/ ("dfclip-tiny"), a path to an open_clip model-config JSON, or a
        timm model: "timm:NAME[.TAG]" or a JSON {"timm": NAME, "kwargs": {...}} (embed.timm_tower).
    pretrained: an open_clip tag ("openai", "laion2b_s32b_b82k"), a checkpoint file
        (.safetensors, .pt/.pth/.bin state dict, or OpenAI's TorchScript archive), or
        "none" for random init. For timm: "none", a checkpoint file, or a timm tag (the one in
        the name; the default "openai" means the name's tag, or timm's default tag).
    feature: "proj" or "pre" (see Backbone).
    quick_gelu: None = auto (module docstring), True/False to force.
    cache_dir: where tagged weights are (or get downloaded to); None = open_clip's default.
    layers: a --layers spec ("8,16,24", "all", "every:4"; None or "" = none): the blocks whose class
        token encode_with_layers returns; recorded in the provenance as `layers` and `layer_width`.
    tap: where those block features are read, "resid" or "ln2" (TAPS); recorded as `tap` (always
        "resid" without layers, where nothing is tapped).
    Raises UserError for anything the user can fix.
    """
    if feature not in FEATURES:
        raise UserError(f"unknown feature {feature!r}; use one of {', '.join(FEATURES)}")
    if tap not in TAPS:
        raise UserError(f"unknown --tap {tap!r}; use one of {', '.join(TAPS)}")
    if timm_tower.is_timm_model(model):
        return _load_timm(model, pretrained, feature=feature, device=device, cache_dir=cache_dir,
                          layers=layers, tap=tap)
    name, model_source = resolve_model_name(model)
    weights = _resolve_pretrained(name, pretrained, cache_dir)
    state_dict, checkpoint_format = (None, None)
    if weights["path"] is not None:
        state_dict, checkpoint_format = read_checkpoint(weights["path"])
    use_quick_gelu, quick_gelu_reason = decide_quick_gelu(
        name, tag=weights.get("tag"), torchscript=checkpoint_format == "openai-torchscript",
        requested=quick_gelu,
    )

    # A tag's mean/std/interpolation/resize mode, exactly as open_clip would merge them;
    # the size always comes from the tower.
    tag_preprocess, preprocess_from = _tag_preprocess(name, weights)
    with _quiet_random_init_warning(state_dict is not None):
        clip = open_clip.create_model(
            name, pretrained=None, device="cpu", precision="fp32",
            force_preprocess_cfg=tag_preprocess, pretrained_text=False,
            quick_gelu=use_quick_gelu,  # model kwarg: overrides the config either way
        )
    if state_dict is not None:
        _load_state_dict(clip, state_dict, name, weights["path"])

    visual = clip.visual
    del clip  # the text tower is not needed
    if feature == "pre" and not _supports_pre(visual):
        raise UserError(
            f"feature 'pre' needs a ViT image tower with a linear projection, but {name} has "
            f"{type(visual).__name__}; use --feature proj"
        )
    blocks: list[int] = []
    if layers:
        if not _supports_layers(visual):
            raise UserError(f"--layers needs a ViT image tower with a class token, but {name} has "
                            f"{type(visual).__name__}; drop --layers")
        blocks = fmt.parse_layers(layers, transformer_depth(visual))
        if tap == "ln2" and not all(hasattr(visual.transformer.resblocks[b - 1], "ln_2") for b in blocks):
            raise UserError(f"--tap ln2 needs blocks with an ln_2 LayerNorm, which {name} lacks; use --tap resid")
    device = torch.device(device)
    visual.requires_grad_(False).eval().to(device)
    preprocess = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    model_config = open_clip.get_model_config(name)
    # Towers open_clip builds with timm (PE Core, ConvNeXt, EVA) have no output_dim: CLIP's embed_dim is it.
    dim = int(visual.proj.shape[0]) if feature == "pre" else int(getattr(visual, "output_dim", model_config["embed_dim"]))

    model_config["quick_gelu"] = use_quick_gelu
    weights_record = {k: v for k, v in weights.items() if k not in ("path", "tag_cfg")}
    if weights["path"] is not None:
        weights_record.update(file=weights["path"].name, format=checkpoint_format)
        if weights["kind"] == "file":
            weights_record["sha256"] = sha256_file(weights["path"])
            # Where it lay, so `dfhead predict` can re-embed images with the same weights; the
            # store's identity uses the hash, not this path.
            weights_record["file_path"] = str(Path(weights["path"]).resolve())
    provenance = {
        "library": "open_clip",
        "model": name,
        "model_source": model_source,
        "model_config": model_config,
        "quick_gelu": use_quick_gelu,
        "quick_gelu_reason": quick_gelu_reason,
        "pretrained": weights_record,
        "preprocess": dict(visual.preprocess_cfg),
        "preprocess_from": preprocess_from,
        **_feature_record(feature, dim, blocks, tap, int(visual.transformer.width) if blocks else 0,
                          open_clip=open_clip.__version__),
    }
    return Backbone(visual, preprocess, dim, feature, _jsonable(provenance), device, tuple(blocks),
                    tap if blocks else "resid")


def _feature_record(feature: str, dim: int, blocks: list[int], tap: str, width: int, **library: str) -> dict[str, Any]:
    """The provenance keys every tower shares: what is stored, and the versions that made it
    (`library`: the tower's own library and version, e.g. open_clip=...)."""
    return {
        "feature": feature,
        "dim": dim,
        "layers": blocks,
        "tap": tap if blocks else "resid",
        **({"layer_width": width} if blocks else {}),
        "normalized": False,
        "versions": {"torch": torch.__version__, **library, "torchvision": torchvision.__version__,
                     "pillow": PIL.__version__},
    }


def _tag_preprocess(name: str, weights: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The preprocessing open_clip is told to use (less the size, which the tower gives), and why.

    A tag's mean/std/interpolation/resize mode, exactly as open_clip would merge them. Without a
    tag, the one all of the architecture's tags share, if they share one (module docstring).
    """
    def of(tag_cfg: dict) -> dict[str, Any]:
        merged = merge_preprocess_dict({}, tag_cfg)
        merged.pop("size", None)
        return merged

    if weights["kind"] == "tag":
        return of(weights["tag_cfg"]), f"pretrained tag '{weights['tag']}'"
    tags = open_clip.list_pretrained_tags_by_model(name)
    shared = {json.dumps(of(open_clip.get_pretrained_cfg(name, t)), sort_keys=True) for t in tags}
    if len(shared) == 1 and (common := json.loads(shared.pop())):
        return common, f"shared by every pretrained tag of {name} ({len(tags)})"
    return {}, "model config"


def _load_timm(model: str, pretrained: str | None, *, feature: str, device, cache_dir, layers: str | None,
               tap: str) -> Backbone:
    """load_backbone for a timm model (embed.timm_tower)."""
    tower, preprocess, record = timm_tower.build(model, pretrained, cache_dir)
    name = record["model"]
    blocks: list[int] = []
    if layers:
        if not tower.supports_layers():
            raise UserError(f"--layers needs a ViT with a class token and a list of blocks, but {name} has "
                            f"{type(tower.model).__name__}; drop --layers")
        blocks = fmt.parse_layers(layers, tower.depth())
        if tap == "ln2" and not all(hasattr(tower.model.blocks[b - 1], "norm2") for b in blocks):
            raise UserError(f"--tap ln2 needs blocks with a norm2 LayerNorm, which {name} lacks; use --tap resid")
    device = torch.device(device)
    tower.to(device)
    size = tower.image_size
    with torch.no_grad():  # the feature size, from one blank image of the tower's input size
        dim = int(tower(torch.zeros(1, 3, *size, device=device), feature).shape[-1])
    provenance = {
        **record,
        **_feature_record(feature, dim, blocks, tap, tower.width() if blocks else 0, timm=timm_tower.timm.__version__),
    }
    return Backbone(tower, preprocess, dim, feature, _jsonable(provenance), device, tuple(blocks),
                    tap if blocks else "resid")


def resolve_model_name(model: str) -> tuple[str, str]:
    """An open_clip model name for `model`, and where its config came from.

    A path ending in .json is registered with open_clip's config registry under its
    file stem. Unknown names raise UserError with close matches.
    """
    if str(model).lower().endswith(".json"):
        return _register_config_file(Path(model).expanduser()), f"config file {model}"
    name = str(model).replace("/", "-")  # OpenAI spells them "ViT-L/14"
    known = open_clip.list_models()
    if name in known:
        source = "dfclip model_configs" if (MODEL_CONFIG_DIR / f"{name}.json").is_file() else "open_clip"
        return name, source
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(by_lower[c] for c in close)}? " if close else ""
    raise UserError(
        f"unknown model {model!r}; {hint}(any name from open_clip.list_models(), or a path "
        "to an open_clip model-config .json)"
    )


def _register_config_file(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"model config file not found: {path}; pass an existing .json or a model name")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read model config {path}: {e}; fix the JSON") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise UserError(
            f"model config {path} lacks {', '.join(missing)}; an open_clip config needs "
            "embed_dim, vision_cfg and text_cfg at the top level"
        )
    name = path.stem
    registered = open_clip.get_model_config(name)
    if registered is None:
        open_clip.add_model_config(path)
    elif registered != config:
        # Registering it would silently replace a different model of the same name.
        raise UserError(
            f"model config {path} is named {name!r}, which is already a different model; "
            "rename the file"
        )
    return name


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # as open_clip normalises tags


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text or os.sep in text or text.startswith(("~", "."))
        or Path(text).suffix.lower() in CHECKPOINT_SUFFIXES
    )


def _resolve_pretrained(name: str, pretrained: str | None, cache_dir) -> dict[str, Any]:
    """{"kind": "none"|"file"|"tag", "path": Path|None, "tag_cfg": dict, ...}."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none"):
        return {"kind": "none", "path": None, "tag_cfg": {}}
    text = str(pretrained)
    path = Path(text).expanduser()
    if path.is_file():
        return {"kind": "file", "path": path, "tag_cfg": {}}
    if path.exists():
        raise UserError(f"--pretrained {text} is a directory; pass the checkpoint file inside it")
    if _looks_like_path(text):
        raise UserError(f"checkpoint file not found: {path}; check the path given to --pretrained")
    tag_cfg = open_clip.get_pretrained_cfg(name, text)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise UserError(
                f"model {name} has no open_clip pretrained tags, so {text!r} is unknown; pass a "
                "checkpoint file with --pretrained PATH or --pretrained none"
            )
        close = difflib.get_close_matches(_clean_tag(text), tags, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown pretrained tag {text!r} for {name}; {hint}known tags: {', '.join(tags)}"
        )
    tag = _clean_tag(text)
    return {
        "kind": "tag", "tag": tag, "source": tag_cfg.get("hf_hub") or tag_cfg.get("url", ""),
        "path": _tag_weights_file(name, tag, tag_cfg, cache_dir), "tag_cfg": tag_cfg,
    }


def _tag_weights_file(name: str, tag: str, tag_cfg: dict, cache_dir) -> Path:
    """The local file for a tag: from the cache, else downloaded when a network is there.

    The cache is checked first and the network probed with a short timeout, because
    huggingface_hub retries an unreachable host for about 45 s before giving up.
    """
    cached = cached_tag_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    where = f"cache dir {cache_dir}" if cache_dir else "the default cache"
    options = (
        "use a local checkpoint file (--pretrained PATH), a cache dir that already holds "
        "these weights (--cache-dir DIR), or random init (--pretrained none)"
    )
    if _offline(tag_cfg):
        raise UserError(f"no cached weights for {name} '{tag}' in {where} and no network; {options}")
    try:
        return Path(open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir))
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"could not download weights for {name} '{tag}' ({reason}); {options}") from None


def cached_tag_file(tag_cfg: dict, cache_dir=None) -> Path | None:
    """The already-downloaded weights file of an open_clip pretrained config, or None.

    Looks where open_clip's download_pretrained would put it: the Hugging Face cache
    (safetensors preferred, as open_clip does) and the URL cache (~/.cache/clip).
    """
    if tag_cfg.get("file"):
        path = Path(tag_cfg["file"])
        return path if path.is_file() else None
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub and has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            hit = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = tag_cfg.get("url", "")
    if url:
        root = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        path = root / os.path.basename(url)
        if path.is_file():
            return path
    return None


def _offline(tag_cfg: dict) -> bool:
    """HF_HUB_OFFLINE is set, or the weights' host does not answer within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # a proxy may reach what we cannot; let the download try
    if tag_cfg.get("hf_hub") and has_hf_hub():
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(tag_cfg.get("url", "")).hostname
    return not host or not _host_reachable(host)


def _host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to host within `timeout` seconds, DNS included?

    The socket timeout does not cover name resolution, hence the daemon thread.
    """
    answer: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answer and answer[0])


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (how OpenAI released CLIP): it holds a constants.pkl,
    which torch.save checkpoints never do (the same test torch.load uses)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint file's state dict (on CPU) and its format.

    Formats: "safetensors"; "torch" (torch.save state dict, read with weights_only=True,
    possibly nested under "state_dict" and/or prefixed "module."); "openai-torchscript"
    (OpenAI's archive, read with torch.jit.load on CPU; its metadata entries dropped, as
    open_clip's own OpenAI loader does).
    """
    path = Path(path)
    try:
        if is_torchscript_archive(path):
            with warnings.catch_warnings():  # torch.jit's deprecation notice is not for our user
                warnings.simplefilter("ignore", FutureWarning)
                state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            for key in OPENAI_ARCHIVE_EXTRA_KEYS:
                state.pop(key, None)
            fmt = "openai-torchscript"
        elif path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state, fmt = load_file(str(path), device="cpu"), "safetensors"
        else:
            state, fmt = torch.load(path, map_location="cpu", weights_only=True), "torch"
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint {path} holds Python objects besides tensors and is not loaded "
            "(weights_only); re-save it as a plain state dict or .safetensors"
        ) from None
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"cannot read checkpoint {path} ({reason}); pass an open_clip/OpenAI CLIP checkpoint"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap it
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} is not a state dict of tensors; pass a CLIP model checkpoint")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, fmt


def _load_state_dict(clip: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """Load strictly; on any missing/extra/mis-shaped tensor raise one UserError line.

    No position-embedding resizing (open_clip would interpolate silently): a feature
    store must come from exactly the weights it names.
    """
    # The same key conversions open_clip's load_checkpoint applies.
    state = convert_state_dict(clip, state)  # third-party layouts (e.g. Apple MobileCLIP)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # old layout -> CustomTextCLIP
    expected = clip.state_dict()
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(
        (k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape),
        key=lambda k: (not k.startswith("visual."), k),  # show an image-tower key first
    )
    if missing or unexpected or wrong:
        first = ""
        if wrong:
            k = wrong[0]
            first = f" (e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        guess = guess_architecture(state)
        hint = (f"; it looks like a {guess} checkpoint, try --model {guess}" if guess
                else "; pass the --model it was trained as")
        raise UserError(
            f"checkpoint {path.name} does not fit model {name}: {len(missing)} missing keys, "
            f"{len(unexpected)} unexpected keys, {len(wrong)} shape mismatches{first}{hint}"
        )
    clip.load_state_dict(state, strict=True)


def guess_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The registered ViT model whose image-tower shapes match a CLIP state dict, if any."""
    try:
        conv = state["visual.conv1.weight"]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        found = {
            "width": conv.shape[0], "patch_size": conv.shape[-1], "image_size": conv.shape[-1] * grid,
            "layers": len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")}),
            "embed_dim": state["visual.proj"].shape[1],
        }
    except (KeyError, IndexError):
        return None
    for name in sorted(open_clip.list_models(), key=lambda n: ("quickgelu" in n, len(n))):
        cfg = open_clip.get_model_config(name)
        vision = cfg.get("vision_cfg", {})
        if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
            continue
        have = {k: vision.get(k) for k in ("width", "patch_size", "image_size", "layers")}
        have["embed_dim"] = cfg.get("embed_dim")
        if have == found:
            return name
    return None


def decide_quick_gelu(
    name: str, *, tag: str | None = None, torchscript: bool = False, requested: bool | None = None
) -> tuple[bool, str]:
    """Whether to build `name` with QuickGELU, and why (the rule is in the module docstring)."""
    if requested is not None:
        return bool(requested), "explicitly requested"
    if (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return True, f"model config {name} sets quick_gelu"
    if tag:
        trained = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
        return trained, f"pretrained tag '{tag}' was trained with {'QuickGELU' if trained else 'GELU'}"
    if torchscript:
        return True, "OpenAI TorchScript archive (OpenAI trained with QuickGELU)"
    if name in open_clip.list_openai_models():
        return True, f"{name} is an OpenAI-released architecture and no tag was named: assumed OpenAI weights"
    return False, "GELU (model config default)"


def _supports_layers(visual: nn.Module) -> bool:
    return isinstance(visual, VisionTransformer) and getattr(visual, "class_embedding", None) is not None


def _supports_pre(visual: nn.Module) -> bool:
    return (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and isinstance(getattr(visual, "proj", None), torch.Tensor)
    )


@contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip logs "initialized randomly" when we build first and load weights after."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        if active:
            root.removeFilter(keep)


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, numbers stay numbers, so json.dumps(provenance) round-trips."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
