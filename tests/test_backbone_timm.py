"""timm towers (`--model timm:NAME`), block taps (`--tap resid|ln2`), and open_clip's PE Core / MetaCLIP 2 names.

Offline throughout: a small DINOv2-style timm ViT (vit_small_patch14_dinov2's architecture at 56 px,
width 64, 3 blocks) given by a model JSON of timm.create_model kwargs, with seeded random weights.
Parity is checked against timm's own model, data config and transform; block features against timm's
forward_intermediates, forward hooks, and the block's definition (norm2 of the residual after attention).
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dfclip import store
from dfclip.embed.backbone import load_backbone
from dfclip.embed.config import EmbedConfig, config_from_provenance
from dfclip.embed.extract import extract_like
from dfclip.errors import UserError
from dfclip.store import format as fmt

from test_extract import smooth_image as _picture  # noqa: E402  the same deterministic test pictures

NAME = "vit_small_patch14_dinov2.lvd142m"
KWARGS = {"img_size": 56, "depth": 3, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("timm_images")
    for i, (label, size) in enumerate([("real", (64, 64)), ("fake", (90, 70)), ("fake", (120, 160)),
                                       ("real", (50, 80))]):
        (root / label / "src").mkdir(parents=True, exist_ok=True)
        _picture(*size, seed=i).save(root / label / "src" / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory) -> tuple[Path, Path]:
    """(model JSON, seeded random-init weights of that model as .safetensors)."""
    root = tmp_path_factory.mktemp("tiny_timm")
    config = root / "tiny-dinov2.json"
    config.write_text(json.dumps({"timm": NAME, "kwargs": KWARGS}))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = timm.create_model(NAME, pretrained=False, **KWARGS)
        for block in model.blocks:  # DINOv2's layer scale starts at 1e-5: make the blocks matter
            block.ls1.gamma.data.uniform_(0.5, 1.5)
            block.ls2.gamma.data.uniform_(0.5, 1.5)
    weights = root / "tiny-dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


def timm_reference(weights: Path, files: list[Path]) -> tuple[torch.nn.Module, torch.Tensor]:
    """timm's own model with the weights, and the batch made by timm's own eval transform."""
    model = timm.create_model(NAME, pretrained=False, **KWARGS).eval()
    model.load_state_dict(load_file(str(weights)))
    # timm takes the size from the pretrained config, which img_size= does not change: ask for the model's.
    transform = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, 56, 56)}, model=model))
    return model, torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def class_tokens_by_intermediates(model, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Full token maps after each block (1-based), from timm's forward_intermediates."""
    out = model.forward_intermediates(x, return_prefix_tokens=True, norm=False, output_fmt="NLC",
                                      intermediates_only=True)
    return {i: torch.cat([prefix, spatial], dim=1) for i, (spatial, prefix) in enumerate(out, start=1)}


