"""One-file detectors: `dfhead export` -> `Detector.load` / `dfhead predict OUT.dfclip` give the run's own scores
(tiny random-init backbone, demo images), the file holds no pickle, and every refusal is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import dfclip
from dfclip import store
from dfclip.errors import UserError
from dfclip.heads import run as R
from dfclip.heads.calibration import logit
from dfclip.heads.config import make_config
from dfclip.heads.export import EXPORT_FORMAT, export_run
from dfclip.store.synthetic import make_synthetic_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo images, a store of them (dfclip-tiny, random init) and a run fitted on it."""
    from dfclip.embed import EmbedConfig, extract
    from dfclip.embed.demo import make_demo_images

    root = tmp_path_factory.mktemp("export")
    images = make_demo_images(root / "images", n_per_source=8, seed=3)
    extract(images, root / "emb", EmbedConfig(model="dfclip-tiny", pretrained="none", device="cpu", workers=0),
            progress=False)
    run = R.fit(root / "emb", make_config(epochs=3, batch_size=16, calibration="platt"), runs_dir=root / "runs",
                name="r", device="cpu", log=lambda line: None)
    return {"root": root, "images": images, "run": run}


def test_export_is_one_safetensors_file_with_the_run_inside(trained, dfhead, tmp_path):
    out = tmp_path / "det.dfclip"
    code, stdout, err = dfhead("export", trained["run"], out)
    assert code == 0, err
    assert "wrote" in stdout and [p.name for p in tmp_path.iterdir()] == ["det.dfclip"]
    assert not out.read_bytes().startswith(b"PK")  # not a torch zip (pickle)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    config = json.loads(meta["config"])
    run_config = json.loads((trained["run"] / "config.json").read_text())
    assert meta["format"] == EXPORT_FORMAT
    for key in ("run", "head", "threshold", "calibration", "provenance"):
        assert config[key] == run_config[key]
    assert config["provenance"]["model"] == "dfclip-tiny" and "embed_config" in config["provenance"]
    with safe_open(str(trained["run"] / "head.safetensors"), framework="pt") as f:
        assert names == set(f.keys())


def test_detector_and_predict_on_the_file_give_the_runs_scores(trained, dfhead, tmp_path):
    images, out = trained["images"], tmp_path / "det.dfclip"
    export_run(trained["run"], out)
    code, _, err = dfhead("predict", trained["run"], images, "--out", tmp_path / "run.csv", "--workers", "0",
                          "--device", "cpu")
    assert code == 0, err
    code, _, err = dfhead("predict", out, images, "--out", tmp_path / "file.csv", "--workers", "0", "--device", "cpu")
    assert code == 0, err
    by_run, by_file = pl.read_csv(tmp_path / "run.csv"), pl.read_csv(tmp_path / "file.csv")
    assert by_run.height == len(store.open(trained["root"] / "emb")) and by_file.equals(by_run)

    detector = dfclip.Detector.load(out, device="cpu")
    table = detector(images)
    assert table.columns == ["path", "score", "pred", "label"]
    np.testing.assert_allclose(table["score"].to_numpy(), by_run["score"].to_numpy(), rtol=1e-12)
    assert table["pred"].to_list() == by_run["pred"].to_list() and table["label"].to_list() == by_run["label"].to_list()

    # A list of paths and PIL images comes back in its order, each with the scores of its file.
    picked = by_run.sample(3, seed=1)
    files = [images / p for p in picked["path"]]
    listed = detector([Image.open(files[0]), str(files[1]), files[2]])
    assert listed["path"].to_list() == ["image-000000.png", str(files[1]), str(files[2])]
    # Batched with other images, a backbone's float32 sums may round differently: compared as logits.
    np.testing.assert_allclose(logit(listed["score"].to_numpy()), logit(picked["score"].to_numpy()), rtol=1e-3)
    assert listed["pred"].to_list() == picked["pred"].to_list()
    assert (listed["label"] == -1).all()
    real = detector(files[1], score_means="real")
    assert real.columns == ["path", "score_real", "pred", "label"]
    assert logit(1 - real["score_real"].to_numpy()) == pytest.approx(logit(picked["score"].to_numpy()[1:2]), rel=1e-3)


def test_loading_refuses_what_is_not_a_dfclip_export(trained, tmp_path):
    cases = {"text": tmp_path / "notes.dfclip", "weights": tmp_path / "plain.safetensors"}
    cases["text"].write_text("hello")
    shutil.copy(trained["run"] / "head.safetensors", cases["weights"])  # safetensors, but no dfclip header
    for path in cases.values():
        with pytest.raises(UserError, match="is not a dfclip export") as e:
            dfclip.Detector.load(path)
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(UserError, match="is not a file"):
        dfclip.Detector.load(trained["run"])


def test_loading_refuses_a_backbone_that_does_not_match(trained, tiny_checkpoint, tmp_path, dfhead):
    from dfclip.embed import EmbedConfig, extract

    ckpt = tmp_path / "tiny.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    images = trained["images"] / "real"
    extract(images, tmp_path / "emb", EmbedConfig(model="dfclip-tiny", pretrained=str(ckpt), device="cpu", workers=0),
            progress=False)
    # Label half the rows fake so a head can be fitted on the checkpoint's store.
    from dfclip.store.synthetic import rewrite_store

    n = store.open(tmp_path / "emb").meta.height
    labelled = rewrite_store(tmp_path / "emb", tmp_path / "emb2", label=np.arange(n) % 2)
    run = R.fit(labelled, make_config(epochs=1, batch_size=8), runs_dir=tmp_path / "runs", name="c", device="cpu",
                log=lambda line: None)
    out = export_run(run, tmp_path / "c.dfclip")
    dfclip.Detector.load(out)  # the checkpoint is where it was, unchanged
    from safetensors.torch import load_file

    weights = load_file(str(ckpt))
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    save_file(weights, str(ckpt))
    with pytest.raises(UserError, match="sha256 differs") as e:
        dfclip.Detector.load(out)
    assert len(str(e.value).splitlines()) == 1
    code, _, err = dfhead("predict", out, images, "--out", tmp_path / "x.csv", "--workers", "0")
    assert code == 2 and "sha256 differs" in err and len(err.strip().splitlines()) == 1


def test_loading_refuses_a_run_on_imported_embeddings(tmp_path):
    st = make_synthetic_store(tmp_path / "st", n=300, dim=8, seed=1)
    run = R.fit(st, make_config(epochs=1, batch_size=32), runs_dir=tmp_path / "runs", name="s", device="cpu",
                log=lambda line: None)
    out = export_run(run, tmp_path / "s.dfclip")
    with pytest.raises(UserError, match="is not an open_clip name") as e:
        dfclip.Detector.load(out)
    assert len(str(e.value).splitlines()) == 1
    # The file still scores a store of its embeddings, as the run folder does.
    assert R.predict_store(out, st, device="cpu").equals(R.predict_store(run, st, device="cpu"))


def test_a_damaged_export_config_is_one_line(trained, tmp_path):
    out = export_run(trained["run"], tmp_path / "d.dfclip")
    with safe_open(str(out), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["head"]["dim"] = config["head"]["dim"] * 2
    save_file(tensors, str(out), metadata=meta | {"config": json.dumps(config)})
    with pytest.raises(UserError) as e:
        dfclip.Detector.load(out)
    assert '"head"' in str(e.value) and len(str(e.value).splitlines()) == 1
