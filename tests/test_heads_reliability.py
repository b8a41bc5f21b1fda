"""Run folders and evaluations that never mislead: eval leaves out the rows a run trained on, a
replaced run keeps no file of the old head, rows whose image is gone are counted, predict ignores
rank variables no torchrun set, one-class metrics are undefined, a read-only run folder still
prints its robustness table, and `dfhead runs` marks a NaN threshold. Each through the real `dfhead`
entry point where a user would meet it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from dfclip import store
from dfclip.heads import metrics
from dfclip.store.synthetic import make_synthetic_store, rewrite_store

FAST = ["--epochs", "2", "--lr", "0.01", "--batch-size", "64", "--device", "cpu"]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A store whose rows are split by the store itself (no --val-store), and a fitted run on it. Its
    input folder (in provenance, as `dfembed extract` records it) is not on this machine."""
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit

    root = tmp_path_factory.mktemp("reliable")
    full = make_synthetic_store(root / "full", n=600, dim=16, signal=4, fake_rate=0.6, seed=5)
    prov = {**store.open(full).provenance, "input_root": str(root / "images")}
    good = rewrite_store(full, root / "good", provenance=prov)
    run = fit(good, make_config(epochs=2, lr=0.01, batch_size=64), runs_dir=root / "runs", name="base",
              device="cpu", log=lambda line: None)
    return {"root": root, "good": good, "run": run}


def labelled_rows(path) -> int:
    return store.open(path).select(label=[0, 1]).height


# --- eval on the rows a run trained on ------------------------------------------------------------------

