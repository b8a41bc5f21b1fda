"""Intermediate CLIP layers in the store (`dfembed extract --layers`), and loading any stored feature.

Parity: each stored block equals the class token that a forward hook on open_clip's own model
records after that block, for the same images and weights (the tiny config, loaded from a file).
"""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import dfclip.embed.backbone  # noqa: F401  registers dfclip-tiny with open_clip
from dfclip import store
from dfclip.errors import UserError
from dfclip.store import format as fmt

TINY = ["--model", "dfclip-tiny"]


from test_extract import smooth_image as _picture  # noqa: E402  the same deterministic test pictures


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers_images")
    for i, (label, size) in enumerate([("real", (64, 64)), ("fake", (90, 70)), ("fake", (120, 160)),
                                       ("real", (50, 80)), ("fake", (64, 64))]):
        (root / label / "src").mkdir(parents=True, exist_ok=True)
        _picture(*size, seed=i).save(root / label / "src" / f"img{i}.png")
    return root


def hooked_class_tokens(checkpoint: Path, files: list[Path]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """open_clip's own model and transform; forward hooks record x[:, 0] after every block (1-based)."""
    model, _, preprocess = open_clip.create_model_and_transforms("dfclip-tiny", pretrained=str(checkpoint))
    model.eval()
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.visual.transformer.resblocks, start=1):
        block.register_forward_hook(lambda _m, _inp, out, i=i: seen.__setitem__(i, out[:, 0].detach().clone()))
    with torch.no_grad():
        proj = model.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]))
    return proj.numpy(), {i: t.numpy() for i, t in seen.items()}


def test_stored_layers_equal_open_clip_hooks_and_read_with_plain_h5py(tmp_path, folder, tiny_checkpoint, dfembed):
    out = tmp_path / "store"
    code, _, stderr = dfembed("extract", folder, "--out", out, *TINY, "--pretrained", tiny_checkpoint, "--layers", "all",
                              "--workers", 0, "--batch-size", 2, "--shard-size", 3, "--no-progress")
    assert code == 0, stderr
    # Plain h5py: features/block{i}, (N, width) float16, row i beside row i of `path` and `embeddings`.
    stored: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-r*-*.h5")):
        with h5py.File(shard, "r") as f:
            prov = json.loads(f.attrs["provenance"])
            assert sorted(f["features"]) == ["block1", "block2"]
            for name in ("block1", "block2"):
                ds = f["features"][name]
                assert ds.dtype == np.float16 and ds.shape == (f["embeddings"].shape[0], 64)
            for r, p in enumerate(f["path"].asstr()[:]):
                stored[p] = {"proj": f["embeddings"][r], 1: f["features/block1"][r], 2: f["features/block2"][r]}
    assert prov["layers"] == [1, 2] and prov["layer_width"] == 64
    paths = sorted(stored)
    assert len(paths) == 5
    proj, blocks = hooked_class_tokens(tiny_checkpoint, [folder / p for p in paths])
    for b in (1, 2):
        got = np.stack([stored[p][b] for p in paths]).astype(np.float32)
        # float16 storage: relative rounding <= 2^-11 of each value
        np.testing.assert_allclose(got, blocks[b], rtol=2e-3, atol=2e-3 * np.abs(blocks[b]).max())
    got = np.stack([stored[p]["proj"] for p in paths]).astype(np.float32)
    np.testing.assert_allclose(got, proj, rtol=2e-3, atol=2e-3 * np.abs(proj).max())

    # The Python API gives the same rows, and "+" concatenates in the order given.
    s = store.open(out)
    assert s.features == ["proj", "block1", "block2"]
    x2, meta = s.load(feature="block2")
    both, meta_both = s.load(feature="block2+proj")
    assert both.shape == (5, 64 + 32) and meta_both["path"].to_list() == meta["path"].to_list()
    np.testing.assert_array_equal(both[:, :64], x2)
    np.testing.assert_array_equal(both[:, 64:], s.load()[0])
    np.testing.assert_array_equal(x2, np.stack([stored[p][2] for p in meta["path"].to_list()]))
    sub, sub_meta = s.load(feature="block1", label=1)
    assert sub.shape == (3, 64) and set(sub_meta["label"].to_list()) == {1}
    with pytest.raises(UserError, match="no feature block7"):
        s.load(feature="block7")
    assert s.info()["layers"] == [1, 2]


