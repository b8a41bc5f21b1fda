"""Fusing stores of the same images from several backbones (`dfhead fit A --with B`): rows joined by path,
features concatenated (or layer-mixed), rows of one store only left out, disagreeing labels refused, and
predict on images embedding with every backbone of the run."""

import json

import numpy as np
import polars as pl
import pytest

from dfclip import store
from dfclip.errors import UserError
from dfclip.store import format as fmt
from dfclip.store.synthetic import make_synthetic_store, rewrite_store

FIT = ("--epochs", "2", "--batch-size", "32")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two synthetic stores of the same 300 paths, labels, sources and groups (one seed), of widths 16 and 8."""
    root = tmp_path_factory.mktemp("fusion")
    a = make_synthetic_store(root / "wide", n=300, dim=16, seed=3, dtype="float32")
    b = make_synthetic_store(root / "narrow", n=300, dim=8, seed=3, dtype="float16")
    return a, b


def _by_path(s) -> dict:
    x, rows = s.load()
    return dict(zip(rows["path"].to_list(), x.astype(np.float32)))


def test_fused_load_is_the_per_path_concatenation(pair):
    a, b = pair
    f = store.fuse([a, b])
    assert f.names == ["wide", "narrow"] and len(f) == 300 and f.join_note is None
    assert f.feature_dim("proj") == 24 and f.feature_dim("narrow:proj") == 8
    assert f.expand_feature("proj") == "wide:proj+narrow:proj"
    x, rows = f.load(feature="proj")
    assert x.shape == (300, 24) and x.dtype == np.float32  # the wider of float32 and float16
    xa, xb = _by_path(store.open(a)), _by_path(store.open(b))
    want = np.stack([np.concatenate([xa[p], xb[p]]) for p in rows["path"]])
    np.testing.assert_array_equal(x, want)
    # Named parts in any order, and a subset of rows in any order.
    some = f.meta.sample(50, seed=1)
    x, rows = f.load(some, feature="narrow:proj+wide:proj")
    np.testing.assert_array_equal(x, np.stack([np.concatenate([xb[p], xa[p]]) for p in rows["path"]]))
    assert sorted(rows["path"]) == sorted(some["path"])


def test_training_data_holds_the_concatenation_of_each_row(pair):
    """load_data on a fused view: the resident training rows are each path's stores side by side."""
    import torch

    from dfclip.heads.config import make_config
    from dfclip.heads.data import load_data

    a, b = pair
    f = store.fuse([a, b])
    data = load_data(f, make_config(feature=f.expand_feature("proj")), device=torch.device("cpu"))
    assert data.dim == 24 and data.x.shape[1] == 24
    xa, xb = _by_path(store.open(a)), _by_path(store.open(b))
    want = np.stack([np.concatenate([xa[p], xb[p]]) for p in data.train_paths])
    np.testing.assert_array_equal(data.x.numpy(), want)


def test_video_frames_join_by_row_path(pair, tmp_path):
    """Rows named VIDEO#fNNNNNN join frame by frame."""
    a, b = pair
    paths = [f"clips/v{i // 4:03d}.mp4#f{i % 4:06d}" for i in range(300)]
    va = rewrite_store(a, tmp_path / "va", path=paths)
    vb = rewrite_store(b, tmp_path / "vb", keep=np.arange(300) >= 4, path=paths)  # video v000 only in va
    f = store.fuse([va, vb])
    assert len(f) == 296 and "4 only in va (e.g. clips/v000.mp4#f000000)" in f.join_note
    x, rows = f.load(feature="va:proj")
    assert rows["path"].str.starts_with("clips/v000.mp4").sum() == 0 and x.shape == (296, 16)


def test_fused_provenance_width_and_compatibility(pair):
    a, b = pair
    f = store.fuse([a, b])
    assert fmt.feature_width(f.provenance, "proj") == 24
    assert fmt.feature_width(f.provenance, "wide:proj") == 16
    assert not fmt.compatible(f.provenance, store.open(a).provenance)
    assert fmt.compatible(f.provenance, store.fuse([a, b], names=["x", "y"]).provenance)
    assert not fmt.compatible(f.provenance, store.fuse([b, a]).provenance)  # order matters: widths differ
    with pytest.raises(UserError, match="names store 'dino'"):
        f.feature_dim("wide:proj+dino:proj")
    with pytest.raises(UserError, match="every part"):
        fmt.feature_parts("wide:proj+proj")
    with pytest.raises(UserError, match="given twice"):
        store.fuse([a, a])


