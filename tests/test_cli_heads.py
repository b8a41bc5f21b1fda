"""`dfhead` as a user meets it: every bad input is one line and a non-zero exit (never a
traceback), fit -> predict -> eval round trips, `runs`, and sweep's comma lists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn import metrics as skm

from dfclip import cli
from dfclip import store
from dfclip.heads.config import parse_grid_values
from dfclip.errors import UserError
from dfclip.store.synthetic import SYNTHETIC_PROVENANCE, make_synthetic_store, rewrite_store
from dfclip.store.writer import ShardWriter

FAST = ["--epochs", "3", "--lr", "0.01", "--batch-size", "64", "--device", "cpu"]


def dfhead(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `dfhead ARGS` in this process through the real entry point; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["dfhead", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.dfhead_main()
    captured = capsys.readouterr()
    code = exit_.value.code
    return (0 if code is None else code), captured.out, captured.err


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Stores for every case, and one run fitted through the CLI (validated on its own val store)."""
    root = tmp_path_factory.mktemp("cli")
    full = make_synthetic_store(root / "full", n=2000, dim=32, signal=4, fake_rate=0.7, seed=3)
    is_val = np.array([int(g[3:]) % 4 == 0 for g in store.open(full).meta["group"]])  # whole videos
    good = rewrite_store(full, root / "good", keep=~is_val)
    val = rewrite_store(full, root / "val", keep=is_val)
    labels = store.open(good).meta["label"].to_numpy()
    paths = {
        "root": root, "good": good, "val": val,
        "other_model": rewrite_store(good, root / "other", provenance=SYNTHETIC_PROVENANCE | {"model": "ViT-B-16"}),
        "no_labels": rewrite_store(good, root / "nolabels", label=np.full(len(labels), -1)),
        "one_class": rewrite_store(good, root / "fakes", label=np.where(labels == 0, -1, labels)),
        "not_a_run": root / "not_a_run", "runs": root / "runs",
    }
    paths["not_a_run"].mkdir()
    return paths


@pytest.fixture(scope="module")
def fitted(env) -> Path:
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["dfhead", "fit", env["good"], "--val-store", env["val"], *FAST, "--threshold",
                                 "fpr@0.01", "--runs-dir", str(env["runs"]), "--name", "cli-run"])
        with pytest.raises(SystemExit) as exit_:
            cli.dfhead_main()
        assert exit_.value.code in (0, None)
    finally:
        mp.undo()
    return env["runs"] / "cli-run"


