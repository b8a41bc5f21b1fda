"""embed.backbone: model/checkpoint resolution, QuickGELU rule, parity with open_clip."""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from dfclip.embed import backbone as backbone_mod
from dfclip.embed.backbone import (
    cached_tag_file,
    decide_quick_gelu,
    is_torchscript_archive,
    load_backbone,
    read_checkpoint,
    resolve_model_name,
)
from dfclip.errors import UserError

TINY_TEXT = {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 1}


def write_config(directory: Path, name: str, *, width: int = 64, head_width: int = 64, **extra) -> Path:
    """A tiny open_clip config JSON (head_width 64 = the layout OpenAI's loader infers)."""
    vision = {"image_size": 64, "layers": 2, "width": width, "head_width": head_width, "patch_size": 8}
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision, "text_cfg": TINY_TEXT, **extra}))
    return path


def sample_images() -> list[Image.Image]:
    """Two real photographs (scikit-learn's samples) and generated images of odd shapes."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (90, 30, 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, 200 * 120).reshape(120, 200).astype(np.uint8)
    gradient = Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 60)], -1))
    return photos + [noise, gradient]




def activations(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, (nn.GELU, QuickGELU))}


# ---- checkpoints ---------------------------------------------------------------------


def test_safetensors_checkpoint_loads_exact_weights(tiny_checkpoint, tiny_model_name):
    bb = load_backbone(tiny_model_name, str(tiny_checkpoint))
    saved = load_file(str(tiny_checkpoint))
    visual = bb.visual.state_dict()
    assert visual.keys() == {k[len("visual."):] for k in saved if k.startswith("visual.")}
    for key, value in visual.items():
        assert torch.equal(value, saved["visual." + key]), key
    assert bb.dim == 32 and bb.feature == "proj"
    assert not bb.visual.training and not any(p.requires_grad for p in bb.visual.parameters())
    record = bb.provenance["pretrained"]
    assert record["kind"] == "file" and record["file"] == tiny_checkpoint.name
    assert record["format"] == "safetensors"
    assert record["sha256"] == backbone_mod.sha256_file(tiny_checkpoint)
    assert json.loads(json.dumps(bb.provenance)) == bb.provenance


def test_pt_checkpoint_nested_and_module_prefixed(tiny_checkpoint, tiny_model_name, tmp_path):
    saved = load_file(str(tiny_checkpoint))
    wrapped = tmp_path / "train_ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in saved.items()}}, wrapped)
    plain = tmp_path / "plain.bin"
    torch.save(saved, plain)
    for path, fmt in ((wrapped, "torch"), (plain, "torch")):
        bb = load_backbone(tiny_model_name, str(path))
        assert torch.equal(bb.visual.proj, saved["visual.proj"])
        assert torch.equal(bb.visual.conv1.weight, saved["visual.conv1.weight"])
        assert bb.provenance["pretrained"]["format"] == fmt


def test_pickled_objects_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": load_file(str(tiny_checkpoint)), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UserError, match="weights_only"):
        read_checkpoint(path)


def test_mismatched_checkpoint_names_the_problem(tiny_checkpoint, tmp_path):
    wide = write_config(tmp_path, "dfclip-test-wide", width=128)
    with pytest.raises(UserError) as err:
        load_backbone(str(wide), str(tiny_checkpoint))
    message = str(err.value)
    assert "does not fit model dfclip-test-wide" in message and "\n" not in message
    assert "shape mismatches" in message and "0 shape mismatches" not in message
    assert "dfclip-tiny" in message  # the architecture the checkpoint was built for


def test_missing_checkpoint_file(tiny_model_name, tmp_path):
    with pytest.raises(UserError, match="checkpoint file not found"):
        load_backbone(tiny_model_name, str(tmp_path / "nope.safetensors"))


def test_random_init_and_provenance(tiny_model_name):
    bb = load_backbone(tiny_model_name, "none")
    out = bb.encode(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32) and out.dtype == torch.float32
    assert bb.provenance["pretrained"] == {"kind": "none"}
    assert bb.provenance["preprocess"]["size"] == [64, 64]
    assert bb.provenance["model_config"]["vision_cfg"]["width"] == 64
    assert {"torch", "open_clip"} <= bb.provenance["versions"].keys()


def test_config_json_path(tiny_checkpoint, tmp_path):
    path = write_config(tmp_path, "dfclip-test-json", head_width=32)
    config = json.loads(path.read_text())
    bb = load_backbone(str(path), "none")
    assert bb.provenance["model"] == "dfclip-test-json"
    assert bb.provenance["model_config"] == {**config, "quick_gelu": False}
    assert len(bb.visual.transformer.resblocks) == 2


def test_config_json_may_not_shadow_another_model(tmp_path):
    with pytest.raises(UserError, match="rename the file"):
        resolve_model_name(str(write_config(tmp_path, "ViT-B-32")))
    assert open_clip.get_model_config("ViT-B-32")["vision_cfg"]["width"] == 768  # untouched


def test_unknown_model_suggests(tiny_model_name):
    with pytest.raises(UserError, match="did you mean .*ViT-L-14"):
        load_backbone("ViT-L-41", "none")
    with pytest.raises(UserError, match="dfclip-tiny"):
        load_backbone("dfclip-tiyn", "none")
    assert resolve_model_name("ViT-L/14")[0] == "ViT-L-14"


def test_unknown_tag_suggests():
    with pytest.raises(UserError, match="did you mean openai"):
        load_backbone("ViT-B-32", "opneai")


# ---- tags, cache, offline ------------------------------------------------------------


def test_offline_tag_without_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_backbone("ViT-B-32", "openai", cache_dir=tmp_path / "empty")
    assert time.monotonic() - start < 5
    message = str(err.value)
    for option in ("--pretrained PATH", "--cache-dir", "--pretrained none"):
        assert option in message


def test_unreachable_network_fails_fast_without_env(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    probed = []
    monkeypatch.setattr(backbone_mod, "_host_reachable", lambda host: probed.append(host) or False)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(UserError, match="no network"):
        load_backbone("ViT-L-14", "openai", cache_dir=tmp_path)
    assert probed == ["huggingface.co"]


def fake_hf_cache(cache_dir: Path, hf_hub: str, filename: str, source: Path) -> Path:
    """Lay a file out the way huggingface_hub caches it (refs/main -> snapshot)."""
    repo_id = hf_hub.rstrip("/")
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / filename).write_bytes(source.read_bytes())
    return snapshot / filename


def test_cached_tag_file_finds_hf_and_url_caches(tiny_checkpoint, tmp_path):
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert cached_tag_file(cfg, tmp_path) is None
    url_file = tmp_path / Path(cfg["url"]).name  # where open_clip's URL download lands
    url_file.write_bytes(b"x")
    assert cached_tag_file(cfg, tmp_path) == url_file
    hf_file = fake_hf_cache(tmp_path, cfg["hf_hub"], "open_clip_model.safetensors", tiny_checkpoint)
    assert cached_tag_file(cfg, tmp_path) == hf_file  # the hub copy wins, as in open_clip


def test_cached_tag_is_used_and_checked(tiny_checkpoint, tmp_path, monkeypatch):
    """A tag resolves to its cached file without network; wrong weights are refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    fake_hf_cache(tmp_path, cfg["hf_hub"], "open_clip_model.safetensors", tiny_checkpoint)
    with pytest.raises(UserError, match="does not fit model ViT-B-32.*try --model dfclip-tiny"):
        load_backbone("ViT-B-32", "openai", cache_dir=tmp_path)


