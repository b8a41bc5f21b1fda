"""heads.metrics against scikit-learn (and a brute-force pairwise AUC) on tie-heavy, batched data."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from sklearn import metrics as skm

from dfclip.heads import metrics
from dfclip.errors import UserError

TPR_TARGETS = (0.0, 0.01, 0.05, 0.1, 0.3, 1.0)
# sklearn's own complaints about one-class oracle inputs, which these tests make on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true"),
    pytest.mark.filterwarnings("ignore:A single label was found"),
]


def make_heads(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """K=6 heads of float64 scores with different distributions and many ties, plus [N] labels."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.35).astype(np.int64)
    noise = rng.random(n)
    rows = [
        np.round(0.3 * labels + 0.7 * noise, 1),  # weakly informative, 11 distinct values
        np.round(rng.beta(2 + 3 * labels, 2, n), 2),  # beta shift, some ties
        np.round(noise, 1),  # uninformative, ties only
        rng.integers(0, 9, n) / 8,  # dyadic values: ties and exact 0.5 scores
        np.where(labels == 1, 0.9, 0.1) + 0.05 * np.round(noise, 1),  # perfect separation with ties
        np.full(n, 0.5),  # constant score: every row tied
    ]
    return np.stack(rows), labels


def sklearn_eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """EER oracle: first sklearn ROC point (decreasing threshold) minimising |FNR - FPR|."""
    fpr, tpr, thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    gap = np.abs((1 - tpr) - fpr)
    best = np.flatnonzero(gap <= gap.min() + 1e-12)[0]  # exact ties in the rationals -> first one
    return (fpr[best] + 1 - tpr[best]) / 2, thresholds[best]


def sklearn_tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, target: float) -> float:
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return tpr[fpr <= target].max()


