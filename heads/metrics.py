"""Evaluation metrics in torch, batched over K heads scored on the same evaluation set.

Every function takes `scores` [K, N] (or [N], treated as K=1): the probability that each row is
fake, one row of scores per head, and `labels` [N] with 1 = fake, 0 = real. Work happens on the
scores' device; each head's row is sorted once and everything rank-based is read off cumulative
counts. Counts are int64 and rates float64, so results match scikit-learn to rounding even at
millions of rows.

Tensor functions return NaN where a metric is undefined (e.g. AUC without reals);
`evaluate` turns those into None for its JSON-ready report.
"""

import math
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor

from dfclip.errors import UserError
from dfclip.heads.config import CHOICES, FIELDS, parse_threshold

TPR_AT_FPR_TARGETS = (0.01, 0.05)


def _prepare(scores: Tensor, labels) -> tuple[Tensor, Tensor]:
    """Check shapes/values; return scores as [K, N] floats and labels as int64 [N] on their device."""
    scores = torch.as_tensor(scores)
    if scores.ndim == 1:
        scores = scores.unsqueeze(0)
    if scores.ndim != 2:
        raise UserError(f"scores must be [N] or [K, N], got shape {tuple(scores.shape)}; pass one row of scores per head")
    if not scores.is_floating_point():
        scores = scores.float()
    labels = torch.as_tensor(labels, device=scores.device)
    if ((labels != 0) & (labels != 1)).any():
        raise UserError("labels must be 0 (real) or 1 (fake); drop unknown (-1) rows before evaluating")
    labels = labels.long()
    if labels.ndim != 1 or labels.shape[0] != scores.shape[1]:
        raise UserError(f"labels must be [N] with N = {scores.shape[1]} (scores' last dim), got shape {tuple(labels.shape)}")
    if scores.shape[1] == 0:
        raise UserError("no rows to evaluate; check that the evaluation split has labelled rows")
    if torch.isnan(scores).any():
        raise UserError("scores contain NaN; check the head's outputs (diverged training?)")
    return scores, labels


class RocPoints(NamedTuple):
    """Batched ROC curve, padded to [K, N+1] so all heads share one shape.

    Column 0 is the origin (threshold +inf: nothing predicted fake); column j >= 1 is the
    threshold at the j-th highest score of that row. Within a run of tied scores every column
    carries the values of the run's last column (the one real ROC point for that threshold), so
    the rows are valid, monotone curves with repeated points and can be reduced directly;
    `is_distinct` marks one column per distinct threshold (exactly sklearn's
    `roc_curve(..., drop_intermediate=False)` points, in the same order).
    """

    fpr: Tensor  # [K, N+1] float64; NaN when there are no reals
    tpr: Tensor  # [K, N+1] float64; NaN when there are no fakes
    thresholds: Tensor  # [K, N+1] scores' dtype; predict fake when score >= threshold
    is_distinct: Tensor  # [K, N+1] bool


class _RocCounts(NamedTuple):
    """Cumulative counts behind `RocPoints` ([K, N+1], int64) and the class sizes (0-dim int64)."""

    fps: Tensor
    tps: Tensor
    thresholds: Tensor
    is_distinct: Tensor
    n_fake: Tensor
    n_real: Tensor


def _roc_counts(scores: Tensor, labels: Tensor) -> _RocCounts:
    """Sort each head's scores once and count false/true positives at every threshold (checked inputs)."""
    k, n = scores.shape
    sorted_scores, order = torch.sort(scores, dim=1, descending=True)
    tps = labels[order].cumsum(dim=1)  # fakes among the top j+1 rows
    # A position ends a run of ties when the next score differs (or it is the last row).
    run_end = torch.ones_like(order, dtype=torch.bool)
    run_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    # Index of the end of each position's tie run: a reverse running minimum of end positions.
    positions = torch.arange(n, device=scores.device).expand(k, n)
    end_positions = torch.where(run_end, positions, n)
    run_end_index = end_positions.flip(1).cummin(dim=1).values.flip(1)
    tps = tps.gather(1, run_end_index)
    fps = (run_end_index + 1) - tps

    zeros = torch.zeros(k, 1, dtype=torch.long, device=scores.device)
    infs = torch.full((k, 1), float("inf"), dtype=scores.dtype, device=scores.device)
    origin_is_point = torch.ones(k, 1, dtype=torch.bool, device=scores.device)
    n_fake = labels.sum()
    return _RocCounts(
        fps=torch.cat([zeros, fps], dim=1),
        tps=torch.cat([zeros, tps], dim=1),
        thresholds=torch.cat([infs, sorted_scores], dim=1),
        is_distinct=torch.cat([origin_is_point, run_end], dim=1),
        n_fake=n_fake,
        n_real=n - n_fake,
    )


