"""The whole pipeline through the CLI, as the README runs it: demo images -> extract -> info -> fit ->
predict on images (re-embedded with the run's recorded backbone) and on the store."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from dfclip import store




@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    from dfclip.embed.demo import make_demo_images

    return make_demo_images(tmp_path_factory.mktemp("demo") / "images", n_per_source=16, seed=1)


def test_extract_info_fit_predict_on_images_round_trip(tmp_path, demo_images, tiny_checkpoint, dfembed, dfhead):
    emb, runs = tmp_path / "embeddings", tmp_path / "runs"
    code, _, err = dfembed("extract", demo_images, "--out", emb, "--model", "dfclip-tiny",
                           "--pretrained", tiny_checkpoint, "--workers", "0", "--shard-size", "20")
    assert code == 0, err
    s = store.open(emb)
    walked = sum(1 for p in demo_images.rglob("*") if p.suffix in (".jpg", ".png", ".webp"))
    assert len(s) == walked and len(s.shards) >= 2

    code, out, _ = dfembed("info", emb, "--json")
    info = json.loads(out)
    assert info["rows"] == walked and info["dim"] == s.dim and info["model"] == "dfclip-tiny"
    assert info["labels"]["1"] == s.meta.filter(pl.col("label") == 1).height
    assert set(info["sources"]) == {"ffhq", "celeba", "stylegan2", "sd15", "dalle"}
    code, out, _ = dfembed("info", emb)
    assert code == 0 and "dfclip-tiny" in out and "stylegan2" in out

    code, _, err = dfhead("fit", emb, "--runs-dir", runs, "--name", "r", "--epochs", "3", "--batch-size", "32")
    assert code == 0, err
    run = runs / "r"

    # Scores from the run's own store, then from the images re-embedded with the recorded backbone.
    code, _, err = dfhead("predict", run, "--store", emb, "--out", tmp_path / "from_store.csv")
    assert code == 0, err
    fake_dir = demo_images / "fake" / "sd15"
    code, out, err = dfhead("predict", run, fake_dir, "--out", tmp_path / "from_images.csv", "--workers", "0")
    assert code == 0, err
    from_store = pl.read_csv(tmp_path / "from_store.csv")
    from_images = pl.read_csv(tmp_path / "from_images.csv")
    assert from_images.height == sum(1 for _ in fake_dir.iterdir())
    joined = from_images.with_columns(pl.col("path").map_elements(lambda p: f"fake/sd15/{p}", pl.Utf8)).join(
        from_store, on="path", suffix="_store")
    assert joined.height == from_images.height
    np.testing.assert_allclose(joined["score"], joined["score_store"], atol=2e-3)  # store is float16
    assert (joined["pred"] == (joined["score"] >= json.loads((run / "config.json").read_text())["threshold"])).all()

    # One image file works too.
    one = next(fake_dir.iterdir())
    code, _, err = dfhead("predict", run, one, "--out", tmp_path / "one.csv", "--workers", "0")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "one.csv")["path"].to_list() == [one.name]


def test_predict_refuses_a_changed_checkpoint(tmp_path, demo_images, tiny_checkpoint, dfembed, dfhead):
    import shutil

    ckpt = tmp_path / "weights.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    emb = tmp_path / "embeddings"
    assert dfembed("extract", demo_images, "--out", emb, "--model", "dfclip-tiny", "--pretrained", ckpt,
                   "--workers", "0")[0] == 0
    assert dfhead("fit", emb, "--runs-dir", tmp_path / "runs", "--name", "r", "--epochs", "1")[0] == 0
    ckpt.write_bytes(ckpt.read_bytes()[:-8] + b"\0" * 8)
    code, _, err = dfhead("predict", tmp_path / "runs" / "r", demo_images / "fake", "--out", tmp_path / "x.csv")
    assert code == 2 and "changed since the run was trained" in err and "Traceback" not in err