ERRORS = [
    (["fit", "{good}", "--cvar-alpha", "0"], "--cvar-alpha must be in (0, 1]"),
    (["fit", "{good}", "--cvar-alpha", "1.5"], "--cvar-alpha must be in (0, 1]"),
    (["fit", "{good}", "--auc-gamma", "-0.1"], "--auc-gamma must be >= 0"),
    (["fit", "{good}", "--sam-rho", "-0.05"], "--sam-rho must be >= 0"),
    (["fit", "{good}", "--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    (["fit", "{good}", "--batch-size", "1"], "--batch-size must be >= 2 for the mlp head"),
    (["fit", "{good}", "--holdout-source", "midjourney"], "unknown holdout source(s) midjourney"),
    (["fit", "{good}", "--val-store", "{other_model}"], "holds model=ViT-B-16"),
    (["fit", "{no_labels}"], "no labelled rows"),
    (["fit", "{one_class}"], "the training set has no real (label 0) rows"),
    (["fit", "{good}", "--val-store", "{one_class}"], "give a --val-store with both classes"),
    (["fit", "{root}/missing"], "does not exist"),
    (["fit", "{good}", "--threshold", "fpr@2"], "--threshold must be eer"),
    (["fit", "{good}", "--threshold", "youden"], "--threshold must be eer"),
    (["fit", "{good}", "--preset", "nope"], "unknown preset 'nope'"),
    (["fit", "{good}", "--precision", "fp16"], "--precision must be one of auto, fp32, bf16"),
    (["eval", "{run}", "--store", "{val}", "--precision", "fp8"], "--precision must be one of auto, fp32, bf16"),
    (["predict", "{run}", "--store", "{val}", "--precision", "half"], "--precision must be one of auto, fp32, bf16"),
    (["eval", "{not_a_run}"], "not a dfclip run directory"),
    (["eval", "{not_a_run}", "--store", "{good}"], "not a dfclip run directory"),
    (["predict", "{not_a_run}", "--store", "{good}"], "not a dfclip run directory"),
    (["predict", "{run}"], "give either IMAGES"),
    (["eval", "{run}", "--store", "{other_model}"], "embed with the run's model"),
    (["eval", "{run}", "--store", "{no_labels}"], "no labelled rows"),
    (["runs", "{not_a_run}"], "no runs under"),
    (["sweep", "{good}", "--cvar-alpha", "0.1,abc"], "--cvar-alpha got 'abc'; expected a comma list of float"),
    (["sweep", "{good}", "--feature-noise", "true,maybe"], "--feature-noise got 'maybe'"),
    (["sweep", "{good}", "--epochs", "2,2.5"], "--epochs got '2.5'; expected a comma list of int"),
    (["sweep", "{good}", "--cvar-alpha", "0.5,2"], "--cvar-alpha must be in (0, 1]"),
    (["sweep", "{good}", "--threshold", "eer,fpr@0"], "--threshold must be eer"),
    (["sweep", "{good}", "--val-frac", "0.1,0.2"], "--val-frac must be one value for a whole sweep"),
    (["sweep", "{good}", "--split-seed", "0,1"], "--split-seed must be one value for a whole sweep"),
]


@pytest.mark.parametrize("args, message", ERRORS, ids=[" ".join(a).replace("{", "").replace("}", "") for a, _ in ERRORS])
def test_bad_input_is_one_line_and_a_nonzero_exit(env, fitted, monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)  # anything written by mistake lands here
    args = [a.format(**env, run=fitted) for a in args]
    if args[0] in ("fit", "sweep"):  # fast settings first, so the case's own options win
        args = [*args[:2], *FAST, *args[2:]]
    code, out, err = dfhead(monkeypatch, capsys, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]


def test_ctrl_c_exits_130_and_says_so(env, monkeypatch, capsys):
    """typer turns KeyboardInterrupt into a silent exit 130; the CLI must still tell the user."""
    from dfclip import heads
    import dfclip.heads.run  # noqa: F401

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(heads.run, "fit", interrupted)
    code, out, err = dfhead(monkeypatch, capsys, "fit", env["good"], *FAST)
    assert code == 130 and "Traceback" not in out + err
    assert err.strip().startswith("interrupted:")


def _free_memory_for(env, monkeypatch, heads: float, **settings) -> None:
    """Pretend the CPU has room for `heads` heads of these settings (plus the data) and no more."""
    from dfclip import heads as heads_pkg
    import dfclip.heads.run  # noqa: F401
    from dfclip.heads.config import make_config

    s = store.open(env["good"])
    one = heads_pkg.run.sweep_memory_bytes(len(s), s.dim, [make_config(batch_size=64, **settings)])
    data = heads_pkg.run.sweep_memory_bytes(len(s), s.dim, [])
    monkeypatch.setattr(heads_pkg.run, "free_memory_bytes", lambda device: int((data + heads * (one - data)) / 0.9))


def test_sweep_too_big_is_refused_in_one_line(env, monkeypatch, capsys, tmp_path):
    _free_memory_for(env, monkeypatch, 1.5)
    code, out, err = dfhead(monkeypatch, capsys, "sweep", env["good"], "--cvar-alpha", "0.5,1", *FAST,
                            "--runs-dir", tmp_path)
    assert code == 2 and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and "split the grid into smaller sweeps" in err
    assert list(tmp_path.iterdir()) == []  # a refused sweep leaves no empty parts/


@pytest.mark.parametrize("command", [["fit"], ["sweep", "--cvar-alpha", "0.5,1"]])
def test_a_head_too_big_for_memory_says_to_make_it_smaller(env, monkeypatch, capsys, tmp_path, command):
    """`fit --hidden 100000` is checked like a sweep; one head that cannot fit asks for a smaller head."""
    _free_memory_for(env, monkeypatch, 10)
    code, out, err = dfhead(monkeypatch, capsys, command[0], env["good"], *command[1:], *FAST, "--hidden", "4096",
                            "--runs-dir", tmp_path)
    assert code == 2 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "lower --hidden or --depth" in lines[0] and "--hidden 4096" in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_installed_dfhead_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "dfhead"), "fit", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: store {tmp_path / 'nowhere'} does not exist; create it with "
                                                f"`dfembed extract IMAGES --out {tmp_path / 'nowhere'}`"]