def roc_points(scores: Tensor, labels: Tensor) -> RocPoints:
    """Batched, tie-aware ROC curve of each head; see `RocPoints` for the layout."""
    c = _roc_counts(*_prepare(scores, labels))
    return RocPoints(c.fps.double() / c.n_real.double(), c.tps.double() / c.n_fake.double(), c.thresholds, c.is_distinct)


def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC per head [K] (trapezoid over distinct thresholds, i.e. ties count 1/2); NaN without both classes.

    Equal to sklearn.metrics.roc_auc_score.
    """
    return _roc_auc(_roc_counts(*_prepare(scores, labels)))


def _roc_auc(c: _RocCounts) -> Tensor:
    # Twice the area in count units, exact in int64; repeated points within tie runs add zero.
    twice_area = ((c.fps[:, 1:] - c.fps[:, :-1]) * (c.tps[:, 1:] + c.tps[:, :-1])).sum(dim=1)
    return twice_area.double() / (2.0 * c.n_fake.double() * c.n_real.double())


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision per head [K]: sum over distinct thresholds of (recall step) x precision.

    Equal to sklearn.metrics.average_precision_score (a step sum, not an interpolated area).
    NaN when there are no fakes; 1.0 when there are no reals.
    """
    return _average_precision(_roc_counts(*_prepare(scores, labels)))


def _average_precision(c: _RocCounts) -> Tensor:
    # Columns >= 1 hold at least one predicted-fake row, so precision is always defined there.
    precision = c.tps[:, 1:].double() / (c.tps[:, 1:] + c.fps[:, 1:]).double()
    recall_step = (c.tps[:, 1:] - c.tps[:, :-1]).double()  # zero on repeated tie-run points
    return (recall_step * precision).sum(dim=1) / c.n_fake.double()