def put_in_hf_cache(cache: Path, weights: Path) -> None:
    """Lay `weights` out as the Hugging Face cache holds timm/vit_small_patch14_dinov2.lvd142m's model.safetensors."""
    repo = cache / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(weights.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def read_store(out: Path) -> tuple[dict[str, dict], dict]:
    rows, prov = {}, {}
    for shard in sorted(out.glob("shard-r*-*.h5")):
        with h5py.File(shard, "r") as f:
            prov = json.loads(f.attrs["provenance"])
            names = sorted(f["features"]) if "features" in f else []
            for r, p in enumerate(f["path"].asstr()[:]):
                rows[p] = {"proj": f["embeddings"][r].astype(np.float32),
                           **{n: f["features"][n][r].astype(np.float32) for n in names}}
    return rows, prov


def close16(got, want) -> None:
    """float16 storage: relative rounding <= 2^-11 of each value."""
    want = np.asarray(want, dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_store_equals_timm_model_transform_and_intermediates(tmp_path, folder, tiny_timm, dfembed):
    config, weights = tiny_timm
    out = tmp_path / "store"
    code, _, stderr = dfembed("extract", folder, "--out", out, "--model", config, "--pretrained", weights,
                              "--layers", "all", "--workers", 0, "--batch-size", 3, "--no-progress")
    assert code == 0, stderr
    rows, prov = read_store(out)
    paths = sorted(rows)
    assert len(paths) == 4
    assert prov["library"] == "timm" and prov["model"] == f"timm:{NAME}"
    assert prov["model_config"] == {"library": "timm", "name": NAME, "kwargs": KWARGS}
    assert prov["preprocess"]["input_size"] == [3, 56, 56] and prov["preprocess"]["interpolation"] == "bicubic"
    assert prov["preprocess"]["mean"] == [0.485, 0.456, 0.406]  # ImageNet's, as DINOv2's config says, not CLIP's
    assert prov["pretrained"]["kind"] == "file" and prov["pretrained"]["sha256"] == fmt.sha256_file(weights)
    assert prov["layers"] == [1, 2, 3] and prov["layer_width"] == 64 and prov["tap"] == "resid"
    model, x = timm_reference(weights, [folder / p for p in paths])
    with torch.no_grad():
        pooled = model(x)  # DINOv2: class token after the final norm, head Identity
        blocks = class_tokens_by_intermediates(model, x)
    close16(np.stack([rows[p]["proj"] for p in paths]), pooled)
    for b in (1, 2, 3):
        close16(np.stack([rows[p][f"block{b}"] for p in paths]), blocks[b][:, 0])
    assert not np.allclose(blocks[2][:, 0], blocks[3][:, 0], atol=1e-2)  # the blocks do differ
    assert store.open(out).features == ["proj", "block1", "block2", "block3"]


def test_ln2_tap_equals_norm2_hooks_and_its_definition(tiny_timm, folder):
    config, weights = tiny_timm
    files = sorted(folder.rglob("*.png"))
    model, x = timm_reference(weights, files)
    hooked: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks, start=1):
        block.norm2.register_forward_hook(lambda _m, _i, out, i=i: hooked.__setitem__(i, out[:, 0].clone()))
    with torch.no_grad():
        pooled = model(x)
        resid = class_tokens_by_intermediates(model, x)
    bb = load_backbone(str(config), str(weights), layers="1,3", tap="ln2")
    assert bb.provenance["tap"] == "ln2" and bb.layers == (1, 3)
    features, tokens = bb.encode_with_layers(x)
    torch.testing.assert_close(features, pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 0], hooked[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1], hooked[3], rtol=1e-5, atol=1e-5)
    # By definition: norm2 of the residual stream after block 3's attention, from block 2's output.
    block = model.blocks[2]
    with torch.no_grad():
        mid = resid[2] + block.ls1(block.attn(block.norm1(resid[2])))
        torch.testing.assert_close(tokens[:, 1], block.norm2(mid)[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens[:, 1], resid[3][:, 0], atol=1e-2)  # ln2 is not the residual stream


def test_open_clip_ln2_tap_equals_ln_2_hooks(tiny_model_name, tiny_checkpoint, folder):
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model_name, pretrained=str(tiny_checkpoint))
    model.eval()
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.visual.transformer.resblocks, start=1):
        block.ln_2.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out[:, 0].clone()))
    x = torch.stack([preprocess(Image.open(f)) for f in sorted(folder.rglob("*.png"))])
    with torch.no_grad():
        proj = model.encode_image(x)
    bb = load_backbone(tiny_model_name, str(tiny_checkpoint), layers="all", tap="ln2")
    features, tokens = bb.encode_with_layers(x)
    torch.testing.assert_close(features, proj, rtol=1e-5, atol=1e-5)
    for b in (1, 2):
        torch.testing.assert_close(tokens[:, b - 1], seen[b], rtol=1e-5, atol=1e-5)
    resid = load_backbone(tiny_model_name, str(tiny_checkpoint), layers="all").encode_with_layers(x)[1]
    assert not torch.allclose(resid, tokens, atol=1e-2)
    assert bb.provenance["library"] == "open_clip" and bb.provenance["tap"] == "ln2"


def test_tap_is_part_of_the_store_identity(tmp_path, folder, tiny_model_name, tiny_checkpoint, dfembed):
    out = tmp_path / "store"
    args = ("extract", folder, "--out", out, "--model", tiny_model_name, "--pretrained", tiny_checkpoint,
            "--layers", "all", "--workers", 0, "--no-progress")
    code, _, stderr = dfembed(*args)
    assert code == 0, stderr
    prov = store.open(out).provenance
    assert prov["tap"] == "resid"
    code, _, stderr = dfembed(*args, "--tap", "ln2", "--retry-failed")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    # A store written before taps were recorded holds the residual stream.
    older = {k: v for k, v in prov.items() if k != "tap"}
    assert fmt.identity(older) == fmt.identity(prov)
    assert fmt.identity({**prov, "tap": "ln2"}) != fmt.identity(prov)
    # Without blocks nothing is tapped: the setting is kept as resid, so such stores all agree.
    assert EmbedConfig(model=tiny_model_name, tap="ln2").tap == "resid"
    assert EmbedConfig(model=tiny_model_name, tap="ln2", layers="1").tap == "ln2"
    with pytest.raises(UserError, match="--tap"):
        EmbedConfig(tap="ln_2", layers="1")


