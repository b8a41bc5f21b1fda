"""Calibration maths against its definitions and scikit-learn, the fit on synthetic heads, and calibration
in run folders: saved with the run, reported before and after, applied by predict without changing a label."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from dfclip.errors import UserError
from dfclip.heads import calibration as C
from dfclip.heads import run as R
from dfclip.heads.config import make_config
from dfclip.heads.report import load_run_config
from dfclip.store.synthetic import make_synthetic_store

QUIET = {"log": lambda line: None}


def synthetic_logits(n: int, scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from P(fake) = sigmoid(z) (a calibrated head), and its logits times `scale`
    (scale > 1: an over-confident head whose right temperature is `scale`)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, n)
    y = (rng.random(n) < C.sigmoid(z)).astype(np.float64)
    return z * scale, y


def test_ece_by_hand():
    # Bins of width 1/15; p = 1/15 falls in the first bin (closed on the right, as sklearn cuts them).
    p = np.array([0.02, 1 / 15, 0.5, 0.52, 0.99, 1.0])
    y = np.array([0, 1, 1, 0, 1, 1])
    # bin 0: {0.02, 1/15}, mean p 0.04333, frac 0.5; bin 7 (7/15=0.467..8/15=0.533]: {0.5, 0.52}, mean 0.51, frac 0.5;
    # bin 14: {0.99, 1.0}, mean 0.995, frac 1.
    by_hand = (2 / 6) * abs(0.5 - (0.02 + 1 / 15) / 2) + (2 / 6) * abs(0.5 - 0.51) + (2 / 6) * abs(1 - 0.995)
    assert C.ece(p, y) == pytest.approx(by_hand, abs=1e-15)
    assert C.reliability(p, y)["count"].tolist() == [2, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 2]
    assert C.ece(np.array([0.3, 0.3]), np.array([0, 1])) == pytest.approx(0.2)  # 0.5 fake at mean 0.3


def test_reliability_bins_match_sklearn_calibration_curve():
    rng = np.random.default_rng(1)
    p = np.concatenate([0.6 * rng.beta(0.5, 2, 700), np.array([0.0, 1.0, 2 / 15, 7 / 15])])  # (0.6, 14/15] empty
    y = (rng.random(p.size) < p ** 0.7).astype(int)
    table = C.reliability(p, y)
    used = table["count"] > 0  # sklearn drops empty bins
    assert not used.all()  # some bins are empty here, so dropping them is checked
    frac, mean = calibration_curve(y, p, n_bins=C.ECE_BINS, strategy="uniform")
    np.testing.assert_allclose(table["frac_fake"][used], frac, rtol=1e-12)
    np.testing.assert_allclose(table["mean_score"][used], mean, rtol=1e-12)
    # ECE is the count-weighted gap of those same bins.
    weights = table["count"][used] / p.size
    assert C.ece(p, y) == pytest.approx(np.sum(weights * np.abs(frac - mean)), abs=1e-14)


def test_nll_and_brier_match_sklearn():
    z, y = synthetic_logits(2000, 1.5)
    p = C.sigmoid(z)
    assert C.nll_from_logits(z, y) == pytest.approx(log_loss(y, p), rel=1e-9)
    assert C.brier(p, y) == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    report = C.scores_report(z, y, C.Calibration("temperature", a=0.5))
    assert report["after"]["nll"] == pytest.approx(log_loss(y, C.sigmoid(z / 2)), rel=1e-9)
    assert report["before"]["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)


def test_temperature_fit_lowers_nll_of_an_over_confident_head_and_is_one_on_a_calibrated_one():
    z, y = synthetic_logits(20000, 3.0, seed=2)
    cal = C.fit_calibration("temperature", z, y)
    assert cal.temperature == pytest.approx(3.0, rel=0.05)
    assert cal.b == 0
    before, after = C.nll_from_logits(z, y), C.nll_from_logits(cal.logits(z), y)
    assert after < before - 0.05
    # The minimum: a nearby temperature is no better.
    for t in (cal.temperature * 0.97, cal.temperature * 1.03):
        assert C.nll_from_logits(z / t, y) > after
    z, y = synthetic_logits(20000, 1.0, seed=3)
    assert C.fit_calibration("temperature", z, y).temperature == pytest.approx(1.0, abs=0.05)


def test_platt_recovers_scale_and_shift_and_equals_an_unregularised_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    z, y = synthetic_logits(20000, 1.0, seed=4)
    shifted = (z - 1.0) / 0.5  # the true map back: a = 0.5, b = 1
    cal = C.fit_calibration("platt", shifted, y)
    assert cal.a == pytest.approx(0.5, rel=0.05) and cal.b == pytest.approx(1.0, abs=0.1)
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(shifted[:, None], y)
    assert cal.a == pytest.approx(lr.coef_[0, 0], rel=1e-5) and cal.b == pytest.approx(lr.intercept_[0], abs=1e-5)


def test_separable_validation_keeps_the_temperature_bounded_and_one_class_is_the_identity():
    z = np.array([-3.0, -1.0, 1.0, 2.0])
    cal = C.fit_calibration("temperature", z, np.array([0, 0, 1, 1]))
    # No finite optimum (the NLL keeps falling as T -> 0): the fit stops, finite, sharp and within its bounds.
    assert 10 < cal.a <= C.A_MAX and np.isfinite(cal.from_logits(z)).all()
    assert C.fit_calibration("platt", z, np.ones(4)).method == "none"
    assert C.fit_calibration("none", z, np.array([0, 0, 1, 1])) == C.Calibration()
    with pytest.raises(UserError, match="--calibration"):
        C.fit_calibration("isotonic", z, np.array([0, 0, 1, 1]))


def test_calibrated_threshold_keeps_every_decision():
    z, y = synthetic_logits(5000, 2.0, seed=5)
    raw = C.sigmoid(z).astype(np.float32)
    threshold = float(np.quantile(raw, 0.4))
    for method in ("temperature", "platt"):
        cal = C.fit_calibration(method, z, y, threshold)
        assert (cal.from_probabilities(raw) >= cal.threshold).tolist() == (raw >= threshold).tolist()
        assert cal.from_probabilities(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One run per --calibration, fitted at a high lr without dropout on a noisy synthetic store, so the heads
    come out over-confident; {"store": path, method: run folder}."""
    root = tmp_path_factory.mktemp("cal")
    st = make_synthetic_store(root / "st", n=1500, dim=16, signal=1.5, fake_rate=0.5, seed=7)
    out = {"store": st}
    for method in C.METHODS:
        cfg = make_config(epochs=6, lr=3e-2, batch_size=64, hidden=64, dropout=0.0, calibration=method)
        out[method] = R.fit(st, cfg, runs_dir=root / "runs", name=method, device="cpu", **QUIET)
    return out