def auc_and_eer(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(roc_auc [K], eer [K]) from one sort of the scores: the per-epoch validation numbers."""
    c = _roc_counts(*_prepare(scores, labels))
    return _roc_auc(c), _eer(c)[0]


def eer(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Equal error rate per head: (eer [K] float64, threshold [K] scores' dtype).

    Definition: among the ROC points (distinct thresholds, plus the origin at threshold +inf),
    take the first one, in order of decreasing threshold, that minimises |FNR - FPR|, where
    FNR = 1 - TPR. The EER is (FPR + FNR) / 2 at that point and the threshold is that point's
    score (predict fake when score >= threshold; +inf means predict nothing fake).
    The comparison is exact (integer cross-multiplication), so float rounding cannot pick the
    point. NaN EER and threshold when a class is absent.
    """
    return _eer(_roc_counts(*_prepare(scores, labels)))


def _eer(c: _RocCounts) -> tuple[Tensor, Tensor]:
    fns = c.n_fake - c.tps
    # |FN/P - FP/R| compared as |FN*R - FP*P|: same order, no rounding. argmin returns the first
    # minimum, and repeated tie-run points equal their run's real point, so the rule holds.
    best = (fns * c.n_real - c.fps * c.n_fake).abs().argmin(dim=1, keepdim=True)
    fpr = c.fps.gather(1, best).squeeze(1).double() / c.n_real.double()
    fnr = fns.gather(1, best).squeeze(1).double() / c.n_fake.double()
    threshold = c.thresholds.gather(1, best).squeeze(1)
    both_classes = (c.n_fake > 0) & (c.n_real > 0)
    return (fpr + fnr) / 2, torch.where(both_classes, threshold, float("nan"))


def tpr_at_fpr(scores: Tensor, labels: Tensor, target_fpr: float) -> Tensor:
    """TPR per head [K] at a false-positive budget: the highest TPR among ROC points with FPR <= target_fpr.

    The origin (threshold +inf) is always such a point, so the result is >= 0; NaN without both classes.
    """
    return _tpr_at_fpr(_roc_counts(*_prepare(scores, labels)), target_fpr)


def _tpr_at_fpr(c: _RocCounts, target_fpr: float) -> Tensor:
    within_budget = c.fps.double() / c.n_real.double() <= target_fpr
    best_tps = torch.where(within_budget, c.tps, 0).amax(dim=1)
    tpr = best_tps.double() / c.n_fake.double()
    return torch.where(c.n_real > 0, tpr, float("nan"))


def _per_head_threshold(threshold: float | Tensor, k: int, scores: Tensor) -> Tensor:
    """Threshold as a [K, 1] column in the scores' dtype and device, from a float or a [K] (or scalar) tensor."""
    # Compared in the scores' own precision (as torch and numpy do with a python float), so a
    # float32 score of 0.7 counts as >= a 0.7 threshold.
    threshold = torch.as_tensor(threshold, device=scores.device).to(scores.dtype)
    if threshold.ndim == 0:
        threshold = threshold.expand(k)
    if threshold.shape != (k,):
        raise UserError(f"threshold must be a float or a [K] tensor with K = {k} heads, got shape {tuple(threshold.shape)}")
    return threshold.unsqueeze(1)


def pick_threshold(spec: str, scores: Tensor, labels: Tensor) -> Tensor:
    """Per-model decision thresholds [K] from validation scores [K, N] (predict fake when score >= t).

    spec is RunConfig.threshold: "eer", a fixed probability, or "fpr@V" (see config.parse_threshold).
    """
    kind, value = parse_threshold(spec)
    k = scores.shape[0]
    if kind == "fixed":
        return torch.full((k,), value, dtype=torch.float64, device=scores.device)
    if kind == "eer":
        return eer(scores, labels)[1].double().nan_to_num(0.5)
    # fpr@v: the lowest threshold whose false-positive rate on val reals is <= v.
    reals = scores[:, labels == 0].sort(dim=1, descending=True).values
    allowed = math.floor(value * reals.shape[1])
    if allowed >= reals.shape[1]:
        return reals[:, -1].double()
    # Step to the next score above the first real that must stay below, in the scores' own dtype:
    # metrics and predict compare in that dtype, where a float64 step would round back onto it.
    above = torch.nextafter(reals[:, allowed], torch.tensor(math.inf, dtype=reals.dtype, device=scores.device))
    return above.double()


def threshold_metrics(scores: Tensor, labels: Tensor, threshold: float | Tensor) -> dict[str, Tensor]:
    """Confusion-matrix metrics per head [K], predicting fake when score >= threshold (a float or one per head).

    The threshold is cast to the scores' dtype before comparing.
    Keys: accuracy, balanced_acc, precision_/recall_/f1_ + fake, real, macro (macro = the
    unweighted mean over both classes). Equal to scikit-learn with zero_division=0: a ratio with a
    zero denominator is 0, macro averages always cover both classes (labels=[0, 1]), and
    balanced accuracy averages recall over the classes present in `labels` (as
    balanced_accuracy_score does).
    """
    scores, labels = _prepare(scores, labels)
    predicted_fake = scores >= _per_head_threshold(threshold, scores.shape[0], scores)
    is_fake = labels.bool()
    tp = (predicted_fake & is_fake).sum(dim=1).double()
    fp = (predicted_fake & ~is_fake).sum(dim=1).double()
    fn = (~predicted_fake & is_fake).sum(dim=1).double()
    tn = (~predicted_fake & ~is_fake).sum(dim=1).double()

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), 0.0)

    out = {"accuracy": (tp + tn) / (tp + fp + fn + tn)}
    # The real class is the positive one when the roles of (tp, tn) and (fp, fn) swap.
    for name, (t_pos, f_pos, f_neg) in {"fake": (tp, fp, fn), "real": (tn, fn, fp)}.items():
        out[f"precision_{name}"] = ratio(t_pos, t_pos + f_pos)
        out[f"recall_{name}"] = ratio(t_pos, t_pos + f_neg)
        out[f"f1_{name}"] = ratio(2 * t_pos, 2 * t_pos + f_pos + f_neg)
    for metric in ("precision", "recall", "f1"):
        out[f"{metric}_macro"] = (out[f"{metric}_fake"] + out[f"{metric}_real"]) / 2
    has_fake, has_real = (tp + fn) > 0, (tn + fp) > 0
    both = (out["recall_fake"] + out["recall_real"]) / 2
    out["balanced_acc"] = torch.where(has_fake & has_real, both, torch.where(has_fake, out["recall_fake"], out["recall_real"]))
    return out


