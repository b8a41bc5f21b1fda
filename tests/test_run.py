"""heads.run end to end on small synthetic stores: run directories, thresholds, sweeps (one
process and torchrun with two CPU ranks), the memory refusal, eval / predict / runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import polars.selectors as cs
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from sklearn.metrics import roc_auc_score
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dfclip import store
from dfclip.heads import run as R
from dfclip.heads.precision import matmuls_in, resolve_precision
from dfclip.heads.config import make_config
from dfclip.heads import train as T
from dfclip.heads.report import flat_metrics, load_run, load_run_config, plot_roc_pr
from dfclip.heads.train import train
from dfclip.errors import UserError
from dfclip.store.synthetic import make_synthetic_store, rewrite_store
from dfclip.store.writer import ShardWriter

QUIET = {"log": lambda line: None}
FAST = dict(epochs=4, lr=1e-2, batch_size=64)
ISSUE_METRICS = ("n", "n_fake", "n_real", "auc", "ap", "eer", "eer_threshold", "acc@0.5", "acc@eer", "threshold", "acc",
                 "balanced_acc", "precision_macro", "recall_macro", "f1_macro", "precision_fake", "recall_fake",
                 "f1_fake", "precision_real", "recall_real", "f1_real", "tpr@fpr=0.01", "tpr@fpr=0.05")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """A train store and a validation store cut from one synthetic store by video (3000 rows, dim 32)."""
    root = tmp_path_factory.mktemp("run")
    full = make_synthetic_store(root / "full", n=3000, dim=32, signal=4, fake_rate=0.7, seed=2)
    meta = store.open(full).meta
    is_val = np.array([int(g[3:]) % 5 == 0 for g in meta["group"]])
    return {"train": rewrite_store(full, root / "train", keep=~is_val), "val": rewrite_store(full, root / "val", keep=is_val),
            "root": root}


def val_rows(stores) -> tuple[pl.DataFrame, np.ndarray]:
    """The validation store's rows (by path) and labels."""
    x, meta = store.open(stores["val"]).load()
    return meta.sort("path"), meta.sort("path")["label"].to_numpy()


@pytest.fixture(scope="module")
def fitted(stores) -> tuple[Path, object]:
    cfg = make_config(**FAST, holdout_sources=("gan",))
    run_dir = R.fit(stores["train"], cfg, val_store=stores["val"], runs_dir=stores["root"] / "runs", name="e2e",
                    device="cpu", **QUIET)
    return run_dir, cfg