def test_another_layer_set_is_refused_in_one_line_and_the_same_resumes(tmp_path, folder, tiny_checkpoint, dfembed):
    out = tmp_path / "store"
    base = ("extract", folder, "--out", out, *TINY, "--pretrained", tiny_checkpoint, "--workers", 0, "--no-progress")
    assert dfembed(*base, "--layers", "2")[0] == 0
    code, _, stderr = dfembed(*base, "--layers", "every:1")
    assert code == 2 and "Traceback" not in stderr and "layers=2" in stderr and "layers=1,2" in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, _, stderr = dfembed(*base)  # no layers is another set too
    assert code == 2 and "layers=none" in stderr
    code, stdout, _ = dfembed(*base, "--layers", "2")
    assert code == 0 and "0 embedded" in stdout and "5 skipped" in stdout


def test_layers_identity_within_a_store_but_not_across_stores():
    base = {"model": "m", "model_config": {}, "pretrained": {"kind": "none"}, "feature": "proj", "dim": 32,
            "preprocess": {}}
    old = dict(base)  # written before layers existed: no key, the same as none
    assert fmt.identity(old) == fmt.identity({**base, "layers": [], "perturb": ""})
    with_layers = {**base, "layers": [1, 2], "layer_width": 64}
    assert fmt.identity(with_layers) != fmt.identity(base)
    assert fmt.compatible(with_layers, base)  # a run trained on one may score the other
    with pytest.raises(UserError, match="layers=1,2"):
        fmt.require_compatible(with_layers, base, what="store", fix="x", exact=True)


@pytest.mark.parametrize("spec, blocks", [("all", [1, 2, 3, 4]), ("every:2", [2, 4]), ("4,1, 1", [1, 4]),
                                          ("", []), ("every:3", [3])])
def test_parse_layers(spec, blocks):
    assert fmt.parse_layers(spec, 4) == blocks


@pytest.mark.parametrize("spec", ["0", "5", "1,x", "every:0", "every:", "some"])
def test_parse_layers_refuses_bad_specs(spec):
    with pytest.raises(UserError, match="--layers"):
        fmt.parse_layers(spec, 4)


@pytest.mark.parametrize("spec, parts", [("proj", ["proj"]), ("block8+block16", ["block8", "block16"]),
                                         ("block3+proj", ["block3", "proj"])])
def test_feature_parts(spec, parts):
    assert fmt.feature_parts(spec) == parts


@pytest.mark.parametrize("spec", ["pre", "block0", "block", "block8+block8", "proj+", "Block8"])
def test_feature_parts_refuses(spec):
    with pytest.raises(UserError, match="bad feature"):
        fmt.feature_parts(spec)


def test_predict_on_images_re_embeds_exactly_the_runs_feature(tmp_path, folder, tiny_checkpoint, dfembed):
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit, predict_store
    from dfclip.pipeline import predict_images

    out = tmp_path / "store"
    assert dfembed("extract", folder, "--out", out, *TINY, "--pretrained", tiny_checkpoint, "--layers", "all",
                   "--workers", 0, "--no-progress")[0] == 0
    run = fit(out, make_config(feature="block1+proj", epochs=2, batch_size=2, val_frac=0.4), runs_dir=tmp_path,
              name="r", device="cpu", log=lambda _: None)
    from_images = predict_images(run, folder, device="cpu", workers=0, progress=False)
    from_store = predict_store(run, out, device="cpu")
    assert from_images["path"].to_list() == from_store["path"].to_list()
    np.testing.assert_allclose(from_images["score"].to_numpy(), from_store["score"].to_numpy(), atol=1e-6)