# ---- QuickGELU -----------------------------------------------------------------------


def test_default_vit_l14_is_built_with_quickgelu():
    """The default model (ViT-L-14, OpenAI weights) must run QuickGELU, which open_clip's
    plain ViT-L-14 config would not give. Same build path as with weights, random init."""
    assert not open_clip.get_model_config("ViT-L-14").get("quick_gelu")
    assert decide_quick_gelu("ViT-L-14", tag="openai")[0] is True
    bb = load_backbone("ViT-L-14", "none")
    assert activations(bb.visual) == {QuickGELU}
    assert bb.provenance["quick_gelu"] is True
    assert bb.provenance["model_config"]["quick_gelu"] is True
    assert "OpenAI" in bb.provenance["quick_gelu_reason"]
    assert bb.dim == 768 and bb.provenance["preprocess"]["size"] == [224, 224]


def test_quickgelu_rule_table():
    assert decide_quick_gelu("ViT-L-14", tag="laion2b_s32b_b82k")[0] is False
    assert decide_quick_gelu("ViT-B-32", tag="laion400m_e32")[0] is True  # open_clip records it
    assert decide_quick_gelu("ViT-B-32-quickgelu")[0] is True
    assert decide_quick_gelu("ViT-B-16")[0] is True  # file/none + OpenAI architecture
    assert decide_quick_gelu("ViT-L-14", requested=False) == (False, "explicitly requested")
    assert decide_quick_gelu("dfclip-tiny")[0] is False
    assert decide_quick_gelu("dfclip-tiny", torchscript=True)[0] is True