def approx_tree(a, b, tol=1e-4, path="") -> None:
    """Assert two JSON-like trees are equal, numbers to `tol`."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            approx_tree(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert b == pytest.approx(a, abs=tol), path
    else:
        assert a == b, path


# --- fit: the run directory ---------------------------------------------------------------------


def test_fit_learns_the_signal_and_writes_every_artifact(stores, fitted):
    run_dir, cfg = fitted
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "head.safetensors", "metrics.parquet",
                                                         "reliability.png", "report.json", "roc_pr.png",
                                                         "train_rows.parquet"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["val"]["auc"] >= 0.95

    config = json.loads((run_dir / "config.json").read_text())
    # every setting, with --precision auto recorded as what it meant on this machine
    assert config["run"] == cfg.to_dict() | {"precision": resolve_precision("auto", torch.device("cpu"))}
    assert config["provenance"] == store.open(stores["train"]).provenance
    assert config["data"]["store"] == stores["train"] and config["data"]["val_store"] == stores["val"]
    assert config["threshold"] == report["threshold"] and config["best_epoch"] == report["best_epoch"]
    assert config["head"] == {"kind": "mlp", "dim": 32, "hidden": 32, "depth": 3, "dropout": 0.335}

    # weights: safetensors (a JSON header, then raw tensor bytes): no pickle anywhere
    raw = (run_dir / "head.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    head, _ = load_run(run_dir)
    state = head.state_dict()
    assert set(header) - {"__metadata__"} == set(state)
    with safe_open(str(run_dir / "head.safetensors"), "pt") as f:
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), state[name])
    assert not zipfile.is_zipfile(run_dir / "head.safetensors") and raw[0] != 0x80  # no torch.save zip, no pickle
    loaded = torch.load(run_dir / "head.safetensors", weights_only=True)  # torch reads safetensors too
    assert all(torch.equal(loaded[n], state[n]) for n in state)

    history = pl.read_parquet(run_dir / "metrics.parquet")
    assert history["epoch"].to_list() == list(range(1, cfg.epochs + 1))
    assert {"train_loss", "val_loss", "val_auc", "val_eer", "seconds"} <= set(history.columns)
    assert report["best_epoch"] == int(np.argmax(history["val_auc"])) + 1
    assert report["val"]["auc"] == pytest.approx(history["val_auc"].max(), abs=1e-9)

    for name in ("val", "holdout"):
        assert set(ISSUE_METRICS) <= set(report[name]), name
    assert set(report["val"]["per_source"]) == {"diffusion", "faceswap", "ffhq"}  # gan is held out
    assert set(report["holdout"]["per_source"]) == {"gan", "ffhq"}
    assert report["val"]["video"]["auc"] is not None

    png = (run_dir / "roc_pr.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(run_dir / "roc_pr.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_report_numbers_are_sklearns_on_the_saved_head(stores, fitted):
    """Per source, per video and headline val metrics of report.json, recomputed from predict's scores
    on the validation store less the held-out source."""
    run_dir, _ = fitted
    report = json.loads((run_dir / "report.json").read_text())["val"]
    scores = R.predict_store(run_dir, stores["val"], device="cpu")  # sorted by path
    meta, y = val_rows(stores)
    assert scores["path"].to_list() == meta["path"].to_list()
    seen = meta["source"].to_numpy() != "gan"
    meta, y, s = meta.filter(pl.Series(seen)), y[seen], scores["score"].to_numpy().astype(np.float64)[seen]
    pred = scores["pred"].to_numpy()[seen]
    assert report["n"] == len(y)
    src, reals = meta["source"].to_numpy(), y == 0
    assert report["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    for name, got in report["per_source"].items():
        rows = src == name
        if name != "ffhq":
            pick = (rows & (y == 1)) | reals
            assert got["auc"] == pytest.approx(roc_auc_score(y[pick], s[pick]), abs=1e-9), name
        # per-source accuracy is at the run's threshold: the one `dfhead predict` decides with
        assert got["acc"] == pytest.approx(np.mean(pred[rows] == y[rows]), abs=1e-9), name
        assert got["n"] == rows.sum()
    video = pl.DataFrame({"g": meta["group"], "s": s, "y": y}).group_by("g").agg(pl.col("s").mean(), pl.col("y").max())
    assert report["video"]["auc"] == pytest.approx(roc_auc_score(video["y"], video["s"]), abs=1e-9)
    assert report["video"]["n"] == video.height


def test_holdout_report_ranks_the_unseen_source_against_val_reals(stores, fitted):
    run_dir, _ = fitted
    holdout = json.loads((run_dir / "report.json").read_text())["holdout"]
    head, _ = load_run(run_dir)
    # the held-out rows are the train store's gan rows (the validation store's gan rows are left out of
    # validation); the reals they are ranked against are the validation reals
    x_gan, _ = store.open(stores["train"]).load(source="gan")
    x_real, _ = store.open(stores["val"]).load(label=0)
    x = np.concatenate([x_gan, x_real]).astype(np.float32)
    y = np.r_[np.ones(len(x_gan)), np.zeros(len(x_real))]
    cpu = torch.device("cpu")
    with torch.no_grad(), matmuls_in(resolve_precision("auto", cpu), cpu):  # as the fit scored it
        s = torch.sigmoid(head(torch.from_numpy(x)))[0].numpy()
    assert (holdout["n"], holdout["n_fake"]) == (len(y), len(x_gan))
    assert holdout["per_source"]["gan"]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)


def test_default_run_name_never_replaces_an_earlier_run(stores, tmp_path):
    """The default name leaves out lr, epochs...: a second fit that differs only there gets a new directory."""
    a = R.fit(stores["train"], make_config(head="linear", epochs=1, lr=1e-2), val_store=stores["val"],
              runs_dir=tmp_path, device="cpu", **QUIET)
    b = R.fit(stores["train"], make_config(head="linear", epochs=1, lr=1e-3), val_store=stores["val"],
              runs_dir=tmp_path, device="cpu", **QUIET)
    assert a != b and b.name == f"{a.name}-2"
    assert [json.loads((d / "config.json").read_text())["run"]["lr"] for d in (a, b)] == [1e-2, 1e-3]


@pytest.mark.parametrize("spec", ["eer", "0.5", "fpr@0.01"])
def test_threshold_is_saved_and_used_by_predict(stores, spec):
    run_dir = R.fit(stores["train"], make_config(**FAST, threshold=spec), val_store=stores["val"],
                    runs_dir=stores["root"] / "runs", name=f"thr-{spec}", device="cpu", **QUIET)
    config = json.loads((run_dir / "config.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())["val"]
    t = config["threshold"]
    assert config["run"]["threshold"] == spec and report["threshold"] == t
    pred = R.predict_store(run_dir, stores["val"], device="cpu")
    s, y = pred["score"].to_numpy(), pred["label"].to_numpy()
    t_calibrated = config["calibration"]["threshold"]  # predict's scores are calibrated; so is this threshold
    assert np.array_equal(pred["pred"].to_numpy(), (s >= t_calibrated).astype(np.int8))
    fpr = np.mean(s[y == 0] >= t_calibrated)
    assert 1 - report["recall_real"] == pytest.approx(fpr, abs=1e-12)  # the report used the same decisions
    if spec == "eer":
        assert t == report["eer_threshold"]
    elif spec == "0.5":
        assert t == 0.5
    else:
        n_real = int((y == 0).sum())
        assert fpr <= 0.01
        assert int(np.sum(s[y == 0] >= t_calibrated)) == int(0.01 * n_real)  # the most fakes caught within 1 % FPR


# --- sweep ----------------------------------------------------------------------------------------


def numeric_equal(a: pl.DataFrame, b: pl.DataFrame, tol=1e-4, skip=("seconds",)) -> None:
    assert a.columns == b.columns
    for c in a.columns:
        if c in skip:
            continue
        if a[c].dtype.is_numeric():
            assert np.allclose(a[c].to_numpy().astype(float), b[c].to_numpy().astype(float), atol=tol,
                               equal_nan=True), c
        else:
            assert a[c].to_list() == b[c].to_list(), c


def test_sweep_of_one_configuration_equals_fit(stores, fitted):
    run_dir, cfg = fitted
    out, board = R.sweep(stores["train"], [cfg], val_store=stores["val"], runs_dir=stores["root"] / "runs",
                         name="sweep-of-one", device="cpu", **QUIET)
    best = out / "best"
    approx_tree(json.loads((run_dir / "report.json").read_text()) | {"seconds": 0},
                json.loads((best / "report.json").read_text()) | {"seconds": 0})
    numeric_equal(pl.read_parquet(run_dir / "metrics.parquet"), pl.read_parquet(best / "metrics.parquet"))
    a, b = load_run(run_dir)[0].state_dict(), load_run(best)[0].state_dict()
    assert all(torch.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert board.height == 1 and board["val_auc_mean"][0] == pytest.approx(
        json.loads((run_dir / "report.json").read_text())["val"]["auc"], abs=1e-4)


SWEEP_BASE = dict(FAST, epochs=3, holdout_sources=("gan",))


@pytest.fixture(scope="module")
def swept(stores):
    cfgs = R.grid(make_config(**SWEEP_BASE), seeds=2, cvar_alpha=[0.5, 1.0], auc_gamma=[0.0, 0.5])
    out, board = R.sweep(stores["train"], cfgs, val_store=stores["val"], runs_dir=stores["root"] / "runs",
                         name="grid", device="cpu", **QUIET)
    return cfgs, out, board


def test_sweep_writes_leaderboard_heatmap_and_best_run(stores, swept):
    cfgs, out, board = swept
    assert len(cfgs) == 8 and sorted({c.seed for c in cfgs}) == [0, 1]
    runs = pl.read_parquet(out / "runs.parquet")
    assert runs.height == 8
    assert pl.read_parquet(out / "leaderboard.parquet").equals(board)
    # one row per configuration, mean and std over its 2 seeds, unseen-source metrics included
    assert board.height == 4 and board["seeds"].to_list() == [2] * 4
    assert board.select("cvar_alpha", "auc_gamma").unique().height == 4
    for metric in ("val_auc", "val_eer", "holdout_auc", "holdout_auc[gan]", "val_video_auc", "val_tpr@fpr=0.01"):
        for row in board.iter_rows(named=True):
            mine = runs.filter((pl.col("cvar_alpha") == row["cvar_alpha"]) & (pl.col("auc_gamma") == row["auc_gamma"]))
            assert sorted(mine["seed"]) == [0, 1]
            assert row[f"{metric}_mean"] == pytest.approx(mine[metric].mean(), abs=1e-12), metric
            assert row[f"{metric}_std"] == pytest.approx(mine[metric].std(), abs=1e-12), metric
    assert board["val_auc_mean"].to_list() == sorted(board["val_auc_mean"], reverse=True)
    assert (out / "heatmap_alpha_gamma.png").read_bytes().startswith(b"\x89PNG")

    # best/ is an ordinary run directory of the top run
    best = out / "best"
    report = json.loads((best / "report.json").read_text())
    assert report["val"]["auc"] == pytest.approx(runs["val_auc"].max(), abs=1e-12)
    ev = R.evaluate_run(best, stores["val"], device="cpu")  # all of the val store, gan included
    for source in ("diffusion", "faceswap"):  # each source against the same val reals as in the fit
        assert ev["per_source"][source]["auc"] == pytest.approx(report["val"]["per_source"][source]["auc"], abs=1e-6)
    pred = R.predict_store(best, stores["val"], device="cpu")
    assert pred.height == len(store.open(stores["val"]))
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["configs"] == 8 and set(summary["varying"]) == {"cvar_alpha", "auc_gamma", "seed"}


def test_sweep_ranks_by_select(stores):
    """--select loss: the leaderboard is sorted by val loss at each run's kept epoch, and best/ is the lowest."""
    cfgs = R.grid(make_config(**(FAST | dict(epochs=2, head="linear", select="loss", lr=3e-2))), cvar_alpha=[0.1, 1.0],
                  auc_gamma=[0.0, 2.0])
    out, board = R.sweep(stores["train"], cfgs, runs_dir=stores["root"] / "select", name="s", device="cpu", **QUIET)
    assert board["val_loss_mean"].to_list() == sorted(board["val_loss_mean"])
    runs = pl.read_parquet(out / "runs.parquet")
    best = pl.read_parquet(out / "best" / "metrics.parquet")
    best_epoch = json.loads((out / "best" / "report.json").read_text())["best_epoch"]
    assert best.filter(pl.col("epoch") == best_epoch)["val_loss"][0] == pytest.approx(runs["val_loss"].min(), abs=1e-12)
    assert board["val_auc_mean"].to_list() != sorted(board["val_auc_mean"], reverse=True)  # a different order