def test_fit_with_trains_on_the_concatenated_width(pair, tmp_path, dfhead):
    a, b = pair
    code, out, err = dfhead("fit", a, "--with", b, "--runs-dir", tmp_path, "--name", "r", *FIT)
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["head"]["dim"] == 24
    assert config["run"]["feature"] == "wide:proj+narrow:proj"
    members = config["provenance"][fmt.FUSION_KEY]
    assert [m["name"] for m in members] == ["wide", "narrow"] and [m["provenance"]["dim"] for m in members] == [16, 8]
    assert "feature wide:proj+narrow:proj (24-d)" in out
    code, _, err = dfhead("fit", a, "--with", b, "--val-store", a, "--runs-dir", tmp_path, *FIT)
    assert code == 2 and "--val-store does not combine with --with" in err
    # Eval fuses the same way; without --with the fused run refuses in one line.
    code, out, err = dfhead("eval", tmp_path / "r", "--store", a, "--with", b, "--json", "--include-train")
    assert code == 0, err
    assert json.loads(out)["n"] == 300
    code, _, err = dfhead("eval", tmp_path / "r", "--store", a)
    assert code == 2 and "fuses 2 stores (wide, narrow)" in err and len(err.strip().splitlines()) == 1
    # Predict on the stores equals the head on the hand concatenation.
    code, _, err = dfhead("predict", tmp_path / "r", "--store", a, "--with", b, "--out", tmp_path / "s.csv")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "s.csv").height == 300


def test_one_store_fit_is_unchanged_by_fusion_code(pair, tmp_path, dfhead):
    a, _ = pair
    code, _, err = dfhead("fit", a, "--runs-dir", tmp_path, "--name", "r", *FIT)
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["run"]["feature"] == "proj" and config["head"]["dim"] == 16
    assert fmt.FUSION_KEY not in config["provenance"]
    code, _, err = dfhead("fit", a, "--feature", "wide:proj", "--runs-dir", tmp_path, *FIT)
    assert code == 2 and "--with" in err
    code, _, err = dfhead("eval", tmp_path / "r", "--store", a, "--with", a)
    assert code == 2 and "trained on one store" in err


def test_rows_of_one_store_only_are_reported_and_left_out(pair, tmp_path, dfhead):
    a, b = pair
    n = 300
    drop_b = np.ones(n, bool)
    drop_b[[5, 17, 40]] = False  # storage order of a synthetic store is path order
    b_less = rewrite_store(b, tmp_path / "narrow_less", keep=drop_b)
    a_less = rewrite_store(a, tmp_path / "wide_less", keep=np.arange(n) != 99)
    f = store.fuse([a_less, b_less])
    assert len(f) == n - 4
    note = f.join_note
    assert note.count("\n") == 0
    assert "1 only in narrow_less (e.g. img/00000099.jpg)" in note
    assert "3 only in wide_less (e.g. img/00000005.jpg)" in note
    assert not f.meta["path"].is_in(["img/00000005.jpg", "img/00000099.jpg"]).any()
    code, out, err = dfhead("fit", a_less, "--with", b_less, "--runs-dir", tmp_path, "--name", "r", *FIT)
    assert code == 0, err
    assert "left out rows not held by every fused store" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    data = json.loads((tmp_path / "r" / "config.json").read_text())["data"]
    assert data["train"] + data["val"] == n - 4, report


def test_disagreeing_labels_are_one_line_naming_the_rows(pair, tmp_path, dfhead):
    a, b = pair
    labels = store.open(b).meta.sort(["shard", "row"])["label"].to_numpy().copy()
    labels[[7, 11]] = 1 - labels[[7, 11]]
    flipped = rewrite_store(b, tmp_path / "flipped", label=labels)
    with pytest.raises(UserError, match=r"disagree on the label of 2 rows \(img/00000007.jpg"):
        len(store.fuse([a, flipped]))
    code, _, err = dfhead("fit", a, "--with", flipped, "--runs-dir", tmp_path, *FIT)
    assert code == 2 and "img/00000007.jpg" in err and "img/00000011.jpg" in err
    assert len(err.strip().splitlines()) == 1