def test_predict_style_reembedding_matches_a_random_init_timm_store(tmp_path, folder, tiny_timm, dfembed):
    config, _ = tiny_timm
    out = tmp_path / "store"
    code, _, stderr = dfembed("extract", folder, "--out", out, "--model", config, "--pretrained", "none",
                              "--layers", "2,3", "--tap", "ln2", "--workers", 0, "--no-progress")
    assert code == 0, stderr
    rows, prov = read_store(out)
    assert prov["pretrained"] == {"kind": "none"} and prov["tap"] == "ln2"
    code, shown, _ = dfembed("info", out)
    assert code == 0 and "block2, block3 (tap ln2)" in shown
    rebuilt = config_from_provenance(prov, tmp_path)
    assert (rebuilt.pretrained, rebuilt.layers, rebuilt.tap) == ("none", "2,3", "ln2")
    config.rename(config.with_suffix(".moved"))  # the recorded name and kwargs rebuild it, not the file
    try:
        image = folder / "fake" / "src" / "img2.png"
        summary = extract_like(prov, image, tmp_path / "predict", device="cpu", workers=0, progress=False)
    finally:
        config.with_suffix(".moved").rename(config)
    again, prov2 = read_store(Path(summary["store"]))
    assert fmt.identity(prov2) == fmt.identity(prov)
    (got,) = again.values()
    want = rows["fake/src/img2.png"]
    for key in ("proj", "block2", "block3"):
        np.testing.assert_array_equal(got[key], want[key])


def test_timm_names_tags_and_weights_errors_are_one_line(tmp_path, folder, dfembed, monkeypatch):
    code, _, stderr = dfembed("extract", folder, "--out", tmp_path / "s", "--model", "timm:vit_smal_patch14_dinov2",
                              "--pretrained", "none", "--workers", 0, "--no-progress")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "unknown timm model" in stderr and "vit_small_patch14_dinov2" in stderr
    with pytest.raises(UserError, match="known tags: lvd142m"):
        load_backbone("timm:vit_small_patch14_dinov2.lvd999m", "none")
    with pytest.raises(UserError, match="give the tag once"):
        load_backbone("timm:vit_small_patch14_dinov2.lvd142m", "laion2b")
    # Tagged weights, no cache, no network: one line naming the ways out, and no download attempt.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"no cached weights for timm:vit_small_patch14_dinov2\.lvd142m .* no network"):
        load_backbone("timm:vit_small_patch14_dinov2.lvd142m", "openai", cache_dir=tmp_path / "hf")