def _py(value: float) -> float | None:
    """A python float for JSON, or None for NaN/inf (undefined metric, or the 'predict nothing' threshold)."""
    return value if np.isfinite(value) else None


def _headline(scores: Tensor, labels: Tensor, threshold: float | Tensor) -> list[dict]:
    """The headline metrics (no per_source/video) as one JSON-ready dict per head."""
    n_fake = int(labels.sum())
    n_real = labels.shape[0] - n_fake
    both_classes = n_fake > 0 and n_real > 0
    at_threshold = threshold_metrics(scores, labels, threshold)  # also checks the threshold's shape
    counts = _roc_counts(scores, labels)  # one sort per head for all rank metrics
    eer_value, eer_threshold = _eer(counts)
    columns = {
        "auc": _roc_auc(counts),
        "ap": _average_precision(counts),
        "eer": eer_value,
        "eer_threshold": eer_threshold.double(),
        "acc@0.5": threshold_metrics(scores, labels, 0.5)["accuracy"],
        "acc@eer": threshold_metrics(scores, labels, eer_threshold)["accuracy"],
        "threshold": torch.as_tensor(threshold, dtype=torch.float64, device=scores.device).expand(scores.shape[0]),
    }
    columns["acc"] = at_threshold.pop("accuracy")
    columns.update(at_threshold)
    for target in TPR_AT_FPR_TARGETS:
        columns[f"tpr@fpr={target}"] = _tpr_at_fpr(counts, target)
    if not both_classes:  # acc@eer means nothing when there is no EER threshold
        columns["acc@eer"] = torch.full_like(columns["acc@eer"], float("nan"))
        _undefined_for_absent_class(columns, fake_present=n_fake > 0)
    as_lists = {key: value.double().cpu().tolist() for key, value in columns.items()}  # one transfer per metric
    return [
        {"n": labels.shape[0], "n_fake": n_fake, "n_real": n_real} | {key: _py(values[k]) for key, values in as_lists.items()}
        for k in range(scores.shape[0])
    ]


def _undefined_for_absent_class(columns: dict[str, Tensor], fake_present: bool) -> None:
    """NaN (None in reports) for the thresholded metrics a one-class set cannot define, in place.

    The absent class has no recall, hence no F1, and a precision only when something was called
    that class (then 0: every such call is wrong; nothing was called it when acc is 1). The macro
    averages need both classes. scikit-learn's zero_division=0 would report 0 for all of these,
    which reads as a detector that misses every fake.
    """
    absent = "real" if fake_present else "fake"
    nan = torch.full_like(columns["acc"], float("nan"))
    columns[f"recall_{absent}"] = columns[f"f1_{absent}"] = nan
    columns[f"precision_{absent}"] = torch.where(columns["acc"] < 1, columns[f"precision_{absent}"], nan)
    for metric in ("precision", "recall", "f1"):
        columns[f"{metric}_macro"] = nan


def _group_codes(names: pl.Series, device: torch.device) -> tuple[list[str], Tensor]:
    """Sorted distinct names and each entry's index into them, as an int64 tensor on `device`."""
    codes = names.rank("dense").cast(pl.Int64).to_numpy() - 1  # dense rank = position in sorted names
    return names.unique().sort().to_list(), torch.from_numpy(codes).to(device)


