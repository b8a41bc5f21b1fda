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
    # Scores are calibrated: the run's threshold in that scale makes predict's decisions.
    threshold = json.loads((run / "config.json").read_text())["calibration"]["threshold"]
    assert (joined["pred"] == (joined["score"] >= threshold)).all()

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


def test_python_api_extract_fit_predict_images(tmp_path, demo_images, tiny_checkpoint):
    """The same round trip without the CLI: EmbedConfig -> extract -> fit -> predict_images, which
    re-embeds with the settings recorded in the store (here float32, explicit fp32)."""
    from dfclip.embed import EmbedConfig, extract
    from dfclip.embed.config import config_from_provenance
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit, predict_store
    from dfclip.pipeline import predict_images

    config = EmbedConfig(model="dfclip-tiny", pretrained=tiny_checkpoint, precision="fp32", dtype="float32",
                         workers=0, shard_size=50)
    emb = tmp_path / "embeddings"
    rep = extract(demo_images, emb, config, progress=False)
    assert rep["embedded"] == len(store.open(emb)) and rep["failed"] == 0
    provenance = store.open(emb).provenance
    assert provenance["embed_config"] == {**config.to_dict(), "pretrained": str(tiny_checkpoint)}
    assert json.loads(json.dumps(provenance)) == provenance
    rebuilt = config_from_provenance(provenance, tmp_path)
    assert (rebuilt.model, rebuilt.feature, rebuilt.dtype, rebuilt.precision) == ("dfclip-tiny", "proj", "float32", "fp32")
    assert rebuilt.pretrained == str(tiny_checkpoint.resolve()) and rebuilt.workers is None  # machine settings reset

    run = fit(emb, make_config(epochs=2, batch_size=32), runs_dir=tmp_path / "runs", name="r", device="cpu",
              log=lambda *_: None)
    fake_dir = demo_images / "fake" / "dalle"
    scores = predict_images(run, fake_dir, device="cpu", workers=0, progress=False)
    assert scores.columns == ["path", "score", "pred", "label"]
    assert scores["path"].to_list() == sorted(p.name for p in fake_dir.iterdir())
    from_store = predict_store(run, emb, device="cpu").filter(pl.col("path").str.starts_with("fake/dalle/"))
    np.testing.assert_allclose(scores["score"], from_store["score"], atol=1e-5)  # float32 both ways


def test_predict_images_refuses_a_run_without_a_backbone(tmp_path):
    from dfclip.errors import UserError
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit
    from dfclip.pipeline import predict_images
    from dfclip.store.synthetic import make_synthetic_store

    emb = make_synthetic_store(tmp_path / "syn", n=200, dim=8)
    run = fit(emb, make_config(epochs=1, batch_size=32), runs_dir=tmp_path / "runs", name="r", device="cpu",
              log=lambda *_: None)
    with pytest.raises(UserError, match="not an open_clip name"):
        predict_images(run, tmp_path, device="cpu", workers=0, progress=False)


def test_predict_on_images_reports_unreadable_files(tmp_path, demo_images, tiny_checkpoint, dfembed, dfhead):
    """Unreadable images are counted, listed with their reason beside the CSV, and
    a folder where nothing could be read fails instead of writing an empty CSV with exit 0."""
    import shutil

    assert dfembed("extract", demo_images, "--out", tmp_path / "all", "--model", "dfclip-tiny",
                   "--pretrained", tiny_checkpoint, "--workers", "0")[0] == 0
    assert dfhead("fit", tmp_path / "all", "--runs-dir", tmp_path / "runs", "--name", "r", "--epochs", "1")[0] == 0
    run = tmp_path / "runs" / "r"

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    good = sorted((demo_images / "fake" / "sd15").iterdir())[:3]
    for p in good:
        shutil.copy(p, mixed / p.name)
    (mixed / "broken.jpg").write_bytes(b"not an image")
    (mixed / "empty.png").write_bytes(b"")
    out_csv = tmp_path / "scores.csv"
    code, out, err = dfhead("predict", run, mixed, "--out", out_csv, "--workers", "0")
    assert code == 0, err
    assert pl.read_csv(out_csv).height == 3
    failures = pl.read_csv(tmp_path / "scores.failures.csv")
    assert sorted(failures["path"]) == ["broken.jpg", "empty.png"] and failures["error"].null_count() == 0
    assert "2 images could not be read" in err and "scores.failures.csv" in err and "Traceback" not in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"not an image")
    code, out, err = dfhead("predict", run, broken, "--out", tmp_path / "none.csv", "--workers", "0")
    assert code == 2 and "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # beside extract's progress lines
    assert len(lines) == 1 and "could be scored" in lines[0] and "none.failures.csv" in lines[0]
    assert not (tmp_path / "none.csv").exists()

    # a later clean predict to the same CSV removes the stale failures file
    code, _, err = dfhead("predict", run, demo_images / "fake" / "sd15", "--out", out_csv, "--workers", "0")
    assert code == 0, err
    assert not (tmp_path / "scores.failures.csv").exists()
