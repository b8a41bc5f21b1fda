"""Run directories: writing and reading them, plots, the sweep leaderboard, the progress bar.

    runs/<name>/config.json      every setting, the head architecture, threshold, calibration, store provenance
    runs/<name>/head.safetensors the head weights (K = 1; no pickled code)
    runs/<name>/metrics.parquet  one row per epoch
    runs/<name>/report.json      val and held-out-source metrics of the selected epoch
    runs/<name>/roc_pr.png       ROC and PR curves of val (and held-out sources)
    runs/<name>/reliability.png  reliability diagram of val (and held-out sources), raw and calibrated
    runs/<name>/train_rows.parquet  the path of every row it trained on (eval leaves them out)

A run folder is written aside and swapped in whole (`replacing_dir`), so it only ever holds the
files of one head: nothing of a replaced run (robustness.parquet, say) survives.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from dfclip.heads import metrics
from dfclip.heads.calibration import Calibration, calibration_problems, plot_reliability
from dfclip.heads.config import RunConfig, config_from_dict
from dfclip.heads.export import is_export, read_export
from dfclip.heads.models import Head, head_from_config
from dfclip.errors import UserError
from dfclip.runtime import process_alive
from dfclip.store.format import feature_width

RUN_FORMAT = "dfclip-run/1"
TRAIN_ROWS_FILE = "train_rows.parquet"
RELIABILITY_FILE = "reliability.png"
# .NAME.new-PID-TAG: a folder being written; .NAME.old-PID-TAG: the folder it replaces, mid-swap.
_STAGE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old)-(?P<pid>\d+)-[0-9a-f]+$")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself: swaps of its entries happen one at a time, and the lock
    dies with its process (no stale lock file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_stale_stages(parent: Path) -> None:
    """Staging folders of processes that are gone: a half-written new folder is deleted; an old folder
    caught between the two renames of a swap is put back when nothing has taken its place."""
    for entry in parent.iterdir():
        m = _STAGE.match(entry.name)
        if m is None or process_alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        if m["kind"] == "old" and not final.exists():
            os.rename(entry, final)
        else:
            _remove(entry)


@contextmanager
def replacing_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder beside `final` to write into; when the block ends without error it replaces
    `final` whole (a run folder, a sweep folder).

    A folder written in place would keep files of the one it replaces (a robustness table of the
    old head), and an error half-way would leave a mix. Written aside, `final` holds either the old
    files or the new ones, never both; an error (or Ctrl-C) leaves it as it was. The swap is two
    renames under an flock on the parent folder, so concurrent writers of one name leave one whole
    folder (the last wins). A killed writer's staging folder is cleaned up by the next writer.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    stage, old = parent / f".{final.name}.new-{tag}", parent / f".{final.name}.old-{tag}"
    with _folder_lock(parent):
        _clean_stale_stages(parent)
        stage.mkdir()
    try:
        yield stage
        with _folder_lock(parent):
            had_old = final.exists() or final.is_symlink()
            if had_old:
                os.rename(final, old)
            try:
                os.rename(stage, final)
            except BaseException:
                if had_old:
                    os.rename(old, final)
                raise
    finally:
        _remove(stage)  # gone already after a swap
    if had_old:
        _remove(old)


def _first_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """UserError unless `path` is a folder we can write in, or can be created as one.

    Run before training, so a long fit never ends in a PermissionError on its first write.
    """
    path = Path(path)
    base = _first_existing(path)
    if not base.is_dir():
        what = "is" if base == Path(os.path.abspath(path)) else f"is inside {base}, which is"
        raise UserError(f"{option} {path} {what} a file, not a folder; give a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {base}; give a folder you can write to")


def check_writable_file(path: str | os.PathLike, option: str) -> None:
    """UserError unless a file can be written at `path` (its folder exists and is writable; it is no folder)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name, e.g. {path / 'scores.csv'}")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{option} {path}: no permission to write there; give a path you can write to")