def sklearn_headline(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """The evaluate() headline dict for one head, computed with scikit-learn."""
    both = 0 < labels.sum() < len(labels)
    predicted = (scores >= np.asarray(threshold, dtype=scores.dtype)).astype(np.int64)
    out = {"n": len(labels), "n_fake": int(labels.sum()), "n_real": int((labels == 0).sum())}
    out["auc"] = skm.roc_auc_score(labels, scores) if both else None
    out["ap"] = skm.average_precision_score(labels, scores) if labels.sum() > 0 else None
    eer_value, eer_threshold = sklearn_eer(scores, labels) if both else (None, None)
    out["eer"] = eer_value
    out["eer_threshold"] = eer_threshold if eer_threshold is not None and np.isfinite(eer_threshold) else None
    out["acc@0.5"] = skm.accuracy_score(labels, scores >= 0.5)
    out["acc@eer"] = skm.accuracy_score(labels, scores >= eer_threshold) if both else None
    out["threshold"] = float(threshold)
    out["acc"] = skm.accuracy_score(labels, predicted)
    out["balanced_acc"] = skm.balanced_accuracy_score(labels, predicted) if both else None
    for name, positive in (("fake", 1), ("real", 0)):
        out[f"precision_{name}"] = skm.precision_score(labels, predicted, pos_label=positive, zero_division=0)
        out[f"recall_{name}"] = skm.recall_score(labels, predicted, pos_label=positive, zero_division=0)
        out[f"f1_{name}"] = skm.f1_score(labels, predicted, pos_label=positive, zero_division=0)
    for metric, function in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        out[f"{metric}_macro"] = function(labels, predicted, labels=[0, 1], average="macro", zero_division=0)
    for target in (0.01, 0.05):
        out[f"tpr@fpr={target}"] = sklearn_tpr_at_fpr(scores, labels, target) if both else None
    if not both:  # the absent class has no recall or F1, a precision only if called, no macro average
        absent, positive = ("real", 0) if labels.sum() else ("fake", 1)
        out[f"recall_{absent}"] = out[f"f1_{absent}"] = None
        if not (predicted == positive).any():
            out[f"precision_{absent}"] = None
        for metric in ("precision", "recall", "f1"):
            out[f"{metric}_macro"] = None
    return out


def assert_report_equal(actual: dict, expected: dict) -> None:
    """Same keys; numbers equal to 1e-12; None exactly where expected. balanced_acc is only compared when set."""
    if expected["balanced_acc"] is None:  # one class: sklearn's value is checked in threshold_metrics tests
        expected = {k: v for k, v in expected.items() if k != "balanced_acc"}
        actual = {k: v for k, v in actual.items() if k != "balanced_acc"}
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, str):  # a video report's pooling
            assert actual[key] == value, key
        elif value is None:
            assert actual[key] is None, key
        else:
            assert actual[key] == pytest.approx(float(value), rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("seed", range(4))
def test_rank_metrics_match_sklearn_with_ties(seed):
    scores, labels = make_heads(seed)
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    auc, ap = metrics.roc_auc(s, y), metrics.average_precision(s, y)
    eer_value, eer_threshold = metrics.eer(s, y)
    assert auc.shape == ap.shape == eer_value.shape == eer_threshold.shape == (len(scores),)
    for k, row in enumerate(scores):
        assert auc[k].item() == pytest.approx(skm.roc_auc_score(labels, row), abs=1e-12)
        assert ap[k].item() == pytest.approx(skm.average_precision_score(labels, row), abs=1e-12)
        expected_eer, expected_threshold = sklearn_eer(row, labels)
        assert eer_value[k].item() == pytest.approx(expected_eer, abs=1e-12)
        assert eer_threshold[k].item() == expected_threshold
        for target in TPR_TARGETS:
            tpr = metrics.tpr_at_fpr(s, y, target)[k].item()
            assert tpr == pytest.approx(sklearn_tpr_at_fpr(row, labels, target), abs=1e-12)


def test_auc_equals_pairwise_definition():
    """AUC = P(fake score > real score) + P(tie) / 2, by brute force over all pairs."""
    scores, labels = make_heads(7, n=120)
    fake, real = scores[:, labels == 1, None], scores[:, None, labels == 0]
    pairwise = ((fake > real) + 0.5 * (fake == real)).mean(axis=(1, 2))
    auc = metrics.roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    np.testing.assert_allclose(auc.numpy(), pairwise, rtol=0, atol=1e-12)


def test_roc_points_are_sklearn_roc_curve():
    scores, labels = make_heads(1)
    roc = metrics.roc_points(torch.from_numpy(scores), torch.from_numpy(labels))
    assert roc.fpr.shape == roc.tpr.shape == roc.thresholds.shape == roc.is_distinct.shape == (6, len(labels) + 1)
    for k, row in enumerate(scores):
        fpr, tpr, thresholds = skm.roc_curve(labels, row, drop_intermediate=False)
        mask = roc.is_distinct[k]
        np.testing.assert_allclose(roc.fpr[k][mask].numpy(), fpr, rtol=0, atol=1e-15)
        np.testing.assert_allclose(roc.tpr[k][mask].numpy(), tpr, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(roc.thresholds[k][mask].numpy(), thresholds)
        # Padding columns repeat real points, so the full rows are still monotone curves.
        assert (roc.fpr[k].diff() >= 0).all() and (roc.tpr[k].diff() >= 0).all()
        distinct_points = set(zip(fpr.tolist(), tpr.tolist()))
        assert set(zip(roc.fpr[k].tolist(), roc.tpr[k].tolist())) == distinct_points


def test_one_dimensional_scores_are_one_head():
    scores, labels = make_heads(2)
    y = torch.from_numpy(labels)
    for function in (metrics.roc_auc, metrics.average_precision):
        assert function(torch.from_numpy(scores[1]), y).shape == (1,)
        assert function(torch.from_numpy(scores[1]), y)[0] == function(torch.from_numpy(scores), y)[1]
    assert metrics.evaluate(torch.from_numpy(scores[1]), y) == [metrics.evaluate(torch.from_numpy(scores), y)[1]]


@pytest.mark.parametrize("seed", range(3))
def test_threshold_metrics_match_sklearn_per_head_threshold(seed):
    scores, labels = make_heads(seed)
    per_head = torch.tensor([0.5, 0.37, 0.625, 0.0, 0.9, 0.5])  # 0.625, 0.5: rows with scores exactly there
    results = {
        "float": (0.5, metrics.threshold_metrics(torch.from_numpy(scores), torch.from_numpy(labels), 0.5)),
        "tensor": (per_head, metrics.threshold_metrics(torch.from_numpy(scores), torch.from_numpy(labels), per_head)),
    }
    for threshold, result in results.values():
        for k, row in enumerate(scores):
            t = float(threshold if isinstance(threshold, float) else threshold[k])
            expected = sklearn_headline(row, labels, t)
            expected["accuracy"] = expected["acc"]
            for key, value in result.items():
                assert value.shape == (len(scores),)
                assert value[k].item() == pytest.approx(expected[key], abs=1e-12), (key, k)


def test_threshold_uses_greater_or_equal_in_scores_precision():
    scores = torch.tensor([[0.7, 0.69, 0.71]], dtype=torch.float32)  # float32(0.7) < float64 0.7
    result = metrics.threshold_metrics(scores, torch.tensor([1, 0, 1]), 0.7)
    assert result["recall_fake"].item() == 1.0 and result["accuracy"].item() == 1.0


def test_single_class_per_sklearn_zero_division():
    scores, _ = make_heads(3)
    for only in (0, 1):
        labels = np.full(scores.shape[1], only)
        result = metrics.threshold_metrics(torch.from_numpy(scores), torch.from_numpy(labels), 0.5)
        for k, row in enumerate(scores):
            predicted = (row >= 0.5).astype(np.int64)
            assert result["balanced_acc"][k].item() == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
            f1 = skm.f1_score(labels, predicted, labels=[0, 1], average="macro", zero_division=0)
            assert result["f1_macro"][k].item() == pytest.approx(f1)


def test_degenerate_rows():
    labels = torch.tensor([0, 0, 1, 1, 1])
    constant = torch.full((5,), 0.3)
    separated = torch.tensor([0.1, 0.2, 0.6, 0.7, 0.6])
    reversed_ = 1 - separated
    scores = torch.stack([constant, separated, reversed_])
    np.testing.assert_allclose(metrics.roc_auc(scores, labels).numpy(), [0.5, 1.0, 0.0])
    eer_value, eer_threshold = metrics.eer(scores, labels)
    # Constant: origin (FPR 0, FNR 1) and (1, 0) tie on |FNR-FPR|; the first, the origin, wins.
    assert eer_value.tolist() == [0.5, 0.0, 1.0] and eer_threshold[0] == math.inf and eer_threshold[1].item() == pytest.approx(0.6)
    assert metrics.tpr_at_fpr(scores, labels, 0.0).tolist() == [0.0, 1.0, 0.0]
    assert metrics.average_precision(scores, labels)[1] == 1.0
    report = metrics.evaluate(scores, labels)
    assert report[0]["eer_threshold"] is None and report[0]["acc@eer"] == pytest.approx(0.4)  # predicts all real
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("only", [0, 1])
def test_one_class_gives_none_not_crash(only):
    scores, _ = make_heads(4, n=50)
    labels = np.full(50, only)
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    assert torch.isnan(metrics.roc_auc(s, y)).all() and torch.isnan(metrics.eer(s, y)[0]).all()
    assert torch.isnan(metrics.tpr_at_fpr(s, y, 0.05)).all()
    reports = metrics.evaluate(s, y, sources=["a"] * 50, groups=[str(i // 5) for i in range(50)])
    json.dumps(reports, allow_nan=False)
    for k, report in enumerate(reports):
        assert_report_equal({k2: v for k2, v in report.items() if k2 not in ("per_source", "video")}, sklearn_headline(scores[k], labels, 0.5))
        for key in ("auc", "eer", "eer_threshold", "acc@eer", "tpr@fpr=0.01", "tpr@fpr=0.05"):
            assert report[key] is None and report["video"][key] is None
        assert (report["ap"] is None) == (only == 0)
        assert report["per_source"]["a"]["auc"] is None
        assert report["per_source"]["a"]["acc"] == pytest.approx(np.mean((scores[k] >= 0.5) == labels))


def test_evaluate_matches_sklearn_with_threshold_tensor():
    scores, labels = make_heads(5)
    threshold = torch.tensor([0.5, 0.45, 0.3, 0.625, 0.5, 0.5])
    reports = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), threshold=threshold)
    json.dumps(reports, allow_nan=False)
    assert len(reports) == len(scores)
    for k, report in enumerate(reports):
        assert_report_equal(report, sklearn_headline(scores[k], labels, float(threshold[k])))


def test_per_source_auc_against_all_reals():
    scores, labels = make_heads(6)
    rng = np.random.default_rng(0)
    real_sources, fake_sources = np.array(["ffhq", "celeba"]), np.array(["sd", "gan", "diffae"])
    sources = np.where(labels == 1, fake_sources[rng.integers(0, 3, len(labels))], real_sources[rng.integers(0, 2, len(labels))])
    sources[:4] = "mixed"  # a source holding both classes: its fakes vs all reals
    reports = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), sources=sources.tolist())
    json.dumps(reports, allow_nan=False)
    reals = labels == 0
    for k, report in enumerate(reports):
        assert set(report["per_source"]) == set(sources.tolist())
        for source, entry in report["per_source"].items():
            rows = sources == source
            assert entry["n"] == rows.sum()
            assert entry["acc"] == pytest.approx(skm.accuracy_score(labels[rows], scores[k, rows] >= 0.5), abs=1e-12)
            subset = (rows & (labels == 1)) | reals
            if (rows & (labels == 1)).any():
                assert entry["auc"] == pytest.approx(skm.roc_auc_score(labels[subset], scores[k, subset]), abs=1e-12)
            else:
                assert entry["auc"] is None
    assert reports[0]["per_source"]["ffhq"]["auc"] is None and reports[0]["per_source"]["sd"]["auc"] is not None
    # per-source accuracy is at the report's own threshold (one per head), so it adds up to acc
    threshold = torch.linspace(0.3, 0.7, len(scores))
    reports = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), sources=sources.tolist(),
                               threshold=threshold)
    for k, report in enumerate(reports):
        predicted = scores[k] >= np.float32(threshold[k])
        for source, entry in report["per_source"].items():
            rows = sources == source
            assert entry["acc"] == pytest.approx(skm.accuracy_score(labels[rows], predicted[rows]), abs=1e-12)
        correct = sum(e["acc"] * e["n"] for e in report["per_source"].values())
        assert correct / len(labels) == pytest.approx(report["acc"], abs=1e-9)