def test_rerunning_a_sweep_does_not_mix_in_old_rows(stores):
    cfgs = R.grid(make_config(**(FAST | dict(epochs=1, head="linear"))), cvar_alpha=[0.5, 1.0])
    runs_dir = stores["root"] / "rerun"
    out, _ = R.sweep(stores["train"], cfgs, runs_dir=runs_dir, name="s", device="cpu", **QUIET)
    # rows left behind by a rank of an earlier, wider run must not join the next leaderboard
    pl.read_parquet(out / "parts" / "rows-r000.parquet").write_parquet(out / "parts" / "rows-r001.parquet")
    out, board = R.sweep(stores["train"], cfgs[:1], runs_dir=runs_dir, name="s", device="cpu", **QUIET)
    assert board.height == 1 and pl.read_parquet(out / "runs.parquet").height == 1


def test_sweep_under_torchrun_with_two_cpu_ranks(stores, tmp_path):
    """Each rank trains a disjoint slice; rank 0 merges; the result equals the one-process sweep."""
    opts = ["--head", "linear", "--lr", "0.03", "--batch-size", "64", "--epochs", "3", "--cvar-alpha", "0.5,1",
            "--auc-gamma", "0,0.5", "--device", "cpu", "--runs-dir", str(tmp_path), "--name", "dist"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           str(VENV_BIN / "dfhead"), "sweep", stores["train"], *opts],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "dist"
    parts = [pl.read_parquet(out / "parts" / f"rows-r{r:03d}.parquet") for r in (0, 1)]
    keys = [set(p.select("cvar_alpha", "auc_gamma").iter_rows()) for p in parts]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    runs = pl.read_parquet(out / "runs.parquet")
    assert runs.height == 4 and runs.select("cvar_alpha", "auc_gamma").unique().height == 4
    assert sorted(runs["rank"].unique()) == [0, 1]

    cfgs = R.grid(make_config(head="linear", lr=0.03, batch_size=64, epochs=3), cvar_alpha=[0.5, 1.0],
                  auc_gamma=[0.0, 0.5])
    _, single = R.sweep(stores["train"], cfgs, runs_dir=tmp_path, name="one", device="cpu", **QUIET)
    dist = pl.read_parquet(out / "leaderboard.parquet")
    key = ["cvar_alpha", "auc_gamma"]
    numeric_equal(dist.sort(key).drop(cs.contains("seconds")),
                  single.sort(key).drop(cs.contains("seconds")))
    assert (out / "best" / "head.safetensors").is_file()