def default_run_name(cfg: RunConfig) -> str:
    parts = [cfg.head, f"a{cfg.cvar_alpha:g}", f"g{cfg.auc_gamma:g}"]
    if cfg.objective != "dfclip":  # sp_cup:dag -> mlp-sp_cup-dag-a0.9-...
        parts[1:1] = cfg.objective.split(":")
    if cfg.sam_rho:
        parts.append(f"rho{cfg.sam_rho:g}")
    if cfg.feature != "proj":
        parts.append(cfg.feature)
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


def save_run(result, run_dir: str | os.PathLike, *, provenance: dict, counts: dict,
             train_paths: pl.Series | None = None) -> Path:
    """Write one trained configuration (a heads.train.RunResult) as a run directory (see module docstring).

    The folder is written aside and replaces any earlier `run_dir` whole (replacing_dir).
    train_paths: the paths of the rows it trained on (heads.data.Data.train_paths), so that
    `dfhead eval` can leave them out. The ROC/PR plot draws the val and holdout scores the result
    carries (computed once, in training).
    """
    run_dir = Path(run_dir)
    with replacing_dir(run_dir) as tmp:
        _write_run(result, tmp, run_dir.name, provenance, counts, train_paths)
    return run_dir


def _write_run(result, folder: Path, name: str, provenance: dict, counts: dict, train_paths: pl.Series | None) -> None:
    head = result.head
    state = {n: t.detach().cpu().contiguous() for n, t in head.state_dict().items()}
    save_file(state, str(folder / "head.safetensors"))
    config = {
        "format": RUN_FORMAT, "run": result.config.to_dict(), "head": head.config, "threshold": result.threshold,
        "best_epoch": result.best_epoch, "data": counts, "provenance": provenance,
    }
    if result.calibration is not None:  # predict's P(fake) = calibrated score; decisions stay on the raw one
        config["calibration"] = result.calibration.to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    result.history.write_parquet(folder / "metrics.parquet")
    report = {"best_epoch": result.best_epoch, "threshold": result.threshold, "seconds": result.seconds, **result.reports}
    if result.calibration is not None:
        report["calibration"] = result.calibration.to_dict()
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    if train_paths is not None:
        pl.DataFrame({"path": train_paths}, schema={"path": pl.Utf8}).write_parquet(folder / TRAIN_ROWS_FILE)
    if result.scores:
        plot_roc_pr(result.scores, folder / "roc_pr.png", title=name)
        plot_reliability(_reliability_curves(result.scores, result.calibration), folder / RELIABILITY_FILE,
                         title=f"{name}: reliability")