def test_tagged_weights_load_through_timm_from_the_hugging_face_cache(tmp_path, tiny_timm, monkeypatch):
    """A tag's weights already in the HF cache are loaded by timm's own pretrained path, offline."""
    config, weights = tiny_timm
    put_in_hf_cache(tmp_path / "hf", weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tagged = load_backbone(str(config), "openai", cache_dir=tmp_path / "hf")
    assert tagged.provenance["pretrained"] == {"kind": "tag", "tag": "lvd142m",
                                               "source": "timm/vit_small_patch14_dinov2.lvd142m"}
    from_file = load_backbone(str(config), str(weights))
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(tagged.encode(x), from_file.encode(x), rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path, tiny_timm):
    config, weights = tiny_timm
    state = load_file(str(weights))
    state.pop("blocks.0.norm2.weight")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(UserError, match="does not fit timm:.*1 missing keys"):
        load_backbone(str(config), str(bad))


def test_pre_is_the_token_before_a_projection_head():
    """timm's PE Core tower: proj is the CLIP embedding (head = projection), pre the pooled token before it."""
    proj = load_backbone("timm:vit_pe_core_tiny_patch16_384.fb", "none")
    pre = load_backbone("timm:vit_pe_core_tiny_patch16_384.fb", "none", feature="pre")
    assert (proj.dim, pre.dim) == (512, 192) and proj.provenance["head"] == "Linear"
    assert proj.provenance["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # PE's own normalisation
    pre.visual.load_state_dict(proj.visual.state_dict())
    x = torch.randn(1, 3, 384, 384)
    torch.testing.assert_close(proj.encode(x), proj.visual.model.head(pre.encode(x)), rtol=1e-5, atol=1e-5)


def test_open_clip_pe_core_builds_offline_with_its_own_preprocessing(folder):
    """The smallest PE Core of open_clip, random init: built, preprocessed as its released weights are."""
    bb = load_backbone("PE-Core-T-16-384", "none")
    tag = open_clip.get_pretrained_cfg("PE-Core-T-16-384", "meta")
    assert bb.provenance["preprocess"]["mean"] == list(tag["mean"]) == [0.5, 0.5, 0.5]
    assert bb.provenance["preprocess"]["interpolation"] == "bilinear"
    assert bb.provenance["preprocess"]["resize_mode"] == "squash"
    assert "shared by every pretrained tag" in bb.provenance["preprocess_from"]
    image = Image.open(sorted(folder.rglob("*.png"))[2]).convert("RGB")
    features = bb.encode(bb.preprocess(image)[None])
    assert features.shape == (1, 512) and torch.isfinite(features).all()
    # An architecture whose tags disagree keeps its model config's preprocessing (unchanged behaviour).
    assert load_backbone("dfclip-tiny", "none").provenance["preprocess_from"] == "model config"


@pytest.mark.skipif(not os.environ.get("DFCLIP_SLOW_TESTS"), reason=(
    "the smallest MetaCLIP 2 name, ViT-L-14-worldwide, builds a ViT-L image tower plus a 250k-token text tower "
    "before the text tower is dropped: about 25 s and 3.2 GB of memory on a 2-core CPU, too much for the unit "
    "tests; set DFCLIP_SLOW_TESTS=1 to run it"))
def test_open_clip_worldwide_builds_offline():
    bb = load_backbone("ViT-L-14-worldwide", "none")
    assert bb.dim == 768 and bb.provenance["preprocess"]["size"] == [224, 224]
    assert torch.isfinite(bb.encode(torch.randn(1, 3, 224, 224))).all()


def test_worldwide_names_resolve_without_building():
    from dfclip.embed.backbone import resolve_model_name

    for name in ("ViT-L-14-worldwide", "ViT-H-14-worldwide-378", "PE-Core-B-16"):
        assert resolve_model_name(name) == (name, "open_clip")


def test_dinov3_blocks_equal_forward_intermediates_and_norm2_hooks(tmp_path):
    """DINOv3 (timm's Eva: rotary positions, 4 register tokens after the class token, mean pool)."""
    config = tmp_path / "tiny-dinov3.json"
    config.write_text(json.dumps({"timm": "vit_small_patch16_dinov3.lvd1689m",
                                  "kwargs": {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2}}))
    resid = load_backbone(str(config), "none", layers="all")
    assert resid.provenance["pool"] == "avg" and resid.provenance["preprocess"]["input_size"] == [3, 256, 256]
    ln2 = load_backbone(str(config), "none", layers="all", tap="ln2")
    ln2.visual.load_state_dict(resid.visual.state_dict())
    model = resid.visual.model
    hooked: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks, start=1):
        block.norm2.register_forward_hook(lambda _m, _i, out, i=i: hooked.__setitem__(i, out[:, 0].clone()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model(x)
        want = class_tokens_by_intermediates(model, x)
    features, tokens = resid.encode_with_layers(x)
    torch.testing.assert_close(features, pooled, rtol=1e-5, atol=1e-5)
    for b in (1, 2):
        torch.testing.assert_close(tokens[:, b - 1], want[b][:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ln2.encode_with_layers(x)[1][:, b - 1], hooked[b], rtol=1e-5, atol=1e-5)


def test_cached_weights_that_do_not_fit_the_kwargs_are_one_line(tmp_path, tiny_timm, monkeypatch):
    config, weights = tiny_timm
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({"timm": NAME, "kwargs": {**KWARGS, "depth": 4}}))
    put_in_hf_cache(tmp_path / "hf", weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="do not load into timm:vit_small_patch14_dinov2.lvd142m") as e:
        load_backbone(str(deeper), "openai", cache_dir=tmp_path / "hf")
    assert "\n" not in str(e.value)


def test_face_crops_are_made_at_the_timm_towers_input_size(tmp_path, tiny_timm):
    pytest.importorskip("facenet_pytorch")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import media
    from dfclip.embed import extract

    config, weights = tiny_timm
    shot = media.paste_face((144, 192), media.astronaut_face(), (96, 72), 80)
    (tmp_path / "i" / "real").mkdir(parents=True)
    Image.fromarray(shot.frame).save(tmp_path / "i" / "real" / "face.png")
    rep = extract(tmp_path / "i", tmp_path / "st", EmbedConfig(model=str(config), pretrained=str(weights), workers=0,
                  faces="largest", min_face_score=0.5, layers="all"), progress=False)
    assert (rep["embedded"], rep["failed"]) == (1, 0)
    s = store.open(tmp_path / "st")
    assert s.provenance["faces"]["size"] == 56 and s.features == ["proj", "block1", "block2", "block3"]
