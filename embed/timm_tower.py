"""timm image towers (`--model timm:NAME`): DINOv2, DINOv3, PE, and any other timm image model.

A timm model is built with timm itself and preprocessed with timm's own data config
(`timm.data.resolve_data_config` + `create_transform`: resolution, mean/std, interpolation,
crop), so its features are the ones its authors' weights expect, not CLIP's.

Features (what `--feature` means for a timm tower):
  proj  the model's output as timm builds it for the named pretrained tag: the pooled token
        (timm's `global_pool`: class token, mean of patch tokens, or an attention pool) after
        `fc_norm` and `head`. For feature models (DINOv2, DINOv3) the head is Identity, so this
        is the pooled, normed token; for PE Core it is the CLIP image embedding (after the
        projection); for an ImageNet classifier tag it would be the logits.
  pre   the same pooled token before `head` (timm's `forward_head(pre_logits=True)`). It
        differs from proj only where the head is not Identity (PE's projection, a classifier).
Block features (`--layers`): the class token after block i (tap "resid"), or the output of
block i's second LayerNorm `norm2` (tap "ln2"), read with forward hooks during the one
forward pass that also gives the pooled feature; only the class token of each block is kept.

Names: "timm:ARCH" or "timm:ARCH.TAG" (any name of `timm.list_models()`), or a JSON file
{"timm": "ARCH[.TAG]", "kwargs": {...}} whose kwargs go to `timm.create_model` (e.g. a small
depth and width for tests); the kwargs are recorded so that the tower can be rebuilt.
Weights (`pretrained`): "none" (random init), a checkpoint file (loaded strictly: every key
must fit), or a tag: the one in the name, else the `pretrained` text itself, else timm's
default tag. Tagged weights are read from timm's caches (Hugging Face hub, torch hub), or
downloaded when a network answers; never a silent wait on an unreachable host.
"""

from __future__ import annotations

import difflib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import timm
import timm.data
import torch
from timm.models import get_pretrained_cfg, list_pretrained, split_model_name_tag
from torch import nn

from dfclip.errors import UserError
from dfclip.store.format import sha256_file

PREFIX = "timm:"
# `--pretrained` as EmbedConfig and the CLI leave it ("openai", an open_clip tag): for a timm name it
# means "the name's own tag" (timm's default tag when the name has none).
DEFAULT_PRETRAINED = "openai"
# The timm data-config keys that define the preprocessing (recorded in the provenance).
PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def is_timm_model(model: str | os.PathLike) -> bool:
    """True for "timm:NAME" and for a JSON file that names a timm model ({"timm": ...})."""
    text = str(model)
    if text.startswith(PREFIX):
        return True
    if text.lower().endswith(".json") and Path(text).expanduser().is_file():
        try:
            return "timm" in json.loads(Path(text).expanduser().read_text())
        except (OSError, ValueError):
            return False  # the open_clip path reports an unreadable config in one line
    return False


def resolve_spec(model: str | os.PathLike) -> tuple[str, dict[str, Any], str]:
    """(timm name with its tag if any, create_model kwargs, where it came from) for a timm model."""
    text = str(model)
    if text.startswith(PREFIX):
        name, kwargs, source = text[len(PREFIX):], {}, "timm"
    else:
        path = Path(text).expanduser()
        config = json.loads(path.read_text())
        name, kwargs, source = config["timm"], config.get("kwargs") or {}, f"config file {text}"
        if not isinstance(name, str) or not isinstance(kwargs, dict):
            raise UserError(f"timm model config {path} needs \"timm\": a model name and \"kwargs\": an object")
    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        known = timm.list_models()
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown timm model {arch!r}; {hint}(any name from timm.list_models())")
    return name, kwargs, source