def test_quickgelu_auto_and_override_on_tiny(tiny_model_name):
    auto = load_backbone(tiny_model_name, "none")
    forced = load_backbone(tiny_model_name, "none", quick_gelu=True)
    assert activations(auto.visual) == {nn.GELU} and auto.provenance["quick_gelu"] is False
    assert activations(forced.visual) == {QuickGELU} and forced.provenance["quick_gelu"] is True


def test_quickgelu_from_config_and_explicit_off(tmp_path):
    config = str(write_config(tmp_path, "dfclip-test-quickgelu", quick_gelu=True))
    auto = load_backbone(config, "none")
    off = load_backbone(config, "none", quick_gelu=False)
    assert activations(auto.visual) == {QuickGELU} and "config" in auto.provenance["quick_gelu_reason"]
    assert activations(off.visual) == {nn.GELU}
    assert off.provenance["model_config"]["quick_gelu"] is False


# ---- parity with open_clip -----------------------------------------------------------


def test_encode_matches_open_clip_pipeline(tiny_checkpoint, tiny_model_name):
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(
        tiny_model_name, pretrained=str(tiny_checkpoint)
    )
    ref_model.eval()
    bb = load_backbone(tiny_model_name, str(tiny_checkpoint))
    images = sample_images()
    ours = torch.stack([bb.preprocess(im) for im in images])
    theirs = torch.stack([ref_preprocess(im) for im in images])
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        expected = ref_model.encode_image(theirs)
    features = bb.encode(ours)
    torch.testing.assert_close(features, expected)
    assert features.std(0).min() > 0  # distinct images give distinct features
    # Not normalised: the store keeps raw features.
    assert not torch.allclose(features.norm(dim=-1), torch.ones(len(images)))


def test_pre_feature_is_pooled_output_before_projection(tiny_checkpoint, tiny_model_name):
    proj = load_backbone(tiny_model_name, str(tiny_checkpoint))
    pre = load_backbone(tiny_model_name, str(tiny_checkpoint), feature="pre")
    x = torch.stack([pre.preprocess(im) for im in sample_images()])
    pre_features = pre.encode(x)
    assert pre.dim == 64 == pre_features.shape[1] and pre.provenance["dim"] == 64
    # Independently: the class token after ln_post, captured from open_clip's own forward.
    captured = {}
    hook = proj.visual.ln_post.register_forward_hook(lambda m, i, o: captured.update(out=o))
    proj_features = proj.encode(x)
    hook.remove()
    torch.testing.assert_close(pre_features, captured["out"][:, 0])
    torch.testing.assert_close(pre_features @ pre.visual.proj, proj_features)
    assert pre.visual.proj is not None  # the tower was not modified