def test_video_level_matches_polars_groupby():
    rng = np.random.default_rng(8)
    n_videos = 60
    video_labels = (rng.random(n_videos) < 0.5).astype(np.int64)
    video_of_row = rng.integers(0, n_videos, 700)
    labels = video_labels[video_of_row]
    labels[np.flatnonzero(video_of_row == video_of_row[0])[0]] = 1 - labels[0]  # one mixed-label video
    # Dyadic scores keep per-group sums exact, so ties among video means match the oracle's exactly.
    scores = np.stack([rng.integers(0, 9, len(labels)) / 8 for _ in range(3)]) * 0.5 + 0.5 * labels
    groups = [f"vid{v}" for v in video_of_row]
    groups[5], groups[6], groups[7] = "", None, ""  # rows without a video id are left out
    threshold = torch.tensor([0.5, 0.6, 0.4])
    reports = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), groups=groups, threshold=threshold)
    json.dumps(reports, allow_nan=False)

    frame = pl.DataFrame({"group": groups, "label": labels} | {f"s{k}": scores[k] for k in range(3)})
    video = (
        frame.filter(pl.col("group").is_not_null() & (pl.col("group") != ""))
        .group_by("group")
        .agg(pl.col("label").max(), *[pl.col(f"s{k}").mean() for k in range(3)])
    )
    assert video["label"].sum() >= video_labels[np.unique(video_of_row)].sum()  # the mixed video counts as fake
    for k, report in enumerate(reports):
        expected = sklearn_headline(video[f"s{k}"].to_numpy(), video["label"].to_numpy(), float(threshold[k]))
        assert_report_equal(report["video"], expected | {"pool": "mean", "temperature": None})
        assert report["video"]["n"] == len(video) < report["n"]
        frame_only = {key: v for key, v in report.items() if key != "video"}
        assert_report_equal(frame_only, sklearn_headline(scores[k], labels, float(threshold[k])))