@pytest.mark.parametrize("method", C.METHODS)
def test_fit_saves_the_calibration_and_reports_it(runs, method):
    run = runs[method]
    config, report = load_run_config(run), json.loads((run / "report.json").read_text())
    assert config["calibration"]["method"] == method and report["calibration"] == config["calibration"]
    assert (run / "reliability.png").stat().st_size > 0
    val = report["val"]["calibration"]
    assert set(val["before"]) == set(val["after"]) == {"ece", "nll", "brier"}
    if method != "none":  # fitted on val by NLL: never worse there than the raw scores (a = 1, b = 0 is a candidate)
        assert val["after"]["nll"] <= val["before"]["nll"] + 1e-12
    else:
        assert val["after"] == val["before"]
    assert report["val"]["fpr@threshold"] == pytest.approx(1 - report["val"]["recall_real"], abs=1e-15)
    assert report["val"]["tpr@threshold"] == report["val"]["recall_fake"]


def test_temperature_softens_an_over_confident_run(runs):
    report = json.loads((runs["temperature"] / "report.json").read_text())
    assert report["calibration"]["temperature"] > 1.2
    val = report["val"]["calibration"]
    assert val["after"]["nll"] < val["before"]["nll"] - 0.01


@pytest.mark.parametrize("method", C.METHODS)
def test_predict_writes_calibrated_scores_and_keeps_every_label(runs, method):
    from dfclip import store
    from dfclip.heads.report import load_run

    run, st = runs[method], runs["store"]
    head, config = load_run(run)
    x, rows = store.open(st).load()
    order = np.argsort(rows["path"].to_numpy(), kind="stable")
    raw = R._scores(head, config, x, torch.device("cpu"))[0].numpy()[order]  # the head's uncalibrated probabilities
    table = R.predict_store(run, st, device="cpu")
    assert table["pred"].to_list() == (raw >= config["threshold"]).astype(int).tolist()  # as without calibration
    expected = C.calibration_from_config(config).from_probabilities(raw)
    np.testing.assert_array_equal(table["score"].to_numpy(), expected)
    if method == "none":
        np.testing.assert_array_equal(table["score"].to_numpy(), raw.astype(np.float64))
    else:
        assert not np.allclose(table["score"].to_numpy(), raw, atol=1e-3)
    # The stored calibrated threshold makes the same decisions on the calibrated scores.
    assert ((table["score"] >= config["calibration"]["threshold"]).cast(pl.Int8) == table["pred"]).all()
    real = R.predict_store(run, st, device="cpu", score_means="real")
    assert real.columns == ["path", "score_real", "pred", "label"]
    np.testing.assert_array_equal(real["score_real"].to_numpy(), 1 - table["score"].to_numpy())
    assert real["pred"].to_list() == table["pred"].to_list()