def _per_source(scores: Tensor, labels: Tensor, sources: list[str], threshold: float | Tensor = 0.5) -> list[dict]:
    """{source: {n, auc, acc}} per head; auc = that source's fakes against all reals of the set,
    acc = accuracy at `threshold` (the report's own, so the sources' correct rows add up to its acc)."""
    k, n = scores.shape
    names, codes = _group_codes(pl.Series(sources, dtype=pl.String).fill_null(""), scores.device)
    sorted_reals = scores[:, labels == 0].sort(dim=1).values.contiguous()
    # Per row, twice its AUC "wins" against all reals: reals strictly below count 2, tied reals 1
    # (searchsorted left = strictly below, right = at or below). AUC of a source's fakes vs all
    # reals is then the sum over its fakes / (2 * n_fakes * n_reals), for every source at once.
    twice_wins = torch.searchsorted(sorted_reals, scores.contiguous(), side="left")
    twice_wins += torch.searchsorted(sorted_reals, scores.contiguous(), side="right")
    is_fake = labels == 1
    zeros = torch.zeros(k, len(names), dtype=torch.float64, device=scores.device)
    fake_wins = zeros.index_add(1, codes[is_fake], twice_wins[:, is_fake].double())
    predicted_fake = scores >= _per_head_threshold(threshold, k, scores)
    correct = zeros.index_add(1, codes, (predicted_fake == is_fake).double())
    rows = torch.bincount(codes, minlength=len(names))
    fakes = torch.bincount(codes[is_fake], minlength=len(names))
    n_real = n - int(is_fake.sum())
    auc = (fake_wins / (2.0 * fakes * n_real)).cpu().tolist()  # 0/0 = NaN -> None below
    acc = (correct / rows).cpu().tolist()
    rows = rows.tolist()
    return [
        {name: {"n": rows[j], "auc": _py(auc[h][j]), "acc": acc[h][j]} for j, name in enumerate(names)}
        for h in range(k)
    ]


# Video verdicts pool the frame PROBABILITIES of a video, with every pooling alike:
# - mean of frame probabilities is the usual video-level score of face-forgery benchmarks and what
#   dfclip reported before pooling was a choice, so default numbers do not move;
# - a pooled probability stays within its frames' range, so the run's threshold (picked on frame
#   probabilities) still means something for the pooled score;
# - max is the same on either scale (the sigmoid is monotone), and lse over probabilities runs
#   from the mean (T -> inf) to the max (T -> 0) of the same numbers, so the three are one family;
# - metrics receive probabilities: a float32 sigmoid is exactly 1 past logit ~17, so logits could
#   not be recovered from them anyway.
VIDEO_POOLS = CHOICES["video_pool"]  # RunConfig's --video-pool
# In probability units; the default 0.1: a frame 0.1 more likely fake weighs e times more.
DEFAULT_POOL_TEMPERATURE = FIELDS["pool_temperature"].default