def test_user_errors():
    scores, labels = torch.rand(2, 10), torch.randint(0, 2, (10,))
    with pytest.raises(UserError, match="unknown"):
        metrics.roc_auc(scores, torch.full((10,), -1))
    with pytest.raises(UserError, match="labels must be"):
        metrics.roc_auc(scores, labels[:9])
    with pytest.raises(UserError, match="threshold"):
        metrics.threshold_metrics(scores, labels, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(UserError, match="sources"):
        metrics.evaluate(scores, labels, sources=["a"] * 9)
    with pytest.raises(UserError, match="NaN"):
        metrics.roc_auc(torch.full((2, 10), float("nan")), labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 2, 5000)
    scores = rng.integers(0, 9, (4, 5000)) / 8  # dyadic: GPU atomic group sums stay exact
    groups, sources = [str(i // 7) for i in range(5000)], ["x", "y"] * 2500
    cpu = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels), groups=groups, sources=sources)
    gpu = metrics.evaluate(torch.from_numpy(scores).cuda(), torch.from_numpy(labels).cuda(), groups=groups, sources=sources)
    for gpu_report, cpu_report in zip(gpu, cpu):
        for part in ("video", None):
            gpu_part = gpu_report[part] if part else {k: v for k, v in gpu_report.items() if k not in ("video", "per_source")}
            assert_report_equal(gpu_part, cpu_report[part] if part else {k: v for k, v in cpu_report.items() if k in gpu_part})
        assert gpu_report["per_source"] == pytest.approx(cpu_report["per_source"])