def test_sweep_over_backbone_combinations(pair, tmp_path, dfhead):
    a, b = pair
    code, out, err = dfhead("sweep", a, "--with", b, "--feature", "wide:proj,narrow:proj,proj", "--runs-dir", tmp_path,
                            "--name", "s", *FIT)
    assert code == 0, err
    runs = pl.read_parquet(tmp_path / "s" / "runs.parquet")
    assert sorted(runs["feature"]) == sorted(["wide:proj", "narrow:proj", "wide:proj+narrow:proj"])
    best = json.loads((tmp_path / "s" / "best" / "config.json").read_text())
    assert best["head"]["dim"] == {"wide:proj": 16, "narrow:proj": 8, "wide:proj+narrow:proj": 24}[best["run"]["feature"]]


def test_layermix_over_fused_parts(pair, tmp_path, dfhead):
    a, b = pair
    same = make_synthetic_store(tmp_path / "other", n=300, dim=16, seed=3)
    code, _, err = dfhead("fit", a, "--with", same, "--head", "layermix", "--feature", "wide:proj+other:proj",
                          "--runs-dir", tmp_path, "--name", "m", *FIT)
    assert code == 0, err
    head = json.loads((tmp_path / "m" / "config.json").read_text())["head"]
    assert head["kind"] == "layermix" and head["dim"] == 32
    code, _, err = dfhead("fit", a, "--with", b, "--head", "layermix", "--feature", "wide:proj+narrow:proj",
                          "--runs-dir", tmp_path, *FIT)
    assert code == 2 and "widths differ (16, 8)" in err


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory, tiny_checkpoint):
    """Demo images embedded twice: the tiny model's proj (float32) and its pre-projection token with blocks 1, 2."""
    from dfclip.embed import EmbedConfig, extract
    from dfclip.embed.demo import make_demo_images

    root = tmp_path_factory.mktemp("fused_images")
    images = make_demo_images(root / "images", n_per_source=4, seed=2)
    base = dict(model="dfclip-tiny", pretrained=tiny_checkpoint, precision="fp32", dtype="float32", workers=0)
    extract(images, root / "st_proj", EmbedConfig(**base), progress=False)
    extract(images, root / "st_pre", EmbedConfig(**base, feature="pre", layers="1,2"), progress=False)
    return images, root / "st_proj", root / "st_pre"


def test_predict_on_images_embeds_with_every_backbone(two_backbones, tmp_path, dfhead):
    images, st_proj, st_pre = two_backbones
    code, _, err = dfhead("fit", st_proj, "--with", st_pre, "--feature", "st_proj:proj+st_pre:block2",
                          "--runs-dir", tmp_path, "--name", "r", "--epochs", "2", "--batch-size", "8")
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    widths = store.open(st_proj).dim + store.open(st_pre).feature_dim("block2")
    assert config["head"]["dim"] == widths
    code, _, err = dfhead("predict", tmp_path / "r", images, "--out", tmp_path / "img.csv", "--workers", "0")
    assert code == 0, err
    code, _, err = dfhead("predict", tmp_path / "r", "--store", st_proj, "--with", st_pre, "--out", tmp_path / "st.csv")
    assert code == 0, err
    from_images, from_stores = pl.read_csv(tmp_path / "img.csv"), pl.read_csv(tmp_path / "st.csv")
    assert from_images["path"].to_list() == from_stores["path"].to_list()
    assert from_images.height == len(store.open(st_proj)) == 16
    np.testing.assert_allclose(from_images["score"], from_stores["score"], atol=1e-5)
    one = sorted((images / "fake").rglob("*.png"))[0]
    code, _, err = dfhead("predict", tmp_path / "r", one, "--out", tmp_path / "one.csv", "--workers", "0")
    assert code == 0, err
    assert "different folders" not in err and "left out" not in err
    scored = pl.read_csv(tmp_path / "one.csv")
    assert scored["path"].to_list() == [one.name]
    want = from_stores.filter(pl.col("path") == str(one.relative_to(images)))["score"]
    np.testing.assert_allclose(scored["score"], want, atol=1e-5)
    # A store of one backbone only is refused before anything is scored.
    code, _, err = dfhead("predict", tmp_path / "r", "--store", st_proj, "--out", tmp_path / "x.csv")
    assert code == 2 and "--with" in err