def test_eval_reports_calibration_and_a_damaged_calibration_is_one_line(runs, tmp_path):
    import shutil

    rep = R.evaluate_run(runs["platt"], runs["store"], device="cpu", include_train=True, **QUIET)
    assert rep["calibration"]["method"] == "platt"
    # The same numbers as scikit-learn on predict's calibrated scores (and on the raw ones, undone).
    table = R.predict_store(runs["platt"], runs["store"], device="cpu")
    y, p = table["label"].to_numpy(), table["score"].to_numpy()
    cal = C.calibration_from_config(load_run_config(runs["platt"]))
    raw = C.sigmoid((C.logit(p) - cal.b) / cal.a)
    assert rep["calibration"]["after"]["nll"] == pytest.approx(log_loss(y, p), rel=1e-5)
    assert rep["calibration"]["after"]["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-5)
    assert rep["calibration"]["before"]["nll"] == pytest.approx(log_loss(y, raw), rel=1e-5)
    assert rep["calibration"]["after"]["ece"] == pytest.approx(C.ece(p, y), abs=1e-6)
    assert rep["fpr@threshold"] == pytest.approx(1 - rep["recall_real"], abs=1e-15)
    run = shutil.copytree(runs["platt"], tmp_path / "damaged")
    config = json.loads((run / "config.json").read_text())
    config["calibration"]["a"] = float("nan")
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match='"calibration": "a" must be a number') as e:
        load_run_config(run)
    assert len(str(e.value).splitlines()) == 1


def test_fit_reports_the_test_split_at_the_threshold(tmp_path):
    from dfclip import store
    from dfclip.store.synthetic import rewrite_store

    st = make_synthetic_store(tmp_path / "st", n=900, dim=16, signal=3, fake_rate=0.5, seed=8)
    n = store.open(st).meta.height
    split = np.array(["test", "val", "train", "train", "train"])[np.arange(n) % 5]
    st = rewrite_store(st, tmp_path / "split", split=split)
    run = R.fit(st, make_config(epochs=2, batch_size=64, threshold="fpr@0.01"), runs_dir=tmp_path / "runs",
                name="t", device="cpu", **QUIET)
    rep = json.loads((run / "report.json").read_text())
    assert rep["test"]["n"] == int((split == "test").sum())
    by_eval = R.evaluate_run(run, st, split="test", device="cpu", **QUIET)
    assert rep["test"]["fpr@threshold"] == by_eval["fpr@threshold"] and rep["test"]["tpr@threshold"] == by_eval["tpr@threshold"]
    assert rep["test"]["calibration"] == by_eval["calibration"]


def test_cli_predict_score_means_real_and_the_fit_summary(runs, dfhead, tmp_path):
    out = tmp_path / "s.csv"
    code, stdout, err = dfhead("predict", runs["temperature"], "--store", runs["store"], "--out", out, "--device", "cpu",
                               "--score-means", "real")
    assert code == 0, err
    assert "score_real column is 1 - P(fake)" in " ".join(stdout.split())  # rich wraps lines
    table = pl.read_csv(out)
    assert table.columns == ["path", "score_real", "pred", "label"]
    by_api = R.predict_store(runs["temperature"], runs["store"], device="cpu")
    np.testing.assert_allclose(table["score_real"].to_numpy(), 1 - by_api["score"].to_numpy(), rtol=1e-12)
    code, _, err = dfhead("predict", runs["temperature"], "--store", runs["store"], "--out", out, "--device", "cpu",
                          "--score-means", "maybe")
    assert code == 2 and "--score-means must be fake or real" in err and len(err.strip().splitlines()) == 1
    code, stdout, err = dfhead("eval", runs["temperature"], "--store", runs["store"], "--device", "cpu",
                               "--include-train")
    assert code == 0, err
    stdout = " ".join(stdout.split())
    assert "raw," in stdout and "calibrated (temperature)" in stdout and "fpr@threshold" in stdout
