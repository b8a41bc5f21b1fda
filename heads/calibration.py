"""Calibrated scores: a monotone map fitted on validation logits, and the numbers that judge it.

A head trained with CVaR, a pairwise AUC term and SAM ranks well but its sigmoid is rarely a
probability: the AUC term only cares about order, and CVaR weights the worst rows. After
training, `fit_calibration` fits on the validation logits z, by minimising the NLL:

- temperature: P(fake) = sigmoid(z / T), one parameter; T > 1 softens an over-confident head;
- platt: P(fake) = sigmoid(a * z + b), which also moves the 0.5 point (class imbalance, bias).

Both are logistic regressions on the single input z (without or with an intercept), so the NLL
is convex; a damped Newton iteration in float64 reaches its minimum to machine precision in a
few steps, deterministically (an LBFGS in float32 would stop at its tolerance and depend on torch's
settings). a = 1 / T is kept in [A_MIN, A_MAX]: perfectly separated validation rows have no
finite optimum (the NLL keeps falling as T -> 0), and a <= 0 would reverse the ranking.

Both maps are increasing, so they never change which rows score above which. The decision
itself is still taken on the raw probability against the threshold picked at fit time (so
calibration cannot change a predicted label), and `Calibration.threshold` is that threshold in
the calibrated scale: calibrated score >= it exactly when the raw one is >= the raw threshold,
up to ties where two raw scores map to one float64.

The judging numbers, on probabilities p and labels y (1 = fake):
- ECE with ECE_BINS equal-width bins: sum over bins of (n_bin / N) * |mean(y) - mean(p)|, the bins
  closed on the right as scikit-learn's calibration_curve cuts them (p = 1/15 is in the first bin);
- NLL: mean of -[y log p + (1 - y) log(1 - p)], computed from logits where they are known;
- Brier: mean of (p - y)^2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dfclip.errors import UserError

METHODS = ("temperature", "platt", "none")
ECE_BINS = 15
A_MIN, A_MAX = 1e-3, 1e3  # bounds of the logit scale a = 1/T (T from 0.001 to 1000)
B_MAX = 100.0  # bound of Platt's intercept
SCORE_MEANS = ("fake", "real")  # predict --score-means: which class a high score stands for


@dataclass(frozen=True)
class Calibration:
    """P(fake) = sigmoid(a * z + b) of a head's logit z; method "none" is the identity (a = 1, b = 0).

    threshold: the run's decision threshold in the calibrated scale (None when none was given).
    """

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    threshold: float | None = None

    @property
    def temperature(self) -> float:
        return 1.0 / self.a

    def logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated logits (float64) of raw logits z."""
        return self.a * np.asarray(z, dtype=np.float64) + self.b

    def from_logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated P(fake) (float64) of raw logits z."""
        return sigmoid(self.logits(z))

    def from_probabilities(self, p: np.ndarray) -> np.ndarray:
        """Calibrated P(fake) (float64) of raw probabilities p = sigmoid(z): exact for 0 and 1 (logit +-inf)."""
        if self.method == "none":
            return np.asarray(p, dtype=np.float64)
        return self.from_logits(logit(p))

    def to_dict(self) -> dict:
        return asdict(self) | {"temperature": self.temperature}


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64, never overflowing (exp of -|z| only; 0 and 1 at -inf and inf);
    increasing, so a threshold keeps its rows."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64 (+-inf at 1 and 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def calibration_from_config(config: dict) -> Calibration:
    """A run's calibration (config.json "calibration"); the identity for runs without one. UserError when damaged."""
    c = config.get("calibration")
    if c is None:
        return Calibration(threshold=config.get("threshold"))
    problems = calibration_problems(c)
    if problems:
        raise UserError(f'"calibration": {problems[0]}; re-run `dfhead fit` to fit it again')
    return Calibration(c["method"], float(c["a"]), float(c["b"]), c.get("threshold"))


