"""The heads side of robustness: nothing lost, nothing stale, nothing silent.

NaN/inf settings, divergence, hand-edited config.json, damaged weights, unwritable outputs,
non-finite embeddings, --val-store overlap and the cosmetic items, each through the real
`dfhead` entry point: every refusal is one line per problem, exit 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from dfclip import store
from dfclip.store.synthetic import make_synthetic_store, rewrite_store

FAST = ["--epochs", "2", "--lr", "0.01", "--batch-size", "64", "--device", "cpu"]


def assert_refused(code: int, out: str, err: str, message: str, lines: int = 1) -> list[str]:
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    got = err.strip().splitlines()
    assert len(got) == lines and all(line.startswith("error: ") for line in got), err
    assert any(message in line for line in got), err
    return got


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("robust")
    full = make_synthetic_store(root / "full", n=1200, dim=16, signal=4, fake_rate=0.6, seed=5)
    is_val = np.array([int(g[3:]) % 4 == 0 for g in store.open(full).meta["group"]])
    return {"root": root, "good": rewrite_store(full, root / "good", keep=~is_val),
            "val": rewrite_store(full, root / "val", keep=is_val)}


@pytest.fixture(scope="module")
def run(env) -> Path:
    """A fitted run, trained once for the module."""
    from dfclip.heads.config import make_config
    from dfclip.heads.run import fit

    return fit(env["good"], make_config(epochs=2, lr=0.01, batch_size=64), runs_dir=env["root"] / "runs",
               name="base", device="cpu", log=lambda line: None)


# --- item 6: NaN and inf settings are refused everywhere -----------------------------------------------

NON_FINITE = [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"), ("--auc-gamma", "inf"),
              ("--sam-rho", "nan"), ("--cvar-alpha", "nan"), ("--dropout", "nan"), ("--warmup-epochs", "inf"),
              ("--fake-rate", "nan"), ("--val-frac", "nan"), ("--auc-margin", "inf"), ("--vs-scale", "-inf")]


@pytest.mark.parametrize("option, value", NON_FINITE)
@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_non_finite_settings_are_refused(env, dfhead, tmp_path, command, option, value):
    given = f"0.1,{value}" if command == "sweep" and option not in ("--val-frac",) else value
    code, out, err = dfhead(command, env["good"], *FAST, option, given, "--runs-dir", tmp_path)
    assert_refused(code, out, err, f"{option} must be a finite number")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset, message", [
    ({"cvar_alpha": "abc"}, "--cvar-alpha must be a finite number, got 'abc'"),
    ({"weight_decay": math.nan}, "--weight-decay must be a finite number, got nan"),
    ({"auc_gamma": None}, "--auc-gamma must be a finite number, got None"),
    ({"patience": 2.5}, "--patience must be a whole number, got 2.5"),
    ({"balanced": "yes"}, "--balanced must be true or false"),
    ({"holdout_sources": "gan"}, "--holdout-source must be text"),
])
def test_bad_preset_values_are_one_line(env, dfhead, tmp_path, preset, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))  # json writes NaN as the NaN literal, which json reads back
    code, out, err = dfhead("fit", env["good"], *FAST, "--preset", path, "--runs-dir", tmp_path / "runs")
    assert_refused(code, out, err, message)


def test_several_bad_settings_give_one_line_each():
    from dfclip.errors import UserError
    from dfclip.heads.config import RunConfig, validate

    with pytest.raises(UserError) as e:
        validate(RunConfig(lr=math.nan, cvar_alpha="abc", epochs=None))
    assert str(e.value).splitlines() == ["--cvar-alpha must be a finite number, got 'abc'",
                                         "--lr must be a finite number, got nan",
                                         "--epochs must be a whole number, got None"]


def test_a_preset_threshold_may_be_a_number(tmp_path):
    from dfclip.heads.config import make_config

    (tmp_path / "p.json").write_text(json.dumps({"threshold": 0.5}))
    assert make_config(str(tmp_path / "p.json")).threshold == "0.5"


# --- item 6: divergence is reported -----------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--lr", "1e9"), ("--sam-rho", "1e30")])
def test_a_diverging_fit_is_an_error_naming_the_epoch(env, dfhead, tmp_path, option, value):
    code, out, err = dfhead("fit", env["good"], *FAST, option, value, "--runs-dir", tmp_path, "--name", "x")
    line = assert_refused(code, out, err, "training diverged at epoch")[0]
    assert "lower --lr" in line and "nothing was saved" in line
    assert not (tmp_path / "x").exists()


def test_a_sweep_reports_diverged_configs_and_carries_on(env, dfhead, tmp_path):
    code, out, err = dfhead("sweep", env["good"], *FAST, "--lr", "0.01,1e9", "--runs-dir", tmp_path,
                            "--name", "s")
    assert code == 0, err
    assert "diverged at epoch 1" in out and "1 of 2 configs diverged" in out
    runs = pl.read_parquet(tmp_path / "s" / "runs.parquet")
    bad = runs.filter(pl.col("lr") == 1e9)
    assert bad["diverged"].to_list() == [1] and bad["val_auc"].to_list() == [None]
    assert runs["lr"][0] == 0.01 and runs["val_auc"][0] > 0.8  # the finite config ranks first
    board = pl.read_parquet(tmp_path / "s" / "leaderboard.parquet")
    assert dict(board.select("lr", "diverged").iter_rows()) == {0.01: 0, 1e9: 1}
    assert json.loads((tmp_path / "s" / "best" / "config.json").read_text())["run"]["lr"] == 0.01


def test_a_sweep_whose_every_config_diverged_fails(env, dfhead, tmp_path):
    code, out, err = dfhead("sweep", env["good"], *FAST, "--lr", "1e9,1e10", "--runs-dir", tmp_path, "--name", "s")
    assert_refused(code, out, err, "every config of the sweep diverged")
    assert not (tmp_path / "s" / "best").exists()


def test_a_head_that_never_had_a_finite_epoch_is_diverged_not_best_epoch_0(env):
    """Before: the untrained initial weights were saved as 'best epoch 0'."""
    from dfclip.heads.config import make_config
    from dfclip.heads.data import load_data
    from dfclip.heads.train import train_group

    import torch

    cfgs = [make_config(epochs=2, lr=0.01, batch_size=64, seed=s) for s in (0, 1)]
    data = load_data(env["good"], cfgs[0], device=torch.device("cpu"))
    data.x[0, 0] = math.nan  # one poisoned row: every head that trains on it goes NaN
    results = train_group(data, cfgs, log=lambda line: None)
    assert [r.diverged for r in results] == [1, 1]


# --- item 9 and 14: a hand-edited config.json, damaged weights --------------------------------------

def _edit(run: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(config):
        d = config
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


CONFIG_EDITS = [
    (_set("threshold", math.nan), '"threshold" must be a probability in [0, 1], got nan'),
    (_set("threshold", None), '"threshold" must be a probability in [0, 1], got None'),
    (_set("threshold", "0.5"), '"threshold" must be a probability in [0, 1], got \'0.5\''),
    (lambda c: c.pop("head"), "missing field(s) head"),
    (_set("head", "dim", 17), '"head": "dim" is 17 but the run\'s feature proj ("provenance") has dim 16'),
    (_set("head", "depth", 1_000_000), '"head" describes'),  # refused from the file's header: no 13 GB head
    (_set("head", "depth", -1), "'depth' must be a whole number >= 1"),
    (_set("head", "dropout", math.nan), "'dropout' must be a number in [0, 1)"),
    (_set("head", "kind", "transformer"), '"kind" must be one of mlp, linear'),
    (_set("run", "lr", math.nan), '"run": --lr must be a finite number, got nan'),
    (_set("run", "cvar_alpha", "abc"), '"run": --cvar-alpha must be a finite number'),
]


@pytest.mark.parametrize("edit, message", CONFIG_EDITS, ids=[m for _, m in CONFIG_EDITS])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_hand_edited_config_json_is_one_line_per_problem(env, run, dfhead, tmp_path, edit, message, command):
    edited = _edit(run, tmp_path, edit)
    args = ["--store", env["val"], "--device", "cpu"] + (["--out", tmp_path / "s.csv"] if command == "predict" else [])
    code, out, err = dfhead(command, edited, *args)
    line = assert_refused(code, out, err, message)[0]
    assert "config.json" in line


def test_several_config_json_problems_are_listed_together(env, run, dfhead, tmp_path):
    def edit(config):
        config["threshold"] = None
        config["run"]["lr"] = "fast"
        config["run"]["epochs"] = math.inf
    code, out, err = dfhead("predict", _edit(run, tmp_path, edit), "--store", env["val"], "--out", tmp_path / "s.csv")
    assert_refused(code, out, err, '"threshold"', lines=3)


@pytest.mark.parametrize("damage", [b"garbage", b"\x00" * 64, None])
def test_a_damaged_head_safetensors_is_one_line(env, run, dfhead, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    weights = copy / "head.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(damage if damage is not None else data[: len(data) // 2])  # None: truncated
    code, out, err = dfhead("predict", copy, "--store", env["val"], "--out", tmp_path / "s.csv", "--device", "cpu")
    assert_refused(code, out, err, "head.safetensors")


# --- item 11: outputs are checked before training -----------------------------------------------------

def test_a_runs_dir_that_is_a_file_is_refused_before_training(env, dfhead, tmp_path):
    (tmp_path / "file").write_text("x")
    for command in ("fit", "sweep"):
        for runs_dir in (tmp_path / "file", tmp_path / "file" / "below"):
            code, out, err = dfhead(command, env["good"], *FAST, "--runs-dir", runs_dir)
            assert_refused(code, out, err, "a file, not a folder")
            assert "epoch" not in out  # refused before training


@pytest.mark.parametrize("where, message", [("folder", "is a folder"), ("missing/s.csv", "does not exist")])
def test_an_unusable_predict_out_is_refused_before_scoring(env, run, dfhead, tmp_path, where, message):
    (tmp_path / "folder").mkdir()
    code, out, err = dfhead("predict", run, "--store", env["val"], "--out", tmp_path / where)
    assert_refused(code, out, err, message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_runs_dir_is_refused_before_training(env, dfhead, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, out, err = dfhead("fit", env["good"], *FAST, "--runs-dir", locked / "runs")
        assert_refused(code, out, err, "no permission to write")
    finally:
        locked.chmod(0o755)


def test_writable_checks_use_the_permission_bits(tmp_path, monkeypatch):
    """The permission path (which root cannot reach) through os.access."""
    from dfclip.errors import UserError
    from dfclip.heads.report import check_writable_dir, check_writable_file

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="no permission to write in"):
        check_writable_dir(tmp_path / "runs", "--runs-dir")
    with pytest.raises(UserError, match="no permission to write there"):
        check_writable_file(tmp_path / "s.csv", "--out")


# --- item 5: non-finite embeddings -------------------------------------------------------------------

@pytest.fixture(scope="module")
def poisoned(env) -> tuple[str, int]:
    """A copy of the good store whose shard (as another tool might write it) holds NaN and inf rows."""
    dst = rewrite_store(env["good"], env["root"] / "poisoned")
    shard = store.open(dst).shards[0].path
    with h5py.File(shard, "r+") as f:
        x = f["embeddings"][...]
        x[[3, 10]] = np.nan
        x[20, 5] = np.inf
        f["embeddings"][...] = x
    return dst, 3


def test_fit_drops_non_finite_rows_with_one_warning(env, poisoned, dfhead, tmp_path):
    path, bad = poisoned
    code, out, err = dfhead("fit", path, *FAST, "--runs-dir", tmp_path, "--name", "r")
    assert code == 0, err
    warnings = [line for line in out.splitlines() if "NaN or inf" in line]
    assert len(warnings) == 1 and f"dropped {bad} rows" in warnings[0]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert math.isfinite(report["val"]["auc"]) and report["best_epoch"] >= 1
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"]["train"] + config["data"]["val"] == len(store.open(path)) - bad


def test_sweep_drops_non_finite_rows_with_one_warning(env, poisoned, dfhead, tmp_path):
    code, out, err = dfhead("sweep", poisoned[0], *FAST, "--cvar-alpha", "0.5,1", "--l2-normalize", "false,true",
                            "--runs-dir", tmp_path)
    assert code == 0, err
    assert sum("NaN or inf" in line for line in out.splitlines()) == 1


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_predict_and_eval_leave_non_finite_rows_out_with_one_warning(env, run, poisoned, dfhead, tmp_path, command):
    path, bad = poisoned
    extra = ["--out", tmp_path / "s.csv"] if command == "predict" else ["--json"]
    code, out, err = dfhead(command, run, "--store", path, "--device", "cpu", *extra)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"warning: dropped {bad} rows whose embeddings hold NaN or inf ({bad} in {path}); re-extract them to use them"]
    n = pl.read_csv(tmp_path / "s.csv").height if command == "predict" else json.loads(out)["n"]
    assert n == len(store.open(path)) - bad


# --- item 8: --val-store is the training store ----------------------------------------------------------

def test_the_train_store_as_val_store_is_refused(env, dfhead, tmp_path):
    (tmp_path / "link").symlink_to(env["good"])
    for val in (env["good"], tmp_path / "link"):
        code, out, err = dfhead("fit", env["good"], *FAST, "--val-store", val, "--runs-dir", tmp_path)
        assert_refused(code, out, err, "is the training store itself")


def test_a_val_store_sharing_paths_with_the_train_store_gets_a_warning(env, dfhead, tmp_path):
    copy = shutil.copytree(env["good"], tmp_path / "copy")
    code, out, err = dfhead("fit", env["good"], *FAST, "--val-store", copy, "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    n = len(store.open(copy))
    assert sum(f"warning: {n} of the {n} --val-store rows have paths" in line for line in out.splitlines()) == 1


# --- items 18 and 19 ---------------------------------------------------------------------------------

def test_a_store_without_rows_says_so_not_every_label_is_minus_1(env):
    """E.g. a store whose every image failed: its shards hold failures and no rows."""
    from dfclip.errors import UserError
    from dfclip.heads.data import split_rows

    with pytest.raises(UserError, match="the store has no rows; embed images"):
        split_rows(store.open(env["good"]).meta.head(0), val_frac=0.2, seed=0)


def test_a_sweep_notes_a_small_training_set_once(env, dfhead, tmp_path):
    code, out, err = dfhead("sweep", env["good"], *FAST, "--batch-size", "5000", "--l2-normalize", "false,true",
                            "--head", "linear,mlp", "--runs-dir", tmp_path)
    assert code == 0, err
    assert sum(line.startswith("note: only") for line in out.splitlines()) == 1


def test_runs_marks_runs_without_weights_and_prints_tiny_alphas_in_full(env, dfhead, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    runs = tmp_path / "runs"
    code, _, err = dfhead("fit", env["good"], *FAST, "--cvar-alpha", "0.00001", "--runs-dir", runs, "--name", "tiny")
    assert code == 0, err
    shutil.copytree(runs / "tiny", runs / "gone")
    (runs / "gone" / "head.safetensors").unlink()
    code, out, err = dfhead("runs", runs)
    assert code == 0, err
    rows = {line.split("┆")[0].strip("│ "): line for line in out.splitlines() if "┆" in line}
    assert "no weights" in rows["gone"] and "ok" in rows["tiny"]
    assert "1e-05" in rows["tiny"]


def test_a_sweep_prints_tiny_alphas_in_full(env, dfhead, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = dfhead("sweep", env["good"], *FAST, "--cvar-alpha", "0.00001,1", "--runs-dir", tmp_path)
    assert code == 0, err
    assert "1e-05" in out


def test_a_killed_predicts_temp_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    from dfclip import pipeline

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{pipeline.TEMP_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{pipeline.TEMP_PREFIX}{os.getpid()}-abc"
    for d in (stale, live):
        (d / "store").mkdir(parents=True)
    pipeline.remove_dead_temps()
    assert not stale.exists() and live.exists()


def test_sigterm_unwinds_so_temp_folders_are_removed(tmp_path):
    """A SIGTERM'd dfhead runs its cleanup (TemporaryDirectory.__exit__) instead of dying in place."""
    script = (
        "import os, signal, sys, tempfile, time\n"
        "from dfclip import cli\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "def cmd():\n"
        "    with tempfile.TemporaryDirectory(prefix='dfclip-predict-'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "cli.head_app.command('hang')(cmd)\n"
        "sys.argv = ['dfhead', 'hang']\n"
        "cli.dfhead_main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