def check_pool(pool: str, temperature: float, *, options: tuple[str, str] = ("--pool", "--temperature")) -> None:
    """UserError naming the option (`options`: the pool's and the temperature's) for an unknown pooling or a
    temperature that is not a finite number > 0."""
    if pool not in VIDEO_POOLS:
        raise UserError(f"{options[0]} must be one of {', '.join(VIDEO_POOLS)}, got {pool!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise UserError(f"{options[1]} must be a number > 0 (the lse pooling's temperature, in probability units), "
                        f"got {temperature!r}")


def pool_groups(scores: Tensor, codes: Tensor, n_groups: int, pool: str = "mean",
                temperature: float = DEFAULT_POOL_TEMPERATURE) -> Tensor:
    """Pooled score per group [K, G] (float64) of frame probabilities `scores` [K, M], batched over the K heads.

    codes [M]: each row's group, 0..n_groups-1 (every group has a row). Pools (see VIDEO_POOLS):
    - mean: the mean frame probability;
    - max: the highest frame probability (one fake frame condemns the video);
    - lse: T * log(mean(exp(p / T))) over the frame probabilities p: a smooth maximum that lies
      between the mean (T -> inf) and the max (T -> 0); computed as max + T * log(mean(exp((p - max) / T)))
      so exp never overflows, whatever T.
    Probabilities, not logits, for all three: see the note above VIDEO_POOLS.
    """
    check_pool(pool, temperature, options=("pool", "temperature"))
    k = scores.shape[0]
    frames = scores.double()
    zeros = torch.zeros(k, n_groups, dtype=torch.float64, device=scores.device)
    counts = torch.bincount(codes, minlength=n_groups)
    if pool == "mean":
        return zeros.index_add(1, codes, frames) / counts
    top = torch.full_like(zeros, -math.inf).scatter_reduce(1, codes.unsqueeze(0).expand(k, -1), frames, reduce="amax")
    if pool == "max":
        return top
    spread = torch.exp((frames - top[:, codes]) / temperature)  # in (0, 1]; 1 at each group's max
    return top + temperature * torch.log(zeros.index_add(1, codes, spread) / counts)


class VideoIndex(NamedTuple):
    """Which video each scored row belongs to, built once per evaluation set (per-epoch video AUC reuses it)."""

    keep: Tensor  # [N] bool: rows with a video id (an empty or None group is no video)
    codes: Tensor  # [M] int64: the video of each kept row, an index into names
    names: list[str]  # G sorted video ids
    labels: Tensor  # [G] int64: 1 when any of the video's frames is fake


def video_index(groups: list, labels: Tensor) -> VideoIndex | None:
    """The VideoIndex of rows with video ids `groups` [N] and labels [N] (on the device of labels); None
    when no row has an id. A video with any fake frame is fake (a partly manipulated video is still fake)."""
    group_series = pl.Series("group", groups, dtype=pl.String)
    keep = (group_series.is_not_null() & (group_series != "")).to_numpy()
    if not keep.any():
        return None
    names, codes = _group_codes(group_series.filter(pl.Series(keep)), labels.device)
    keep = torch.from_numpy(keep).to(labels.device)
    group_labels = torch.zeros(len(names), dtype=torch.long, device=labels.device)
    group_labels = group_labels.scatter_reduce(0, codes, labels[keep].long(), reduce="amax")
    return VideoIndex(keep, codes, names, group_labels)


def video_scores(scores: Tensor, index: VideoIndex, pool: str = "mean",
                 temperature: float = DEFAULT_POOL_TEMPERATURE) -> Tensor:
    """Pooled video scores [K, G] of frame probabilities [K, N] (see pool_groups)."""
    return pool_groups(scores[:, index.keep], index.codes, len(index.names), pool, temperature)


def _video_level(scores: Tensor, labels: Tensor, groups: list, pool: str = "mean",
                 temperature: float = DEFAULT_POOL_TEMPERATURE) -> tuple[Tensor, Tensor] | None:
    """Pooled frame scores per group [K, G] and group labels [G]; rows with an empty/None group are ignored."""
    index = video_index(groups, labels)
    if index is None:
        return None
    return video_scores(scores, index, pool, temperature), index.labels


def pool_table(frame_scores: pl.DataFrame, pool: str = "mean", temperature: float = DEFAULT_POOL_TEMPERATURE,
               threshold: float = 0.5) -> pl.DataFrame:
    """One verdict per video, and per still image, from a table of scored rows: what `dfhead predict` writes.

    frame_scores: one row per scored crop, with columns path, video (the video file a frame row
    comes from), frame (the frame index, -1 for a still image), score (probability of fake) and
    label (1 fake, 0 real, -1 unknown). Rows with frame >= 0 are pooled per video with
    pool_groups (the same maths as the video-level metrics); every other row (a still image, or
    one face of it) stays a row of its own, as does a frame row without a video.
    Returns path (the video, or the image), n_frames (distinct frames scored; 1 for an image),
    n_faces (rows scored: several faces of one frame are several rows), score (pooled, in the input
    scores' dtype), pred (1 when score >= threshold, compared in that dtype as predict does for
    frames) and label (a video with any fake frame is fake; -1 only when no frame is labelled),
    sorted by path.
    """
    check_pool(pool, temperature)
    in_video = (pl.col("frame") >= 0) & pl.col("video").is_not_null() & (pl.col("video") != "")
    rows = frame_scores.with_columns(pl.when(in_video).then(pl.col("video")).otherwise(pl.col("path")).alias("_key"))
    names, codes = _group_codes(rows["_key"], torch.device("cpu"))
    dtype = rows["score"].to_numpy().dtype
    frames = torch.from_numpy(rows["score"].to_numpy().astype(np.float64)).unsqueeze(0)
    pooled = pool_groups(frames, codes, len(names), pool, temperature)[0].numpy().astype(dtype)
    per_key = (rows.group_by("_key")
               .agg(pl.col("frame").n_unique().cast(pl.Int64).alias("n_frames"),
                    pl.len().cast(pl.Int64).alias("n_faces"), pl.col("label").max().cast(pl.Int8)))
    verdicts = pl.DataFrame({"_key": names, "score": pooled}).join(per_key, on="_key")
    return (verdicts.rename({"_key": "path"})
            .with_columns((pl.col("score") >= np.asarray(threshold, dtype=dtype).item()).cast(pl.Int8).alias("pred"))
            .select("path", "n_frames", "n_faces", "score", "pred", "label").sort("path"))


def evaluate(
    scores: Tensor,
    labels: Tensor,
    *,
    sources: list[str] | None = None,
    groups: list[str] | None = None,
    threshold: float | Tensor = 0.5,
    pool: str = "mean",
    temperature: float = DEFAULT_POOL_TEMPERATURE,
) -> list[dict]:
    """Full report per head: a list of K JSON-serialisable dicts of python floats/ints/None.

    Keys: n, n_fake, n_real, auc, ap, eer, eer_threshold, acc@0.5, acc@eer, tpr@fpr=0.01,
    tpr@fpr=0.05, and at `threshold` (float or one per head; predict fake when score >= it):
    threshold, acc, balanced_acc, precision_/recall_/f1_ + fake/real/macro (see
    `threshold_metrics`; zero_division=0 conventions).
    Rank metrics (auc, eer, eer_threshold, acc@eer, tpr@fpr) are None when a class is absent,
    ap is None without fakes; eer_threshold is None when the EER point is 'predict nothing fake'.
    When a class is absent, so are its recall and F1, its precision unless something was called it,
    and the macro averages (None; `_undefined_for_absent_class`).
    - sources ([N] names): adds per_source = {source: {n, auc, acc}} where auc compares the
      source's fake rows with ALL real rows of the set (None for a source without fakes, or when
      the set has no reals) and acc is accuracy at `threshold` over the source's rows.
    - groups ([N] ids, e.g. video ids): adds video = the same headline metrics on each group's
      frame scores pooled by `pool` (mean, max or lse with `temperature`; see pool_groups), plus
      "pool" and "temperature" (None unless lse) naming the pooling; rows with an empty or None id
      are left out; a group is fake if ANY of its frames is fake (max label), so mixed groups count
      as fake. None if no row has a group.
    """
    scores, labels = _prepare(scores, labels)
    n = labels.shape[0]
    for name, values in (("sources", sources), ("groups", groups)):
        if values is not None and len(values) != n:
            raise UserError(f"{name} has {len(values)} entries but there are {n} rows; pass one entry per row")
    reports = _headline(scores, labels, threshold)
    if sources is not None:
        for report, per_source in zip(reports, _per_source(scores, labels, sources, threshold)):
            report["per_source"] = per_source
    if groups is not None:
        video = _video_level(scores, labels, groups, pool, temperature)
        video_reports = _headline(*video, threshold) if video is not None else [None] * len(reports)
        pooling = {"pool": pool, "temperature": float(temperature) if pool == "lse" else None}
        video_reports = [r if r is None else r | pooling for r in video_reports]
        for report, video_report in zip(reports, video_reports):
            report["video"] = video_report
    return reports