def _reliability_curves(scores: dict, cal: Calibration | None) -> dict:
    """{label: (probabilities, labels)} of the reliability diagram: each set raw and, when fitted, calibrated."""
    curves = {}
    for name, (p, y) in scores.items():
        curves[f"{name} raw"] = (p, y)
        if cal is not None and cal.method != "none":
            curves[f"{name} {cal.method}"] = (cal.from_probabilities(p), y)
    return curves


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run directory (settings, head, threshold, store provenance), validated.

    A hand-edited or damaged config.json is checked before anything is built from it: one line
    per problem, and a head whose size disagrees with head.safetensors (say `depth: 1000000`)
    is refused from the file's shapes alone, without allocating it.
    """
    run_dir = Path(run_dir)
    if is_export(run_dir):  # OUT.dfclip from `dfhead export`: the same config, checked the same way
        return read_export(run_dir)[0]
    cfg_path, weights = run_dir / "config.json", run_dir / "head.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{run_dir} is not a dfclip run directory (needs config.json and head.safetensors); "
                        "pass a directory written by `dfhead fit` or `dfhead sweep`")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path} cannot be read as JSON ({e}); restore it or re-run `dfhead fit`") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_path} must hold a JSON object; restore it or re-run `dfhead fit`")
    if config.get("format") != RUN_FORMAT:
        raise UserError(f"{run_dir} is a run of format {config.get('format')!r}; this dfclip reads {RUN_FORMAT!r}")
    problems = [f"{cfg_path}: {p}" for p in _run_config_problems(config, lambda head: _weights_problems(head, weights))]
    if problems:
        raise UserError("\n".join(problems))
    return config


def config_problems(config: dict, stored: int, what: str) -> list[str]:
    """Every problem of a run's config (a config.json, or an export's) whose head weights hold `stored` numbers
    (`what` names them), one line each; on success config["run"] is normalised."""
    if config.get("format") != RUN_FORMAT:
        return [f"a run of format {config.get('format')!r}; this dfclip reads {RUN_FORMAT!r}"]
    return _run_config_problems(config, lambda head: _size_problems(head, stored, what))


def _run_config_problems(config: dict, weights_problems: Callable[[dict], list[str]]) -> list[str]:
    """Every problem of a loaded config.json, one line each; on success config["run"] is normalised.
    weights_problems(head): what is wrong with the weights given a valid "head"."""
    from dfclip.heads.config import validate

    missing = [k for k in ("run", "head", "threshold", "provenance") if k not in config]
    if missing:
        return [f"missing field(s) {', '.join(missing)}"]
    problems = []
    if not isinstance(config["run"], dict):
        problems.append(f'"run" must be an object of settings, got {config["run"]!r}')
    else:
        try:  # older runs: per_sample -> loss
            config["run"] = validate(config_from_dict(config["run"], source='"run"')).to_dict()
        except UserError as e:
            problems += [f'"run": {line}' for line in str(e).splitlines()]
    t = config["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:  # NaN fails 0 <= t
        problems.append(f'"threshold" must be a probability in [0, 1], got {t!r}')
    if not isinstance(config["provenance"], dict):
        problems.append(f'"provenance" must be an object, got {config["provenance"]!r}')
    if "calibration" in config:
        problems += [f'"calibration": {p}' for p in calibration_problems(config["calibration"])]
    head = config["head"]
    feature = config["run"].get("feature", "proj") if isinstance(config["run"], dict) else "proj"
    head_problems = _head_problems(head, config["provenance"] if isinstance(config["provenance"], dict) else {}, feature)
    problems += head_problems
    if not head_problems:
        problems += weights_problems(head)
    return problems


def _head_problems(head, provenance: dict, feature: str = "proj") -> list[str]:
    """Types and ranges of config.json's "head" (its kind's options are RunConfig fields: their types)."""
    from dfclip.heads.config import value_type
    from dfclip.heads.models import HEAD_KINDS

    if not isinstance(head, dict):
        return [f'"head" must be an object, got {head!r}']
    kind = head.get("kind")
    if kind not in HEAD_KINDS:
        return [f'"head": "kind" must be one of {", ".join(HEAD_KINDS)}, got {kind!r}']
    problems = []
    dim = head.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        problems.append(f'"head": "dim" must be a whole number >= 1, got {dim!r}')
    else:
        try:
            want = feature_width(provenance, feature)
        except UserError:
            want = None  # a bad feature name is reported with the run's settings
        if want is not None and want != dim:
            problems.append(f'"head": "dim" is {dim} but the run\'s feature {feature} ("provenance") has dim {want}')
    for name in set(head) - {"kind", "dim"} - set(HEAD_KINDS[kind].options):
        problems.append(f'"head": unknown option {name!r} for the {kind} head')
    for name in HEAD_KINDS[kind].options:
        v, t = head.get(name), value_type(name)
        if t is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            problems.append(f'"head": {name!r} must be a whole number >= 1, got {v!r}')
        elif t is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
            problems.append(f'"head": {name!r} must be a number in [0, 1), got {v!r}')
    return problems


def _weights_problems(head: dict, weights: Path) -> list[str]:
    """Compare the size config.json's head would have with head.safetensors, reading only the file's header."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
        return [f"{weights.name} is damaged or not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "re-run `dfhead fit` to write it again"]
    return _size_problems(head, stored, weights.name)


def _size_problems(head: dict, stored: int, what: str) -> list[str]:
    from dfclip.heads.models import HEAD_KINDS

    options = {k: v for k, v in head.items() if k not in ("kind", "dim")}
    expected = HEAD_KINDS[head["kind"]].params(head["dim"], **options)
    if expected != stored:
        return [f'"head" describes {expected:,} weights but {what} holds {stored:,}; '
                "config.json and the weights are from different heads: restore config.json or re-run `dfhead fit`"]
    return []


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Head, dict]:
    """The trained head (eval mode) and config.json of a run directory (or of a `dfhead export` file)."""
    if is_export(run_dir):
        config, state = read_export(run_dir)
        weights = Path(run_dir)
    else:
        config = load_run_config(run_dir)
        weights = Path(run_dir) / "head.safetensors"
        state = None
    head = head_from_config(config["head"], 1, seeds=[config["run"].get("seed", 0)])
    try:
        head.load_state_dict(load_file(str(weights)) if state is None else state)
    except Exception as e:  # same size, other layout (names or shapes); or the data part is damaged
        raise UserError(f"{weights} does not fit the head config.json describes "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); re-run `dfhead fit`") from None
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
    if report.get("video"):  # pooled by the run's --video-pool, a settings column of the same row
        for k in ("auc", "ap", "eer"):
            out[f"{prefix}_video_{k}"] = report["video"].get(k)
    for src, v in (report.get("per_source") or {}).items():
        # Rows without a source ("") are no generator of their own: a `val_auc[]` column would
        # only repeat val_auc (all fakes unnamed) or be empty.
        if src and v.get("auc") is not None:
            out[f"{prefix}_auc[{src}]"] = v["auc"]
    return out