class TimmTower(nn.Module):
    """A timm image model as dfclip's image tower: pooled features and per-block class tokens.

    image_size: (height, width) the preprocessing makes, which is what the face stage crops to.
    """

    def __init__(self, model: nn.Module, data_config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.image_size = tuple(int(s) for s in data_config["input_size"][1:])

    def forward(self, images: torch.Tensor, feature: str = "proj") -> torch.Tensor:
        x = self.model.forward_features(images)
        return self.model.forward_head(x, pre_logits=feature == "pre")

    def depth(self) -> int:
        return len(self.model.blocks)

    def width(self) -> int:
        return int(self.model.embed_dim)

    def supports_layers(self) -> bool:
        """Blocks in `blocks` and a class token at position 0 of every block's output."""
        return (isinstance(getattr(self.model, "blocks", None), nn.Sequential | nn.ModuleList)
                and getattr(self.model, "cls_token", None) is not None
                and getattr(self.model, "num_prefix_tokens", 0) >= 1)

    def tapped(self, block: int, tap: str) -> nn.Module:
        """The module whose output is block `block`'s feature (1-based): the block, or its norm2."""
        return self.model.blocks[block - 1] if tap == "resid" else self.model.blocks[block - 1].norm2

    def forward_with_blocks(self, images: torch.Tensor, feature: str, layers: tuple[int, ...],
                            tap: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, dim], class tokens [B, len(layers), width]) from one forward pass."""
        with class_tokens({b: self.tapped(b, tap) for b in layers}) as seen:
            pooled = self(images, feature)
        return pooled, torch.stack([seen[b] for b in layers], dim=1)


@contextmanager
def class_tokens(modules: dict[int, nn.Module], batch_first: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks that keep position 0 (the class token) of each module's output, by key.

    Only the class token is kept: holding every token of every block (as forward_intermediates
    does) costs blocks x tokens x width per image.
    """
    seen: dict[int, torch.Tensor] = {}

    def hook(key: int):
        def keep(_module, _inputs, output) -> None:
            seen[key] = output[:, 0] if batch_first else output[0]
        return keep

    handles = [module.register_forward_hook(hook(key)) for key, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def build(model: str | os.PathLike, pretrained: str | None, cache_dir) -> tuple[TimmTower, Any, dict[str, Any]]:
    """The tower, timm's eval transform, and the provenance entries that describe both.

    cache_dir: the Hugging Face cache to read (or download) tagged weights in; None = the default.
    """
    name, kwargs, source = resolve_spec(model)
    arch, name_tag = split_model_name_tag(name)
    weights = _resolve_weights(arch, name_tag, pretrained)
    full = f"{arch}.{weights['tag_of_config']}" if weights["tag_of_config"] else arch
    try:
        if weights["kind"] == "tag":
            net = _create_with_tag(full, weights, kwargs, cache_dir)
        else:
            net = timm.create_model(full, pretrained=False, **kwargs)
    except TypeError as e:  # a kwarg the model does not take
        raise UserError(f"timm cannot build {full} with {kwargs}: {str(e).splitlines()[0][:200]}") from None
    if weights["kind"] == "file":
        _load_file(net, weights["path"], full)
    data_config = _data_config(net)
    preprocess = timm.data.create_transform(**data_config, is_training=False)
    tower = TimmTower(net, data_config).requires_grad_(False).eval()
    record = {k: v for k, v in weights.items() if k not in ("path", "tag_of_config")}
    if weights["kind"] == "file":  # as for open_clip: identity by content, the path to find it again
        record.update(file=weights["path"].name, sha256=sha256_file(weights["path"]),
                      file_path=str(weights["path"].resolve()))
    provenance = {
        "library": "timm",
        "model": PREFIX + full,
        "model_source": source,
        "model_config": {"library": "timm", "name": full, "kwargs": kwargs},
        "pretrained": record,
        "preprocess": data_config,
        "head": type(net.get_classifier()).__name__ if hasattr(net, "get_classifier") else None,
        "pool": getattr(net, "global_pool", None) if isinstance(getattr(net, "global_pool", None), str) else None,
    }
    return tower, preprocess, provenance


def _resolve_weights(arch: str, name_tag: str, pretrained: str | None) -> dict[str, Any]:
    """{"kind": "none"|"file"|"tag", "tag_of_config": the tag whose pretrained config (preprocessing,
    head size) the model is built with, "tag", "source", "path"}."""
    from dfclip.embed.backbone import _looks_like_path  # the same path rules as for open_clip

    tags = [n.split(".", 1)[1] for n in list_pretrained(f"{arch}.*")]
    text = "none" if pretrained is None else str(pretrained).strip()
    if name_tag and name_tag not in tags:
        raise UserError(_unknown_tag(arch, name_tag, tags))
    default_tag = name_tag or (get_pretrained_cfg(arch).tag if tags and get_pretrained_cfg(arch) else "")
    if text.lower() in ("", "none"):
        return {"kind": "none", "tag_of_config": default_tag, "path": None}
    path = Path(text).expanduser()
    if path.is_file():
        return {"kind": "file", "tag_of_config": default_tag, "path": path}
    if path.exists():
        raise UserError(f"--pretrained {text} is a directory; pass the checkpoint file inside it")
    if _looks_like_path(text):
        raise UserError(f"checkpoint file not found: {path}; check the path given to --pretrained")
    if name_tag and text not in (name_tag, DEFAULT_PRETRAINED):
        raise UserError(f"timm:{arch}.{name_tag} names the tag {name_tag!r} and --pretrained names {text!r}; "
                        "give the tag once, in the name")
    tag = name_tag or (text if text in tags else default_tag if text == DEFAULT_PRETRAINED else None)
    if not tag:
        raise UserError(_unknown_tag(arch, text, tags))
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    return {"kind": "tag", "tag_of_config": tag, "tag": tag, "source": cfg.hf_hub_id or cfg.url or "", "path": None}


def _unknown_tag(arch: str, tag: str, tags: list[str]) -> str:
    if not tags:
        return (f"timm model {arch} has no pretrained tags, so {tag!r} is unknown; pass a checkpoint file with "
                "--pretrained PATH or --pretrained none")
    close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown timm pretrained tag {tag!r} for {arch}; {hint}known tags: {', '.join(tags)}"


def _create_with_tag(full: str, weights: dict, kwargs: dict, cache_dir) -> nn.Module:
    """timm's own pretrained loading (its filters and key conversions), from a cached file when there is one."""
    cfg = get_pretrained_cfg(full).to_dict()
    cached = cached_weights_file(cfg, cache_dir)
    options = ("use a local checkpoint file (--pretrained PATH), a cache dir that already holds these weights "
               "(--cache-dir DIR), or random init (--pretrained none)")
    if cached is not None:
        try:
            return timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": str(cached), "source": ""},
                                     **kwargs)
        except TypeError:
            raise  # a kwarg the model does not take: build() says so
        except Exception as e:  # e.g. kwargs that change the shapes the weights were trained with
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"the cached weights {cached} do not load into timm:{full} with {kwargs or 'no kwargs'} "
                            f"({reason}); drop the kwargs that change its shape, or use --pretrained none") from None
    where = f"cache dir {cache_dir}" if cache_dir else "timm's caches"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or not _reachable(cfg):
        raise UserError(f"no cached weights for timm:{full} in {where} and no network; {options}")
    try:
        return timm.create_model(full, pretrained=True, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"could not download weights for timm:{full} ({reason}); {options}") from None