def test_pre_feature_refused_for_resnet_tower(tmp_path):
    path = tmp_path / "dfclip-test-rn.json"
    vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64}
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision, "text_cfg": TINY_TEXT}))
    with pytest.raises(UserError, match="--feature proj"):
        load_backbone(str(path), "none", feature="pre")


def test_preprocess_pickles_for_dataloader_workers(tiny_model_name):
    import pickle

    bb = load_backbone(tiny_model_name, "none")
    image = sample_images()[2]
    assert torch.equal(pickle.loads(pickle.dumps(bb.preprocess))(image), bb.preprocess(image))


# ---- OpenAI TorchScript archive ------------------------------------------------------


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_openai_style_archive(model: nn.Module, path: Path, image_size: int) -> None:
    """A TorchScript archive with what OpenAI's archives hold: fp16 weights under OpenAI's
    key names plus the input_resolution / context_length / vocab_size entries. Only the
    state dict is faithful (its code is a stub), which is all a loader reads."""
    open_clip.convert_weights_to_fp16(model)  # OpenAI's mixed fp16 layout
    state = dict(model.state_dict())
    state.update(
        input_resolution=torch.tensor(image_size),
        context_length=torch.tensor(model.context_length),
        vocab_size=torch.tensor(model.vocab_size),
    )
    root = _Holder()
    for key, tensor in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor.clone())
    torch.jit.script(root).save(str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_openai_torchscript_archive(tmp_path, tiny_checkpoint):
    config = write_config(tmp_path, "dfclip-test-openai")
    resolve_model_name(str(config))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        source = open_clip.create_model("dfclip-test-openai", force_quick_gelu=True)
    archive = tmp_path / "ViT-tiny.pt"
    write_openai_style_archive(source, archive, image_size=64)
    assert is_torchscript_archive(archive)
    assert not is_torchscript_archive(tiny_checkpoint)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(1)}, plain)
    assert not is_torchscript_archive(plain)

    bb = load_backbone(str(config), str(archive))  # auto rule: archive -> QuickGELU
    assert bb.provenance["pretrained"]["format"] == "openai-torchscript"
    assert bb.provenance["quick_gelu"] is True and activations(bb.visual) == {QuickGELU}
    assert bb.visual.conv1.weight.dtype == torch.float32  # fp16 archive, fp32 tower
    torch.testing.assert_close(bb.visual.conv1.weight, source.visual.conv1.weight.float())

    reference = open_clip.load_openai_model(str(archive), precision="fp32", device="cpu").eval()
    x = torch.stack([bb.preprocess(im) for im in sample_images()])
    with torch.no_grad():
        expected = reference.encode_image(x)
    torch.testing.assert_close(bb.encode(x), expected)


def test_split_preprocess_equals_open_clips_transform_exactly(tiny_checkpoint):
    """Workers stop at uint8 and the device finishes ToTensor + Normalize: the same float32 numbers."""
    import pickle

    from sklearn.datasets import load_sample_images

    from dfclip.embed.backbone import load_backbone, split_preprocess

    bb = load_backbone("dfclip-tiny", str(tiny_checkpoint))
    host, on_device = split_preprocess(bb.preprocess)
    host = pickle.loads(pickle.dumps(host))  # it travels to DataLoader workers
    images = [Image.fromarray(a) for a in load_sample_images().images] + [Image.new("RGB", (50, 90), (10, 200, 30))]
    for img in images:
        want = bb.preprocess(img)
        got = host(img)
        assert got.dtype == torch.uint8 and got.shape == (*want.shape[1:], 3)
        assert torch.equal(on_device(got[None])[0], want)
    assert split_preprocess(lambda img: img) is None  # not a Compose: the job falls back to the full transform