def calibration_problems(c) -> list[str]:
    """What is wrong with a stored calibration (config.json "calibration"), one line each."""
    if not isinstance(c, dict):
        return [f"must be an object, got {c!r}"]
    if c.get("method") not in METHODS:
        return [f'"method" must be one of {", ".join(METHODS)}, got {c.get("method")!r}']
    problems = []
    for k, lo, hi in (("a", A_MIN, A_MAX), ("b", -B_MAX, B_MAX)):
        v = c.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:  # NaN fails too
            problems.append(f'"{k}" must be a number in [{lo:g}, {hi:g}], got {v!r}')
    t = c.get("threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
        problems.append(f'"threshold" must be a probability in [0, 1], got {t!r}')
    return problems


def _nll_and_derivatives(z: np.ndarray, y: np.ndarray, a: float, b: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean NLL of sigmoid(a z + b), its gradient and Hessian in (a, b)."""
    u = a * z + b
    e = np.exp(-np.abs(u))  # one exp serves both: log(1 + e^u) = max(u, 0) + log1p(e), and sigmoid(u)
    nll = float(np.mean(np.maximum(u, 0.0) + np.log1p(e) - y * u))
    p = np.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    r, w = p - y, p * (1 - p)
    grad = np.array([np.mean(r * z), np.mean(r)])
    hess = np.array([[np.mean(w * z * z), np.mean(w * z)], [np.mean(w * z), np.mean(w)]])
    return nll, grad, hess


def _newton(z: np.ndarray, y: np.ndarray, intercept: bool, steps: int = 100) -> tuple[float, float]:
    """(a, b) minimising the mean NLL, a in [A_MIN, A_MAX] (b = 0 without intercept): Newton steps, halved
    until they stay inside the bounds and do not raise the NLL."""
    a, b = 1.0, 0.0
    free = [0, 1] if intercept else [0]
    nll, grad, hess = _nll_and_derivatives(z, y, a, b)
    for _ in range(steps):
        g, h = grad[free], hess[np.ix_(free, free)] + 1e-12 * np.eye(len(free))
        if np.abs(g).max() < 1e-12:  # at the minimum (a mean gradient is exact to about 1e-16 here)
            break
        step = np.linalg.solve(h, g)
        t = 1.0
        while t > 1e-10:  # halve the step until it stays inside the bounds and the NLL does not rise
            na, nb = np.array([a, b]) - t * np.array([step[0], step[1] if intercept else 0.0])
            if A_MIN <= na <= A_MAX and -B_MAX <= nb <= B_MAX:
                n_nll, n_grad, n_hess = _nll_and_derivatives(z, y, float(na), float(nb))
                if n_nll <= nll:
                    break
            t /= 2
        else:
            break
        na, nb = float(na), float(nb)
        moved = abs(na - a) + abs(nb - b)
        a, b, nll, grad, hess = na, nb, n_nll, n_grad, n_hess
        if moved < 1e-12 * (1 + abs(a) + abs(b)):
            break
    return a, b


def fit_calibration(method: str, z: np.ndarray, y: np.ndarray, threshold: float | None = None) -> Calibration:
    """The calibration `method` fitted on validation logits z [N] and labels y [N] (1 fake, 0 real) by NLL.

    threshold: the run's raw decision threshold, stored converted (Calibration.threshold); it is
    converted from its float32 value, the precision in which predict compares raw scores with it.
    Without both classes in y there is nothing to fit: the identity is returned.
    """
    if method not in METHODS:
        raise UserError(f"--calibration must be one of {', '.join(METHODS)}, got {method!r}")
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(z)
    z, y = z[keep], y[keep]
    if method == "none" or len(np.unique(y)) < 2:
        a, b, method = 1.0, 0.0, "none"
    else:
        a, b = _newton(z, y, intercept=method == "platt")
    cal = Calibration(method, a, b)
    if threshold is None:
        return cal
    return Calibration(method, a, b, float(cal.from_probabilities(np.float32(threshold))))


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over `bins` equal-width bins (see the module docstring)."""
    table = reliability(p, y, bins)
    n = table["count"].sum()
    used = table["count"] > 0
    gap = np.abs(table["frac_fake"][used] - table["mean_score"][used])
    return float(np.sum(table["count"][used] / n * gap))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: edges [bins + 1], count, mean_score and frac_fake (NaN for an empty bin).

    Bins are (lo, hi], the first [0, hi]: np.searchsorted on the inner edges, as
    sklearn.calibration.calibration_curve(strategy="uniform") cuts them (it drops empty bins).
    """
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], p)
    count = np.bincount(ids, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(ids, weights=p, minlength=bins) / count
        frac_fake = np.bincount(ids, weights=y, minlength=bins) / count
    return {"edges": edges, "count": count.astype(np.int64), "mean_score": mean_score, "frac_fake": frac_fake}


def nll_from_logits(z: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(z) against y, stable for any z: log(1 + e^z) - y z."""
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def scores_report(z: np.ndarray, y: np.ndarray, cal: Calibration) -> dict:
    """{"before": {ece, nll, brier}, "after": {...}} of raw logits z against labels y, and the method."""
    z = np.asarray(z, dtype=np.float64)

    def numbers(logits: np.ndarray) -> dict:
        p = sigmoid(logits)
        return {"ece": ece(p, y), "nll": nll_from_logits(logits, y), "brier": brier(p, y)}

    return {"method": cal.method, "before": numbers(z), "after": numbers(cal.logits(z))}


def threshold_rates(report: dict) -> dict:
    """The false- and true-positive rates at a metrics report's threshold (from its recall of each class)."""
    real, fake = report.get("recall_real"), report.get("recall_fake")
    return {"fpr": None if real is None else 1.0 - real, "tpr": fake}


def as_score_means(p: np.ndarray, means: str) -> np.ndarray:
    """A calibrated P(fake) column as predict writes it: P(fake) for "fake", 1 - P(fake) for "real" (DFWild-Cup)."""
    if means not in SCORE_MEANS:
        raise UserError(f"--score-means must be fake or real, got {means!r}")
    return np.asarray(p) if means == "fake" else 1.0 - np.asarray(p)


def plot_reliability(curves: dict, path: Path, *, title: str = "", bins: int = ECE_BINS) -> None:
    """Reliability diagram: curves = {label: (probabilities [N], labels [N])}; the fraction of fakes per bin
    against the bin's mean score, the diagonal being perfect calibration, with each curve's ECE in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for name, (p, y) in curves.items():
        t = reliability(p, y, bins)
        used = t["count"] > 0
        ax.plot(t["mean_score"][used], t["frac_fake"][used], "o-", ms=3, label=f"{name} (ECE {ece(p, y, bins):.3f})")
        centres = (t["edges"][:-1] + t["edges"][1:]) / 2
        ax_n.step(centres, t["count"], where="mid", label=name)
    ax.set(ylabel="fraction fake", title=title or "reliability", xlim=(0, 1), ylim=(0, 1))
    ax_n.set(xlabel="predicted P(fake)", ylabel="rows per bin", yscale="log")
    ax_n.set_ylim(bottom=0.8)  # an empty bin sits below the axis
    for a in (ax, ax_n):
        a.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