# --- fit -> predict -> eval ------------------------------------------------------------------------------


def predicted(env, fitted, monkeypatch, capsys, tmp_path) -> pl.DataFrame:
    out_csv = tmp_path / "scores.csv"
    code, out, err = dfhead(monkeypatch, capsys, "predict", fitted, "--store", env["val"], "--out", out_csv,
                            "--device", "cpu")
    assert code == 0, err
    return pl.read_csv(out_csv)


def test_fit_saves_the_threshold_and_predict_uses_it(env, fitted, monkeypatch, capsys, tmp_path):
    config = json.loads((fitted / "config.json").read_text())
    assert config["run"]["threshold"] == "fpr@0.01"
    df = predicted(env, fitted, monkeypatch, capsys, tmp_path)
    meta = store.open(env["val"]).meta
    assert df.columns == ["path", "score", "pred", "label"]
    assert df.height == meta.height and sorted(df["path"]) == sorted(meta["path"])
    assert df.sort("path")["label"].to_list() == meta.sort("path")["label"].to_list()
    s = df["score"].to_numpy()  # calibrated P(fake); the decision threshold in that scale is the calibration's
    assert ((s >= 0) & (s <= 1)).all()
    assert np.array_equal(df["pred"].to_numpy(), (s >= config["calibration"]["threshold"]).astype(int))
    reals = df["label"].to_numpy() == 0
    assert df["pred"].to_numpy()[reals].mean() <= 0.01  # fpr@0.01 keeps its promise on val
    assert df["pred"].to_numpy()[~reals].mean() > 0.5