def test_sweep_too_big_for_memory_is_refused(stores, monkeypatch):
    cfgs = R.grid(make_config(**FAST), cvar_alpha=[0.5, 1.0])
    need = R.sweep_memory_bytes(len(store.open(stores["train"])), 32, cfgs, itemsize=4)
    assert need > 2400 * 32 * 4  # the data, plus the heads
    assert R.sweep_memory_bytes(10_000, 768, cfgs * 12) > R.sweep_memory_bytes(10_000, 768, cfgs)
    monkeypatch.setattr(R, "free_memory_bytes", lambda device: need)  # needs more than 90 % of it
    with pytest.raises(UserError, match=r"needs about .* GiB but .* is free on cpu; split the grid"):
        R.sweep(stores["train"], cfgs, runs_dir=stores["root"] / "mem", name="big", device="cpu", **QUIET)
    monkeypatch.setattr(R, "free_memory_bytes", lambda device: 2 * need)
    R.sweep(stores["train"], cfgs[:1], runs_dir=stores["root"] / "mem", name="ok", device="cpu", **QUIET)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive (and the peak) among tensors created while the mode is on.

    Every op's outputs are seen here; a storage counts from its first appearance until its
    Python object is finalised (torch keeps that object alive exactly as long as the storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = st.nbytes()
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key)
        return out