def _reachable(cfg: dict) -> bool:
    from urllib.parse import urlparse

    from dfclip.embed.backbone import _host_reachable

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what we cannot; let the download try
    if cfg.get("hf_hub_id"):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        host = urlparse(cfg.get("url") or "").hostname
    return bool(host) and _host_reachable(host)


def cached_weights_file(cfg: dict, cache_dir=None) -> Path | None:
    """The already-downloaded weights of a timm pretrained config, where timm would have put them:
    the Hugging Face cache (safetensors first, as timm reads it) or torch hub's checkpoints folder."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                hit = try_to_load_from_cache(hub_id, filename, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if path.is_file():
            return path
    return None


def _load_file(net: nn.Module, path: Path, full: str) -> None:
    """Strictly: a checkpoint that does not fit is one UserError line, never a silent partial load."""
    from dfclip.embed.backbone import read_checkpoint

    state, _ = read_checkpoint(path)
    expected = net.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        first = f" (e.g. {wrong[0]}: checkpoint {tuple(state[wrong[0]].shape)} vs model " \
                f"{tuple(expected[wrong[0]].shape)})" if wrong else \
                f" (e.g. {(missing or unexpected)[0]})"
        raise UserError(f"checkpoint {path.name} does not fit timm:{full}: {len(missing)} missing keys, "
                        f"{len(unexpected)} unexpected keys, {len(wrong)} shape mismatches{first}; pass the "
                        "--model it was saved from")
    net.load_state_dict(state, strict=True)


def _data_config(net: nn.Module) -> dict[str, Any]:
    """timm's eval data config for `net`, at the input size the model was built for.

    timm reads the size from the pretrained config, which `img_size=` does not change; a model
    with a fixed input size is given images of that size.
    """
    args: dict[str, Any] = {}
    patch_embed = getattr(net, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(net, "dynamic_img_size", False):
        args["input_size"] = (3, *(int(s) for s in img_size))
    config = timm.data.resolve_data_config(args, model=net)
    return {k: config[k] for k in PREPROCESS_KEYS if k in config}