def test_eval_json_equals_sklearn_on_predicts_scores(env, fitted, monkeypatch, capsys, tmp_path):
    df = predicted(env, fitted, monkeypatch, capsys, tmp_path)
    code, out, err = dfhead(monkeypatch, capsys, "eval", fitted, "--store", env["val"], "--json", "--device", "cpu")
    assert code == 0, err
    rep = json.loads(out)
    y, s = df["label"].to_numpy(), df["score"].to_numpy()  # calibrated: the same order as eval's raw scores
    config = json.loads((fitted / "config.json").read_text())
    t = config["threshold"]
    pred = (s >= config["calibration"]["threshold"]).astype(int)
    assert rep["n"] == len(y) and rep["n_fake"] == y.sum() and rep["threshold"] == t
    assert rep["auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
    assert rep["ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
    assert rep["acc"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert rep["acc@0.5"] == pytest.approx(skm.accuracy_score(y, s >= 0.5), abs=1e-12)
    assert rep["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    for i, cls in enumerate(("real", "fake")):
        assert (rep[f"precision_{cls}"], rep[f"recall_{cls}"], rep[f"f1_{cls}"]) == pytest.approx((p[i], r[i], f[i]))
    assert rep["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    for target in (0.01, 0.05):
        assert rep[f"tpr@fpr={target}"] == pytest.approx(tpr[fpr <= target].max(), abs=1e-12)
    gap = np.abs((1 - tpr) - fpr)
    i = int(np.argmin(gap))
    assert rep["eer"] == pytest.approx((fpr[i] + 1 - tpr[i]) / 2, abs=1e-9)
    assert rep["acc@eer"] == pytest.approx(skm.accuracy_score(y, s >= thr[i]), abs=1e-12)


def test_config_json_records_the_resolved_precision(env, fitted, monkeypatch, capsys, tmp_path):
    from dfclip.heads.precision import resolve_precision

    assert json.loads((fitted / "config.json").read_text())["run"]["precision"] == resolve_precision(
        "auto", torch.device("cpu"))  # what "auto" meant here, never "auto"
    code, out, err = dfhead(monkeypatch, capsys, "fit", env["good"], "--val-store", env["val"], *FAST, "--epochs", "1",
                            "--precision", "bf16", "--runs-dir", tmp_path, "--name", "bf16")
    assert code == 0, err
    assert "head matmuls in bf16" in out
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["run"]["precision"] == "bf16"


def test_eval_in_bf16_and_fp32_agree(env, fitted, monkeypatch, capsys):
    reps = {}
    for precision in ("fp32", "bf16"):
        code, out, err = dfhead(monkeypatch, capsys, "eval", fitted, "--store", env["val"], "--json", "--device", "cpu",
                                "--precision", precision)
        assert code == 0, err
        reps[precision] = json.loads(out)
    assert reps["bf16"]["auc"] == pytest.approx(reps["fp32"]["auc"], abs=5e-3)


def test_eval_without_store_prints_the_fit_report(env, fitted, monkeypatch, capsys):
    code, out, _ = dfhead(monkeypatch, capsys, "eval", fitted, "--json")
    assert code == 0 and json.loads(out) == json.loads((fitted / "report.json").read_text())


def test_runs_lists_the_run_directories(env, fitted, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = dfhead(monkeypatch, capsys, "runs", env["runs"])
    assert code == 0, err
    assert "cli-run" in out and "val_auc" in out


def test_cli_sweep_writes_a_leaderboard_whose_best_run_predicts(env, monkeypatch, capsys, tmp_path):
    code, out, err = dfhead(monkeypatch, capsys, "sweep", env["good"], "--cvar-alpha", "0.5,1", "--l2-normalize",
                            "false,true", "--head", "linear", "--seeds", "2", *FAST, "--runs-dir", tmp_path,
                            "--name", "cli-sweep")
    assert code == 0, err
    board = pl.read_parquet(tmp_path / "cli-sweep" / "leaderboard.parquet")
    assert board.height == 4 and board["seeds"].to_list() == [2] * 4
    assert sorted(board.select("cvar_alpha", "l2_normalize").iter_rows()) == [
        (0.5, False), (0.5, True), (1.0, False), (1.0, True)]
    code, _, err = dfhead(monkeypatch, capsys, "predict", tmp_path / "cli-sweep" / "best", "--store", env["val"],
                          "--out", tmp_path / "best.csv", "--device", "cpu")
    assert code == 0, err
    assert pl.read_csv(tmp_path / "best.csv").height == len(store.open(env["val"]))


# --- comma lists ---------------------------------------------------------------------------------------


def test_grid_values_are_typed_per_option():
    got = parse_grid_values({"cvar_alpha": "0.1, 0.3,1", "epochs": "5,10", "hidden": "64,128",
                             "feature_noise": "true,false,1,0,yes,no", "head": "mlp,linear",
                             "threshold": "eer,0.5,fpr@0.01", "seed": "3"})
    assert got == {"cvar_alpha": [0.1, 0.3, 1.0], "epochs": [5, 10], "hidden": [64, 128],
                   "feature_noise": [True, False, True, False, True, False], "head": ["mlp", "linear"],
                   "threshold": ["eer", "0.5", "fpr@0.01"], "seed": [3]}
    assert all(type(v) is int for v in got["epochs"] + got["hidden"])
    assert all(type(v) is bool for v in got["feature_noise"])
    with pytest.raises(UserError, match="unknown option --nonsense"):
        parse_grid_values({"nonsense": "1"})


@pytest.mark.parametrize("args, message", [
    (["fit", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["fit", "--no-such-option"], "No such option"),
    (["sweep", "--cvar-alpha"], "requires an argument"),
])
def test_usage_errors_are_one_line_too(dfhead, args, message):
    code, out, err = dfhead(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "--help" in lines[0]
    assert "Traceback" not in err and "╭" not in err