def result_row(result) -> dict:
    row = {k: (",".join(v) if isinstance(v, (list, tuple)) else v) for k, v in result.config.to_dict().items()}
    row.update({"best_epoch": result.best_epoch, "decision_threshold": result.threshold, "seconds": result.seconds})
    # The last epoch it trained: --epochs, unless --patience or --halving stopped it earlier.
    row["stop_epoch"] = int(result.history["epoch"].max()) if result.history.height else 0
    at_best = result.history.filter(pl.col("epoch") == result.best_epoch)  # for --select loss
    row["val_loss"] = float(at_best["val_loss"][0]) if at_best.height else None
    for name, rep in result.reports.items():
        row.update(flat_metrics(rep, name))
    # A diverged config has no usable head: no metrics (so it ranks last), and the epoch it diverged at.
    row["diverged"] = result.diverged
    if result.diverged is not None:
        row.update({k: None for k in row if k.startswith(("val_", "holdout_"))})
    return row


def selection_order(select: str) -> tuple[str, bool]:
    """(column, descending) that ranks runs for --select: lowest val loss, highest val video AUC, else highest
    val AUC."""
    return {"loss": ("val_loss", False), "video_auc": ("val_video_auc", True)}.get(select, ("val_auc", True))


def leaderboard(rows: pl.DataFrame, select: str = "auc", *, halving: bool = False
                ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per-run table, per-configuration mean and std over seeds), both sorted by the selection metric.

    halving: runs that went further come first (stop_epoch descending), then the metric, so the top
    row, which becomes best/, is a full-length run.
    """
    from dfclip.heads.config import FIELDS

    metric_cols = [c for c in rows.columns if c.startswith(("val_", "holdout_")) and c not in FIELDS]
    cfg_cols = [c for c in rows.columns if c in FIELDS and c != "seed"]
    sort_col, desc = selection_order(select)
    stop = [pl.col("stop_epoch").max()] if "stop_epoch" in rows.columns else []
    by, order = ([sort_col], [desc]) if not halving else (["stop_epoch", sort_col], [True, desc])
    summary = (rows.group_by(cfg_cols, maintain_order=True)
               .agg(pl.len().alias("seeds"), *stop,
                    *([pl.col("diverged").is_not_null().sum().alias("diverged")] if "diverged" in rows.columns else []),
                    *[pl.col(c).mean().alias(f"{c}_mean") for c in metric_cols],
                    *[pl.col(c).std().alias(f"{c}_std") for c in metric_cols])
               .sort([b if b == "stop_epoch" else f"{b}_mean" for b in by], descending=order, nulls_last=True))
    return rows.sort(by, descending=order, nulls_last=True, maintain_order=True), summary


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
