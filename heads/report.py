"""Run directories: writing and reading them, plots, the sweep leaderboard, the progress bar.

    runs/<name>/config.json      every setting, the head architecture, threshold, store provenance
    runs/<name>/head.safetensors the head weights (K = 1; no pickled code)
    runs/<name>/metrics.parquet  one row per epoch
    runs/<name>/report.json      val and held-out-source metrics of the selected epoch
    runs/<name>/roc_pr.png       ROC and PR curves of val (and held-out sources)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from dfclip.heads import metrics
from dfclip.heads.config import RunConfig, config_from_dict
from dfclip.heads.models import Head, head_from_config
from dfclip.errors import UserError

RUN_FORMAT = "dfclip-run/1"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_run_name(cfg: RunConfig) -> str:
    parts = [cfg.head, f"a{cfg.cvar_alpha:g}", f"g{cfg.auc_gamma:g}"]
    if cfg.sam_rho:
        parts.append(f"rho{cfg.sam_rho:g}")
    if cfg.feature != "proj":
        parts.append(cfg.feature)
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


def save_run(result, run_dir: str | os.PathLike, *, provenance: dict, counts: dict) -> Path:
    """Write one trained configuration (a heads.train.RunResult) as a run directory (see module docstring).

    The ROC/PR plot draws the val and holdout scores the result carries (computed once, in training).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    head = result.head
    state = {n: t.detach().cpu().contiguous() for n, t in head.state_dict().items()}
    save_file(state, str(run_dir / ".head.safetensors.tmp"))
    os.replace(run_dir / ".head.safetensors.tmp", run_dir / "head.safetensors")
    config = {
        "format": RUN_FORMAT, "run": result.config.to_dict(), "head": head.config, "threshold": result.threshold,
        "best_epoch": result.best_epoch, "data": counts, "provenance": provenance,
    }
    _atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, default=str))
    result.history.write_parquet(run_dir / "metrics.parquet")
    report = {"best_epoch": result.best_epoch, "threshold": result.threshold, "seconds": result.seconds, **result.reports}
    _atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
    if result.scores:
        plot_roc_pr(result.scores, run_dir / "roc_pr.png", title=run_dir.name)
    return run_dir


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run directory (settings, head, threshold, store provenance)."""
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "head.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{run_dir} is not a dfclip run directory (needs config.json and head.safetensors); "
                        "pass a directory written by `dfhead fit` or `dfhead sweep`")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != RUN_FORMAT:
        raise UserError(f"{run_dir} is a run of format {config.get('format')!r}; this dfclip reads {RUN_FORMAT!r}")
    config["run"] = config_from_dict(config["run"], source=str(cfg_path)).to_dict()  # older runs: per_sample -> loss
    return config


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Head, dict]:
    """The trained head (eval mode) and config.json of a run directory."""
    config = load_run_config(run_dir)
    weights = Path(run_dir) / "head.safetensors"
    head = head_from_config(config["head"], 1, seeds=[config["run"].get("seed", 0)])
    head.load_state_dict(load_file(str(weights)))
    return head.to(device).eval(), config


def plot_roc_pr(scores: dict, path: Path, *, title: str = "") -> None:
    """ROC and PR curves; scores = {set name: (probabilities [N] numpy, labels [N] numpy)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, (s, y) in scores.items():
        if len(np.unique(y)) < 2:
            continue
        # The metrics module's tie-aware ROC: one point per distinct threshold, as the AUC counts it.
        roc = metrics.roc_points(torch.as_tensor(s), torch.as_tensor(y))
        keep = roc.is_distinct[0]
        fpr, tpr = roc.fpr[0][keep].numpy(), roc.tpr[0][keep].numpy()
        n_fake = float(y.sum())
        tp, fp = tpr[1:] * n_fake, fpr[1:] * (len(y) - n_fake)  # past the origin: something is called fake
        ax_roc.plot(fpr, tpr, label=name)
        ax_pr.plot(tpr[1:], tp / (tp + fp), label=name)
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false positive rate (real called fake)", ylabel="true positive rate (fake caught)", title="ROC")
    ax_pr.set(xlabel="recall (fake)", ylabel="precision (fake)", title="precision-recall", ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax_roc else "lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def flat_metrics(report: dict, prefix: str) -> dict:
    """Headline numbers of a metrics report as flat columns (`val_auc`, `holdout_eer`, ...)."""
    keep = ("auc", "ap", "eer", "acc", "acc@0.5", "balanced_acc", "f1_macro", "tpr@fpr=0.01", "tpr@fpr=0.05")
    out = {f"{prefix}_{k}": report.get(k) for k in keep}
    if report.get("video"):
        out[f"{prefix}_video_auc"] = report["video"].get("auc")
    for src, v in (report.get("per_source") or {}).items():
        # Rows without a source ("") are no generator of their own: a `val_auc[]` column would
        # only repeat val_auc (all fakes unnamed) or be empty.
        if src and v.get("auc") is not None:
            out[f"{prefix}_auc[{src}]"] = v["auc"]
    return out


def result_row(result) -> dict:
    row = {k: (",".join(v) if isinstance(v, (list, tuple)) else v) for k, v in result.config.to_dict().items()}
    row.update({"best_epoch": result.best_epoch, "decision_threshold": result.threshold, "seconds": result.seconds})
    at_best = result.history.filter(pl.col("epoch") == result.best_epoch)  # for --select loss
    row["val_loss"] = float(at_best["val_loss"][0]) if at_best.height else None
    for name, rep in result.reports.items():
        row.update(flat_metrics(rep, name))
    return row


def selection_order(select: str) -> tuple[str, bool]:
    """(column, descending) that ranks runs for --select: lowest val loss, else highest val AUC."""
    return ("val_loss", False) if select == "loss" else ("val_auc", True)


def leaderboard(rows: pl.DataFrame, select: str = "auc") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per-run table, per-configuration mean and std over seeds), both sorted by the selection metric."""
    from dfclip.heads.config import FIELDS

    metric_cols = [c for c in rows.columns if c.startswith(("val_", "holdout_")) and c not in FIELDS]
    cfg_cols = [c for c in rows.columns if c in FIELDS and c != "seed"]
    sort_col, desc = selection_order(select)
    summary = (rows.group_by(cfg_cols, maintain_order=True)
               .agg(pl.len().alias("seeds"),
                    *[pl.col(c).mean().alias(f"{c}_mean") for c in metric_cols],
                    *[pl.col(c).std().alias(f"{c}_std") for c in metric_cols])
               .sort(f"{sort_col}_mean", descending=desc, nulls_last=True))
    return rows.sort(sort_col, descending=desc, nulls_last=True), summary


def varying_columns(rows: pl.DataFrame) -> list[str]:
    """Config columns that differ across a sweep (what the leaderboard should show)."""
    from dfclip.heads.config import FIELDS

    return [c for c in rows.columns if c in FIELDS and rows[c].n_unique() > 1]


def plot_heatmap(summary: pl.DataFrame, path: Path, value: str = "val_auc_mean") -> bool:
    """Val AUC over alpha x gamma (mean over seeds and any other varied option); False if not a grid."""
    if value not in summary.columns or (summary["cvar_alpha"].n_unique() < 2 and summary["auc_gamma"].n_unique() < 2):
        return False  # not a grid over alpha or gamma
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = summary.group_by("cvar_alpha", "auc_gamma").agg(pl.col(value).mean())
    alphas, gammas = sorted(g["cvar_alpha"].unique()), sorted(g["auc_gamma"].unique())
    grid = np.full((len(gammas), len(alphas)), np.nan)
    for a, gm, v in g.iter_rows():
        grid[gammas.index(gm), alphas.index(a)] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(alphas), 1.2 + 0.7 * len(gammas)))
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(gammas)), [f"{gm:g}" for gm in gammas])
    ax.set(xlabel="CVaR alpha", ylabel="AUC gamma", title="val AUC (mean over the rest)")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w" if v < np.nanmean(grid) else "k", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=@+-]", "_", name)


class StepProgress:
    """A transient rich progress bar over optimisation steps (steps/s and ETA)."""

    def __init__(self, total: int, what: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn(f"training {what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           transient=True)
        self._task = self._p.add_task("train", total=total)
        self._p.start()

    def advance(self) -> None:
        self._p.advance(self._task)

    def close(self) -> None:
        self._p.stop()