@pytest.mark.parametrize("options", [
    dict(hidden=256, depth=1, batch_size=16),  # validation's activations dominate
    dict(hidden=64, depth=3, batch_size=256, feature_noise=True, auc_gamma=0.5, sam_rho=0.05),  # training's do
    dict(hidden=128, depth=2, batch_size=16, l2_normalize=True),
])
def test_memory_estimate_covers_the_measured_peak_on_cpu(stores, options):
    """Every tensor a 4-head sweep allocates on the CPU (data, heads, optimiser, training steps,
    validation chunks, reports), counted at its peak, stays within sweep_memory_bytes."""
    cfgs = [make_config(epochs=1, lr=1e-2, seed=i, **options) for i in range(4)]
    s = store.open(stores["train"])
    with LiveTensorBytes() as mem:
        train(s, cfgs, device="cpu", **QUIET)
    assert mem.peak > 0
    assert R.sweep_memory_bytes(len(s), s.dim, cfgs, itemsize=4) >= mem.peak


def test_memory_check_counts_the_embeddings_as_the_device_holds_them(stores, monkeypatch):
    """float32 on the CPU (load_data converts), the store's own dtype (float16 here) on a GPU;
    the validation store's rows count too."""
    seen = []
    monkeypatch.setattr(R, "sweep_memory_bytes", lambda n, dim, cfgs, itemsize: seen.append((n, itemsize)) or 0)
    monkeypatch.setattr(R, "free_memory_bytes", lambda device: 2**40)
    tr, va = store.open(stores["train"]), store.open(stores["val"])
    cfgs = [make_config(**FAST)]
    R._check_memory([tr], cfgs, torch.device("cpu"))
    R._check_memory([tr, va], cfgs, torch.device("cuda"))
    assert tr.provenance["dtype"] == "float16"
    assert seen == [(len(tr), 4), (len(tr) + len(va), 2)]


def test_free_memory_probe_reads_the_os(stores):
    free = R.free_memory_bytes(torch.device("cpu"))
    assert 2**20 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- eval, predict, runs ----------------------------------------------------------------------------