def test_eval_on_the_training_store_leaves_out_the_training_rows(env, dfhead):
    trained = json.loads((env["run"] / "config.json").read_text())["data"]["train"]
    code, out, err = dfhead("eval", env["run"], "--store", env["good"], "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["n"] == labelled_rows(env["good"]) - trained
    assert f"left out {trained} of the {labelled_rows(env['good'])} rows of store {env['good']}" in err
    assert "--include-train" in err

    code, out, err = dfhead("eval", env["run"], "--store", env["good"], "--json", "--device", "cpu", "--include-train")
    assert code == 0, err
    assert json.loads(out)["n"] == labelled_rows(env["good"])
    assert f"warning: {trained} of the {labelled_rows(env['good'])} rows" in err and "optimistic" in err


def test_the_rows_left_out_are_exactly_the_training_rows(env):
    from dfclip.heads.run import evaluate_run

    train_paths = pl.read_parquet(env["run"] / "train_rows.parquet")["path"]
    meta = store.open(env["good"]).meta
    assert train_paths.len() == json.loads((env["run"] / "config.json").read_text())["data"]["train"]
    assert train_paths.is_in(meta["path"].implode()).all()
    rep = evaluate_run(env["run"], env["good"], device="cpu", log=lambda line: None)
    val_report = json.loads((env["run"] / "report.json").read_text())["val"]
    assert rep["n"] == val_report["n"]  # the store's own split: what is not trained on is its val set
    assert rep["auc"] == pytest.approx(val_report["auc"], abs=1e-4)


def test_robustness_tables_leave_out_training_rows_of_perturbed_copies(env, dfhead, tmp_path):
    """A perturbed copy of the training images (same input folder, same paths) holds training rows too;
    another store of other images with the same relative paths does not."""
    prov = store.open(env["good"]).provenance
    jpeg = rewrite_store(env["good"], tmp_path / "jpeg", provenance={**prov, "perturb": "jpeg:75"})
    other = rewrite_store(env["good"], tmp_path / "other", provenance={**prov, "input_root": str(tmp_path / "elsewhere")})
    trained = json.loads((env["run"] / "config.json").read_text())["data"]["train"]
    code, out, err = dfhead("eval", env["run"], "--store", env["good"], "--store", jpeg, "--store", other, "--json",
                            "--device", "cpu")
    assert code == 0, err
    n = {row["store"]: row["n"] for row in json.loads(out)}
    all_rows = labelled_rows(env["good"])
    assert n == {"good": all_rows - trained, "jpeg": all_rows - trained, "other": all_rows}


def test_a_run_without_a_record_of_its_training_rows_warns_on_its_own_store(env, dfhead, tmp_path):
    old = shutil.copytree(env["run"], tmp_path / "old")
    (old / "train_rows.parquet").unlink()
    code, out, err = dfhead("eval", old, "--store", env["good"], "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["n"] == labelled_rows(env["good"])
    assert "does not record the rows it trained on" in err and "optimistic" in err


def test_a_store_of_training_rows_only_is_refused_with_the_option(env, dfhead, tmp_path):
    train_paths = pl.read_parquet(env["run"] / "train_rows.parquet")["path"]
    keep = store.open(env["good"]).meta["path"].is_in(train_paths.implode()).to_numpy()
    only = rewrite_store(env["good"], tmp_path / "only", keep=keep)
    code, out, err = dfhead("eval", env["run"], "--store", only, "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert "every labelled row" in err and "--include-train" in err


# --- a replaced run keeps nothing of the old head -----------------------------------------------------

def test_fit_over_an_existing_run_keeps_no_stale_file(env, dfhead, tmp_path):
    runs = tmp_path / "runs"
    code, _, err = dfhead("fit", env["good"], *FAST, "--runs-dir", runs, "--name", "x")
    assert code == 0, err
    (runs / "x" / "robustness.parquet").write_bytes(b"old head's table")
    (runs / "x" / "robustness.png").write_bytes(b"old head's plot")
    code, _, err = dfhead("fit", env["good"], *FAST, "--runs-dir", runs, "--name", "x", "--seed", "3")
    assert code == 0, err
    assert sorted(p.name for p in (runs / "x").iterdir()) == [
        "config.json", "head.safetensors", "metrics.parquet", "reliability.png", "report.json", "roc_pr.png",
        "train_rows.parquet"]
    assert json.loads((runs / "x" / "config.json").read_text())["run"]["seed"] == 3
    assert sorted(p.name for p in runs.iterdir()) == ["x"]  # no staging folder left behind


def test_a_run_that_fails_to_save_leaves_the_old_run_whole(env, tmp_path, monkeypatch):
    from dfclip.heads import report
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit

    cfg = make_config(epochs=1, lr=0.01, batch_size=64)
    run = fit(env["good"], cfg, runs_dir=tmp_path, name="x", device="cpu", log=lambda line: None)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_roc_pr", fail)
    with pytest.raises(OSError):
        fit(env["good"], cfg, runs_dir=tmp_path, name="x", device="cpu", log=lambda line: None)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_sweep_over_an_earlier_sweep_keeps_no_stale_file(env, dfhead, tmp_path):
    runs = tmp_path / "runs"
    code, _, err = dfhead("sweep", env["good"], *FAST, "--cvar-alpha", "0.5,1", "--runs-dir", runs, "--name", "s")
    assert code == 0, err
    assert (runs / "s" / "heatmap_alpha_gamma.png").is_file()
    (runs / "s" / "parts" / "best-r007").mkdir()  # from an earlier sweep with more ranks
    code, _, err = dfhead("sweep", env["good"], *FAST, "--lr", "0.01,0.02", "--runs-dir", runs, "--name", "s")
    assert code == 0, err
    assert not (runs / "s" / "heatmap_alpha_gamma.png").exists()  # no alpha x gamma grid this time
    assert sorted(p.name for p in (runs / "s" / "parts").iterdir()) == ["best-r000", "rows-r000.parquet"]
    assert sorted(pl.read_parquet(runs / "s" / "leaderboard.parquet")["lr"]) == [0.01, 0.02]
    assert sorted(p.name for p in runs.iterdir()) == ["s"]


# --- rows whose image file is gone from the input folder ----------------------------------------------

@pytest.fixture
def moved(env, tmp_path) -> dict:
    """A store whose input folder holds the images of all rows but 3 (moved or deleted since extract)."""
    folder = tmp_path / "images"
    prov = {**store.open(env["good"]).provenance, "input_root": str(folder)}
    s = rewrite_store(env["good"], tmp_path / "store", provenance=prov)
    paths = store.open(s).meta["path"].to_list()
    for p in paths[3:]:
        (folder / p).parent.mkdir(parents=True, exist_ok=True)
        (folder / p).touch()
    return {"store": s, "folder": folder, "n": len(paths), "gone": 3}


def gone_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "no image file in" in line]


@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_training_warns_with_the_count_of_rows_whose_image_is_gone(moved, dfhead, tmp_path, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # one line on the terminal too
    code, out, err = dfhead(command, moved["store"], *FAST, "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    lines = gone_lines(out + err)
    assert len(lines) == 1, out + err
    assert lines[0].startswith(f"warning: {moved['gone']} of the {moved['n']} rows of store {moved['store']}")
    assert str(moved["folder"]) in lines[0] and "--prune-missing" in lines[0]


def test_eval_warns_with_the_count_of_rows_whose_image_is_gone(env, moved, dfhead):
    code, out, err = dfhead("eval", env["run"], "--store", moved["store"], "--json", "--device", "cpu")
    assert code == 0, err
    lines = gone_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"warning: {moved['gone']} of the {moved['n']} rows"), err


def test_an_input_folder_that_is_not_here_is_one_note(env, moved, dfhead, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    shutil.rmtree(moved["folder"])
    code, out, err = dfhead("fit", moved["store"], *FAST, "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    notes = [line for line in (out + err).splitlines() if "is not on this machine" in line]
    assert len(notes) == 1 and str(moved["folder"]) in notes[0]
    assert not gone_lines(out + err)


# --- one-class stores: undefined metrics are null --------------------------------------------------------

def test_one_class_metrics_are_undefined_not_zero():
    y = torch.zeros(6)
    s = torch.tensor([0.1, 0.2, 0.7, 0.3, 0.9, 0.4])
    rep = metrics.evaluate(s, y, threshold=0.5)[0]
    pred = (s >= 0.5).long().numpy()
    for key in ("recall_fake", "f1_fake", "precision_macro", "recall_macro", "f1_macro", "auc", "eer"):
        assert rep[key] is None, key
    assert rep["precision_fake"] == 0.0  # two reals called fake: 0 of them are fake, a defined 0
    assert rep["recall_real"] == pytest.approx(recall_score(y.numpy(), pred, pos_label=0))
    assert rep["precision_real"] == pytest.approx(precision_score(y.numpy(), pred, pos_label=0))
    assert rep["f1_real"] == pytest.approx(f1_score(y.numpy(), pred, pos_label=0))
    assert rep["acc"] == pytest.approx(4 / 6)
    nothing_called_fake = metrics.evaluate(s * 0.1, y, threshold=0.5)[0]
    assert nothing_called_fake["precision_fake"] is None
    only_fakes = metrics.evaluate(s, torch.ones(6), threshold=0.5)[0]
    assert only_fakes["recall_real"] is None and only_fakes["f1_real"] is None and only_fakes["f1_macro"] is None
    both = metrics.evaluate(s, torch.tensor([0, 0, 1, 0, 1, 1.0]), threshold=0.5)[0]
    assert both["f1_macro"] == pytest.approx(f1_score([0, 0, 1, 0, 1, 1], pred, average="macro"))


def test_eval_on_a_one_class_store_prints_a_dash(env, dfhead, tmp_path):
    reals = rewrite_store(env["good"], tmp_path / "reals", keep=store.open(env["good"]).meta["label"].to_numpy() == 0)
    code, out, err = dfhead("eval", env["run"], "--store", reals, "--device", "cpu", "--include-train")
    assert code == 0, err
    shown = {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) == 2}
    assert shown["recall_fake"] == "-" and shown["f1_macro"] == "-" and shown["auc"] == "-"
    code, out, err = dfhead("eval", env["run"], "--store", reals, "--device", "cpu", "--include-train", "--json")
    assert json.loads(out)["recall_fake"] is None


# --- a read-only run folder ------------------------------------------------------------------------------

def test_a_robustness_table_in_a_read_only_run_folder_is_printed_with_one_warning(env, dfhead, tmp_path, monkeypatch):
    run = shutil.copytree(env["run"], tmp_path / "run")
    for old in run.glob("robustness.*"):  # from another test's table
        old.unlink()
    copy = rewrite_store(env["good"], tmp_path / "copy")

    def read_only(self, file, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(file))

    monkeypatch.setattr(pl.DataFrame, "write_parquet", read_only)
    code, out, err = dfhead("eval", run, "--store", env["good"], "--store", copy, "--device", "cpu")
    assert code == 0, err
    assert "Traceback" not in out + err
    assert "robustness" in out and "good" in out and "copy" in out  # the table
    warnings = [line for line in err.splitlines() if "could not be saved" in line]
    assert len(warnings) == 1 and str(run) in warnings[0] and "Read-only" in warnings[0]
    assert "wrote" not in out
    assert not list(run.glob("*robustness*")) and not list(run.glob(".*"))


# --- dfhead runs ---------------------------------------------------------------------------------------

def test_runs_lists_a_nan_threshold_as_broken(env, dfhead, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    for name in ("good", "nan"):
        shutil.copytree(env["run"], tmp_path / name)
    config = json.loads((tmp_path / "nan" / "config.json").read_text())
    config["threshold"] = float("nan")
    (tmp_path / "nan" / "config.json").write_text(json.dumps(config))
    code, out, err = dfhead("runs", tmp_path)
    assert code == 0, err
    rows = {line.split("┆")[0].strip("│ "): line for line in out.splitlines() if "┆" in line}
    assert "bad config.json" in rows["nan"] and " ok " in rows["good"]


# --- predict on images: rank variables, messages ----------------------------------------------------------

TINY = ("--model", "dfclip-tiny", "--workers", "0", "--device", "cpu")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, tiny_checkpoint) -> dict:
    """Demo images, their store (tiny model) and a run trained on it."""
    from dfclip.embed import EmbedConfig, extract
    from dfclip.embed.demo import make_demo_images
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit

    root = tmp_path_factory.mktemp("images")
    images = make_demo_images(root / "images", n_per_source=6, seed=3)
    extract(images, root / "store", EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0,
                                                device="cpu"), progress=False)
    run = fit(root / "store", make_config(epochs=1, batch_size=8), runs_dir=root / "runs", name="r", device="cpu",
              log=lambda line: None)
    walked = sorted(str(p.relative_to(images)) for p in images.rglob("*") if p.suffix in (".jpg", ".png", ".webp"))
    return {"images": images, "store": root / "store", "run": run, "n": len(walked), "walked": walked}


def test_predict_ignores_rank_variables_that_no_torchrun_set(image_run, dfhead, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("COLUMNS", "500")
    code, out, err = dfhead("predict", image_run["run"], image_run["images"], "--out", tmp_path / "s.csv",
                            "--workers", "0", "--device", "cpu")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "s.csv").height == image_run["n"]
    notes = [line for line in (out + err).splitlines() if "TORCHELASTIC_RUN_ID" in line]
    assert len(notes) == 1 and "WORLD_SIZE=2" in notes[0] and "RANK=1" in notes[0], out + err
    assert os.environ["WORLD_SIZE"] == "2"  # restored for the rest of the process
    code, out, err = dfhead("predict", image_run["run"], "--store", image_run["store"], "--out", tmp_path / "t.csv",
                            "--device", "cpu")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "t.csv").height == image_run["n"]
    assert sum("TORCHELASTIC_RUN_ID" in line for line in (out + err).splitlines()) == 1


def test_predict_under_torchrun_merges_the_ranks_into_one_file(image_run, tmp_path):
    out = tmp_path / "s.csv"
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(VENV_BIN / "dfhead"), "predict", str(image_run["run"]), str(image_run["images"]),
                           "--out", str(out), "--workers", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = pl.read_csv(out)
    assert scores["path"].to_list() == image_run["walked"]  # every image once, sorted, from both ranks
    assert sum("wrote" in line for line in proc.stdout.splitlines()) == 1
    assert "TORCHELASTIC_RUN_ID" not in proc.stdout + proc.stderr


def test_predict_on_one_hidden_image_scores_it(image_run, dfhead, tmp_path):
    hidden = tmp_path / ".face.png"
    shutil.copy(next(image_run["images"].rglob("*.png")), hidden)
    code, out, err = dfhead("predict", image_run["run"], hidden, "--out", tmp_path / "s.csv", "--workers", "0",
                            "--device", "cpu")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "s.csv")["path"].to_list() == [".face.png"]


@pytest.mark.parametrize("name", ["notes.txt", "missing.png"])
def test_predicts_messages_name_the_users_file(image_run, dfhead, tmp_path, name):
    target = tmp_path / name
    if name == "notes.txt":
        target.write_text("not an image")
    code, out, err = dfhead("predict", image_run["run"], target, "--out", tmp_path / "s.csv", "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert str(target) in err and "_input" not in err and "--manifest" not in err, err
    assert ("does not exist" if name == "missing.png" else "not an image") in err