def test_evaluate_predict_and_list_runs(stores, fitted, swept):
    run_dir, _ = fitted
    assert R.evaluate_run(run_dir) == json.loads((run_dir / "report.json").read_text())
    # without a held-out source, eval on the validation store reproduces the fit's val report
    plain = R.fit(stores["train"], make_config(**FAST), val_store=stores["val"], runs_dir=stores["root"] / "runs",
                  name="plain", device="cpu", **QUIET)
    ev = R.evaluate_run(plain, stores["val"], device="cpu")
    approx_tree(json.loads((plain / "report.json").read_text())["val"], ev, tol=1e-6)
    listed = R.list_runs(stores["root"] / "runs")
    names = listed["run"].to_list()
    assert "e2e" in names and "grid/best" in names and not any("parts" in n for n in names)
    row = listed.filter(pl.col("run") == "e2e").row(0, named=True)
    assert row["val_auc"] == json.loads((run_dir / "report.json").read_text())["val"]["auc"]
    assert row["holdout_auc"] is not None


@pytest.mark.parametrize("call", [lambda d, s: R.evaluate_run(d), lambda d, s: R.evaluate_run(d, s),
                                  lambda d, s: R.predict_store(d, s)])
def test_not_a_run_directory_is_refused(stores, tmp_path, call):
    with pytest.raises(UserError, match="not a dfclip run directory"):
        call(tmp_path, stores["val"])


def test_a_run_of_an_unknown_format_is_refused(fitted, tmp_path):
    run_dir, _ = fitted
    copy = tmp_path / "future"
    copy.mkdir()
    (copy / "head.safetensors").write_bytes((run_dir / "head.safetensors").read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["format"] == "dfclip-run/1" and load_run_config(run_dir) == config
    (copy / "config.json").write_text(json.dumps(config | {"format": "dfclip-run/2"}))
    with pytest.raises(UserError, match="format 'dfclip-run/2'"):
        load_run(copy)


def test_fit_scores_val_and_holdout_once(stores, tmp_path, monkeypatch):
    """One inference pass per epoch (validation) plus one each for the final val and holdout
    reports; the ROC plot draws those same scores instead of running the head again."""
    calls = []
    real = T.predict_logits
    monkeypatch.setattr(T, "predict_logits", lambda head, x, **kw: calls.append(x.shape[0]) or real(head, x, **kw))
    monkeypatch.setattr(R, "predict_logits", lambda *a, **kw: pytest.fail("run.py ran inference again"))
    cfg = make_config(**FAST, holdout_sources=("gan",))
    run_dir = R.fit(stores["train"], cfg, val_store=stores["val"], runs_dir=tmp_path, name="once", device="cpu",
                    **QUIET)
    assert len(calls) == cfg.epochs + 2
    assert (run_dir / "roc_pr.png").is_file()


def test_roc_plot_draws_the_tie_aware_curve(tmp_path, monkeypatch):
    """Tied scores are one ROC point (the diagonal for all-equal scores), as the AUC counts them."""
    import matplotlib.axes

    lines = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: lines.append((kw.get("label"), a)) or real(self, *a, **kw))
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.5, 0.1], dtype=np.float32)
    labels = np.array([1, 1, 0, 1, 0, 0])
    plot_roc_pr({"val": (scores, labels)}, tmp_path / "roc.png")
    (fpr, tpr), (recall, precision) = [a for label, a in lines if label == "val"]
    assert np.allclose(fpr, [0, 0, 2 / 3, 1]) and np.allclose(tpr, [0, 1 / 3, 1, 1])
    assert np.allclose(recall, [1 / 3, 1, 1]) and np.allclose(precision, [1, 3 / 5, 1 / 2])
    assert (tmp_path / "roc.png").is_file()


def test_rows_without_a_source_are_no_leaderboard_column():
    report = {"auc": 0.9, "per_source": {"": {"n": 10, "auc": 0.9, "acc": 0.8}, "gan": {"n": 5, "auc": 0.7, "acc": 1}}}
    cols = flat_metrics(report, "val")
    assert cols["val_auc"] == 0.9 and cols["val_auc[gan]"] == 0.7
    assert "val_auc[]" not in cols
