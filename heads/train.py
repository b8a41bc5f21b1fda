"""Training K heads at once on resident embeddings. `dfhead fit` is the K = 1 case of `train`.

The data is loaded once (heads.data.load_data) into one tensor on the device. Each step gathers
one batch that all heads of a group share, so a sweep holds the embeddings once and pays for
one gather, one noise draw and one first-layer matmul per step. Configs that share an
architecture train as one batched module; their alpha, gamma, rho, lr, wd are [K] tensors.
The loss is heads.losses.Objective, the metrics and thresholds heads.metrics. GroupRun holds
one group in training, so successive halving (Halving) can stop it at a rung and drop models.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import polars as pl
import torch
import torch.nn.functional as F

from dfclip import store
from dfclip.errors import UserError
from dfclip.heads import graphs, losses, metrics
from dfclip.heads.calibration import Calibration, fit_calibration, scores_report, threshold_rates
from dfclip.heads.config import FIELDS, ONE_VALUE, PER_MODEL, RunConfig, group_key, option_name
from dfclip.heads.data import (Data, EvalSet, augment_with_noise, describe_data, epoch_batches, feature_noise,
                               load_data)
from dfclip.heads.models import HEAD_KINDS, Head, build_head, distinct_generators, head_options
from dfclip.heads.optim import SAM, BatchedAdamW
from dfclip.heads.precision import matmuls_in, resolve_precision
from dfclip.heads.report import StepProgress
from dfclip.runtime import resolve_device, tf32_precision

EVAL_CHUNK = 8192  # rows per eval forward: bounds activation memory to K * chunk * hidden


@dataclass
class RunResult:
    """One trained configuration: its best weights (a K=1 head), history and reports."""

    config: RunConfig
    head: Head
    history: pl.DataFrame  # one row per epoch
    best_epoch: int
    threshold: float
    reports: dict  # {"val": {...}, "holdout": {...}?}
    seconds: float
    # {"val": (probabilities [N], labels [N]), "holdout": ...?} as numpy, of the kept weights: the ROC plot's input
    scores: dict = field(default_factory=dict)
    # The epoch whose loss or validation logits went NaN or infinite (training of this config stopped
    # there), or None. A diverged result is never a usable head: fit refuses it, a sweep ranks it last.
    diverged: int | None = None
    # P(fake) fitted on the val logits after training (heads.calibration); the identity with --calibration none.
    calibration: Calibration | None = None


def _per_model(cfgs: list[RunConfig], name: str, device) -> torch.Tensor:
    return torch.tensor([float(getattr(c, name)) for c in cfgs], device=device)


def _lr_scale(step: int, total: int, warmup: int) -> float:
    """The cosine schedule, per step: linear warmup, then cosine decay to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def sp_cup_lr(epoch: int, epochs: int, lr, min_lr: float):
    """The sp_cup schedule: the lr of 0-based `epoch` under the reference's scheduler.

    The reference builds CosineAnnealingLR(T_max=epochs/4, eta_min=min_lr) and steps it once
    at the end of every epoch, so epoch e trains with its closed form
        min_lr + (lr - min_lr) * (1 + cos(pi * e / T_max)) / 2,
    a cosine wave (lr -> min_lr at epoch T_max -> lr at 2 T_max -> ...), not warm restarts.
    lr: a float or a [K] tensor (one lr per model).
    """
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * epoch / (epochs / 4))) / 2


def _batches_per_epoch(cfg: RunConfig, n: int, batch_size: int) -> tuple[int, bool]:
    """(steps per epoch, whether the last short batch is kept) for n training rows.

    --no-drop-last keeps it, as the reference's DataLoader does, unless it would hand the mlp's
    BatchNorm a single row (one row and no feature noise to double it): the reference would
    stop with an error there; we drop that one row instead.
    """
    short = n % batch_size
    rows_in_step = short * (2 if cfg.feature_noise else 1)
    keep = not cfg.drop_last and short > 0 and (cfg.head != "mlp" or rows_in_step >= 2)
    return n // batch_size + keep, keep


@torch.no_grad()
def predict_logits(head: Head, x: torch.Tensor, *, l2_normalize: bool = False, precision: str = "fp32") -> torch.Tensor:
    """Logits [K, N] (float32) of every model on shared rows x [N, D], in eval mode, chunked.

    precision: the resolved precision of the hidden matmuls, fp32 or bf16 (heads.precision).
    """
    was_training = head.training
    head.eval()
    out = []
    with matmuls_in(precision, x.device):
        for chunk in x.split(EVAL_CHUNK):
            chunk = chunk.float()
            out.append(head(F.normalize(chunk, dim=-1) if l2_normalize else chunk))
    head.train(was_training)
    return torch.cat(out, dim=1) if out else torch.empty(head.k, 0, device=x.device)


def validate_epoch(head: Head, val: EvalSet, *, l2_normalize: bool = False, precision: str = "fp32",
                   video: metrics.VideoIndex | None = None, pool: str = "mean",
                   temperature: float = metrics.DEFAULT_POOL_TEMPERATURE
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(val_loss, val_auc, val_eer, finite, val_video_auc), each [K]: all K models on the same rows, one batched pass.

    val_video_auc is the AUC over the videos of `video` (val's VideoIndex), each scored by `pool`
    over its frames; NaN without one. A diverged head (non-finite logits, e.g. too high an lr) must
    not stop the others: it scores NaN on all and finite=False, so it never counts as improved.
    """
    logits = predict_logits(head, val.x, l2_normalize=l2_normalize, precision=precision)
    finite = torch.isfinite(logits).all(1)
    logits = torch.where(finite[:, None], logits, 0.0)
    val_loss = F.binary_cross_entropy_with_logits(logits, val.y.float().expand_as(logits), reduction="none").mean(1)
    probs = torch.sigmoid(logits)
    val_auc, val_eer = metrics.auc_and_eer(probs, val.y)
    video_auc = torch.full_like(val_auc, math.nan)
    if video is not None:
        video_auc = metrics.roc_auc(metrics.video_scores(probs, video, pool, temperature), video.labels)
    return (*(torch.where(finite, v, math.nan) for v in (val_loss, val_auc, val_eer)), finite,
            torch.where(finite, video_auc, math.nan))


def val_video_index(data: Data, cfgs: list[RunConfig]) -> metrics.VideoIndex | None:
    """The validation set's VideoIndex (None when its rows have no group); a one-line UserError when a
    config selects by video AUC and there are no videos to compute it on."""
    index = metrics.video_index(data.val.groups, data.val.y) if data.val.groups is not None else None
    if not any(c.select == "video_auc" for c in cfgs):
        return index
    if index is None:
        raise UserError("--select video_auc needs videos in the validation set, but none of its rows has a group "
                        "(a video id); use --select auc, or validate on rows with a group column")
    if index.labels.min() == index.labels.max():  # a video AUC needs both classes, or it is NaN every epoch
        raise UserError(f"--select video_auc needs real and fake videos in the validation set, but its "
                        f"{len(index.names)} videos are all {'fake' if int(index.labels[0]) else 'real'}; "
                        "use --select auc, or give validation rows of both classes a group")
    return index


class BestStates:
    """Per-model selection (--select) and early stopping (--patience) of a group, on the device.

    A model that would have stopped early alone keeps training with the group, but its best
    state and history freeze at its stop, so a sweep reports what its fit would.
    """

    def __init__(self, head: Head, select: str, patience: int) -> None:
        k, device = head.k, next(head.parameters()).device
        self.select, self.patience = select, patience
        self.best = {n: t.detach().clone() for n, t in head.state_dict().items()}
        # The --select score of the kept epoch: val loss (lower is better), else val AUC or video AUC.
        self.score = torch.full((k,), math.inf if select == "loss" else -math.inf, device=device)
        self.epoch = torch.zeros(k, dtype=torch.long, device=device)
        self.stale = torch.zeros(k, dtype=torch.long, device=device)
        self.stopped = torch.zeros(k, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(k, dtype=torch.long, device=device)  # epoch of divergence, 0 = none

    def mark_diverged(self, epoch: int, bad: torch.Tensor) -> list[int]:
        """Stop the running models flagged in `bad` [K] for good; returns their indices."""
        new = bad & ~self.stopped
        self.diverged = torch.where(new, torch.full_like(self.diverged, epoch), self.diverged)
        self.stopped |= new
        return new.nonzero().flatten().tolist()

    def update(self, head: Head, epoch: int, val_loss: torch.Tensor, val_auc: torch.Tensor,
               finite: torch.Tensor, val_video_auc: torch.Tensor | None = None) -> None:
        """Keep the weights of every still-running model whose val score improved this epoch.

        val_video_auc [K] is the score of --select video_auc (a NaN never counts as improved)."""
        score = {"loss": val_loss, "video_auc": val_video_auc}.get(self.select, val_auc)
        if self.select == "last":
            improved = torch.ones_like(self.stopped)
        elif self.select == "loss":
            improved = val_loss < self.score
        else:
            improved = score > self.score
        improved &= ~self.stopped & finite
        self.score = torch.where(improved, score, self.score)
        self.epoch = torch.where(improved, torch.full_like(self.epoch, epoch), self.epoch)
        self.stale = torch.where(improved, torch.zeros_like(self.stale), self.stale + 1)
        for n, t in head.state_dict().items():
            mask = improved.view(-1, *([1] * (t.dim() - 1)))
            self.best[n] = torch.where(mask, t.detach(), self.best[n])

    def keep(self, positions: list[int]) -> None:
        """Keep the rows of models `positions` only (successive halving drops the rest)."""
        rows = torch.tensor(positions, device=self.score.device)
        self.best = {n: t.index_select(0, rows) for n, t in self.best.items()}
        self.score, self.epoch, self.stale, self.stopped, self.diverged = (
            t.index_select(0, rows) for t in (self.score, self.epoch, self.stale, self.stopped, self.diverged))

    def all_stopped(self) -> bool:
        """Count this epoch against --patience; True once no model of the group is left running."""
        if self.patience > 0:
            self.stopped |= self.stale >= self.patience
        return bool(self.stopped.all())


def _log_epoch(log: Callable[[str], None], epoch: int, epochs: int, values: list[list[float]], seconds: float) -> None:
    tl, vl, va, ve, *vv = values
    if len(tl) == 1:
        video = f"val_video_auc {vv[0][0]:.4f}  " if vv and math.isfinite(vv[0][0]) else ""
        log(f"epoch {epoch:3d}/{epochs}  loss {tl[0]:.4f}  val_loss {vl[0]:.4f}  val_auc {va[0]:.4f}  "
            f"val_eer {ve[0]:.4f}  {video}{seconds:.1f}s")
    else:
        finite = [v for v in va if math.isfinite(v)]  # diverged heads score NaN
        auc = f"val_auc best {max(finite):.4f} mean {sum(finite) / len(finite):.4f}" if finite else "no finite val_auc"
        log(f"epoch {epoch:3d}/{epochs}  {len(tl)} heads  {auc}  {seconds:.1f}s")


# Each seed's random streams (tensor seeds offset from the init seed, so they never coincide).
NOISE_STREAM, DROPOUT_STREAM = 1_000_003, 2_000_003


def _seed_generators(cfgs: list[RunConfig], device: torch.device, offset: int) -> list[torch.Generator]:
    """One generator per model, a single object per distinct seed: configs with equal seeds draw
    the same masks and noise, which are those of their own fits (see models.distinct_generators)."""
    by_seed: dict[int, torch.Generator] = {}
    for c in cfgs:
        if c.seed not in by_seed:
            by_seed[c.seed] = torch.Generator(device).manual_seed(c.seed + offset)
    return [by_seed[c.seed] for c in cfgs]


def _noisy_batch(xb: torch.Tensor, yb: torch.Tensor, generators: list[torch.Generator]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature noise with one draw per distinct generator: [B, D] -> [2B, D] shared by the group
    when every model has the same seed (the usual grid), else [K, 2B, D], each model its seed's copy."""
    unique, which = distinct_generators(generators)
    if len(unique) == 1:
        return augment_with_noise(xb, yb, unique[0])
    noisy = [feature_noise(xb, g) for g in unique]  # one [2B, D] per seed
    return torch.stack([noisy[i] for i in which]), torch.cat([yb, yb])  # no index tensor to copy to a GPU


class GroupRun:
    """Configs that share group_key(...) in training as one batched head: run it to an epoch,
    drop models (successive halving), and finish into one RunResult each.

    One pass over the data per step: every head of the group sees the same batch, so a sweep
    gathers each batch once and the first layer is one matmul for all K heads. The batch order
    follows `batch_seed` (a fit: its own seed). Per-config seeds set each head's initial weights,
    its dropout masks and its feature noise (one generator per distinct seed), so a model's
    training does not depend on which other configs share its group or chunk, nor on when they
    leave it; with --halving the batch order stays the group's first seed's throughout.
    """

    def __init__(self, data: Data, cfgs: list[RunConfig], *, ids: list[int] | None = None,
                 log: Callable[[str], None] = print, progress: bool = False, batch_seed: int | None = None) -> None:
        c0, k, device = cfgs[0], len(cfgs), data.x.device
        assert all(group_key(c) == group_key(c0) for c in cfgs), "a GroupRun needs configs of one group"
        self.data, self.cfgs, self.log, self.progress = data, list(cfgs), log, progress
        self.ids = list(range(k)) if ids is None else list(ids)  # history's "model": stable across drops
        self.head = build_head(c0.head, k, data.dim, seeds=[c.seed for c in cfgs], **head_options(c0)).to(device)
        self.opt = BatchedAdamW(list(self.head.parameters()), lr=_per_model(cfgs, "lr", device),
                                weight_decay=_per_model(cfgs, "weight_decay", device))
        self.sam = self._sam()
        self.loss_fn = losses.Objective(cfgs, device)  # [K, B] logits -> [K] losses
        self.batch_gen = torch.Generator(device).manual_seed(c0.seed if batch_seed is None else batch_seed)
        self.noise_gens = _seed_generators(cfgs, device, NOISE_STREAM)
        self.dropout_gens = _seed_generators(cfgs, device, DROPOUT_STREAM)
        self.batch_size = min(c0.batch_size, data.y.numel())  # train() says so once (note_small_batches)
        self.steps, self.keep_last = _batches_per_epoch(c0, data.y.numel(), self.batch_size)
        self.total, self.warmup = c0.epochs * self.steps, int(c0.warmup_epochs * self.steps)
        self.best = BestStates(self.head, c0.select, c0.patience)
        self.video = val_video_index(data, cfgs)  # per-epoch video AUC; --select video_auc needs it
        self.rows: list[dict] = []
        self.step, self.epoch, self.done, self.seconds = 0, 0, False, 0.0
        self.graphed: graphs.GraphedSteps | None = None  # CUDA-graph steps (--cuda-graphs), built on first use
        self.use_graphs: bool | None = None

    def _graphed(self, first_epoch: bool) -> graphs.GraphedSteps | None:
        """The CUDA-graph steps of this group (None: eager steps), synced with the host's step counts
        at the first epoch of each run_until call."""
        if self.use_graphs is None:  # decided (and a fallback said) once per group
            self.use_graphs = graphs.use_graphs(self.cfgs[0].cuda_graphs, self.data.x.device, self.log)
        if not self.use_graphs:
            return None
        if self.graphed is None:
            self.graphed = graphs.GraphedSteps(self, self.cfgs[0].cuda_graphs, self.log)
        if first_epoch:
            self.graphed.begin(self.step)
        return self.graphed

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's batch [B, D] (or noise-doubled, see _noisy_batch) and labels: rows idx [B] of the
        training data, shared by the K heads."""
        c0, data = self.cfgs[0], self.data
        xb, yb = data.x[idx].float(), data.y[idx]
        if c0.l2_normalize:
            xb = F.normalize(xb, dim=-1)
        if c0.feature_noise:
            xb, yb = _noisy_batch(xb, yb, self.noise_gens)
        return xb, yb

    def _step(self, xb: torch.Tensor, yb: torch.Tensor, scale, *, graph_safe: bool = False) -> torch.Tensor:
        """Forward, loss, backward and the (SAM) AdamW update of all K heads; returns the loss [K].

        scale: the lr factor (a float or one per model; graph_safe: a device tensor, and the
        optimizer steps on the device with autocast's cast cache off, so the step can be captured)."""
        c0, device, head = self.cfgs[0], self.data.x.device, self.head
        on_device = {"on_device": True} if graph_safe else {}
        # One precision context per forward (heads.precision.matmuls_in); logits come out float32.
        with matmuls_in(c0.precision, device, cache=not graph_safe):
            logits = head(xb, generator=self.dropout_gens)
        loss = self.loss_fn(logits, yb)
        loss.sum().backward()  # models are independent: the sum gives each its own gradient
        if self.sam is not None:
            self.sam.first_step(zero_grad=True)
            with matmuls_in(c0.precision, device, cache=not graph_safe):
                logits = head(xb, update_stats=False, generator=self.dropout_gens)
            self.loss_fn(logits, yb).sum().backward()
            self.sam.second_step(zero_grad=True, lr_scale=scale, **on_device)
        else:
            self.opt.step(lr_scale=scale, **on_device)
            self.opt.zero_grad()  # in place: backward accumulates into the optimizer's flat buffer
        return loss

    def _sam(self) -> SAM | None:
        # group_key splits configs with and without SAM, so a group is all SAM or none.
        if self.cfgs[0].sam_rho <= 0:
            return None
        return SAM(self.opt, _per_model(self.cfgs, "sam_rho", self.data.x.device), adaptive=self.cfgs[0].sam_adaptive)

    def run_until(self, last_epoch: int) -> None:
        """Train epochs self.epoch + 1 .. last_epoch (fewer if every model stopped early)."""
        t0, c0, data, head, k = time.perf_counter(), self.cfgs[0], self.data, self.head, len(self.cfgs)
        todo = max(0, min(last_epoch, c0.epochs) - self.epoch) if not self.done else 0
        bar = StepProgress(todo * self.steps, f"{k} head{'s' if k > 1 else ''}") if self.progress and todo else None
        for epoch in range(self.epoch + 1, self.epoch + 1 + todo):
            te = time.perf_counter()
            head.train()
            train_loss = torch.zeros(k, device=data.x.device)
            batches = epoch_batches(data.y, 1, self.batch_size, [self.batch_gen], drop_last=not self.keep_last,
                                    balanced_fake_rate=c0.fake_rate if c0.balanced else None)
            epoch_scale = None
            if c0.schedule == "sp_cup":  # one lr per epoch; a scale per model, as min_lr is absolute
                epoch_scale = [sp_cup_lr(epoch - 1, c0.epochs, c.lr, c0.min_lr) / c.lr for c in self.cfgs]
            graphed = self._graphed(epoch == self.epoch + 1)
            if graphed is not None:
                graphed.begin_epoch(epoch_scale)
                train_loss = graphed.loss_sum
            for idx in batches:
                if graphed is not None:  # the same step, its inputs in device buffers (heads.graphs)
                    graphed.step(idx[0])
                else:
                    xb, yb = self._batch(idx[0])
                    scale = epoch_scale if epoch_scale is not None else _lr_scale(self.step, self.total, self.warmup)
                    train_loss += self._step(xb, yb, scale).detach()
                self.step += 1
                if bar is not None:
                    bar.advance()
            val_loss, val_auc, val_eer, finite, val_video_auc = validate_epoch(
                head, data.val, l2_normalize=c0.l2_normalize, precision=c0.precision, video=self.video,
                pool=c0.video_pool, temperature=c0.pool_temperature)
            self.best.update(head, epoch, val_loss, val_auc, finite, val_video_auc)
            seconds = time.perf_counter() - te
            values = [v.tolist() for v in (train_loss / max(1, len(batches)), val_loss, val_auc, val_eer, val_video_auc)]
            for i, active in enumerate((~self.best.stopped).tolist()):
                if active:
                    self.rows.append({"model": self.ids[i], "epoch": epoch, "train_loss": values[0][i],
                                      "val_loss": values[1][i], "val_auc": values[2][i], "val_eer": values[3][i],
                                      "val_video_auc": values[4][i], "seconds": seconds})
            _log_epoch(self.log, epoch, c0.epochs, values, seconds)
            for i in self.best.mark_diverged(epoch, ~torch.isfinite(train_loss) | ~finite):
                self.log(f"diverged at epoch {epoch} (loss {values[0][i]:g}): {_per_model_text(self.cfgs[i])}; "
                         "stopped it")
            self.epoch = epoch
            if self.best.all_stopped():
                if not (self.best.diverged > 0).all():
                    self.log(f"early stop: no model improved its val {c0.select} for {c0.patience} epochs")
                self.done = True
                break
        if bar is not None:
            bar.close()
        self.seconds += time.perf_counter() - t0

    def keep(self, positions: list[int]) -> list[tuple[int, RunResult]]:
        """Go on with models `positions` only; the others finish now, at their best epoch so far.

        Returns (id, result) of the dropped models. Everything per model (weights, BatchNorm
        buffers, AdamW moments and lr, loss options, rho, best states, random streams) is cut to the
        kept rows, so the compute shrinks with the group and the kept models continue unchanged.
        """
        dropped = [i for i in range(len(self.cfgs)) if i not in set(positions)]
        out = self._results(dropped) if dropped else []
        if positions:
            device = self.data.x.device
            self.head = self.head.select(positions)
            self.opt = self.opt.select(positions, list(self.head.parameters()))
            self.cfgs = [self.cfgs[i] for i in positions]
            self.ids = [self.ids[i] for i in positions]
            self.noise_gens = [self.noise_gens[i] for i in positions]
            self.dropout_gens = [self.dropout_gens[i] for i in positions]
            self.sam = self._sam()
            self.loss_fn = losses.Objective(self.cfgs, device)
            self.graphed = None  # a captured step holds the old tensors: capture anew
            self.best.keep(positions)
        return out

    def finish(self) -> list[tuple[int, RunResult]]:
        """(id, result) of every model still in the group, with its best weights."""
        return self._results(list(range(len(self.cfgs))))

    def _results(self, positions: list[int]) -> list[tuple[int, RunResult]]:
        ids = [self.ids[i] for i in positions]
        rows = torch.tensor(positions, device=self.data.x.device)
        head = self.head.select(positions)
        head.load_state_dict({n: t.index_select(0, rows) for n, t in self.best.best.items()})
        history = pl.DataFrame(self.rows, schema=HISTORY_SCHEMA).filter(pl.col("model").is_in(ids))
        history = history.with_columns(pl.col("model").replace_strict(ids, list(range(len(ids)))))
        results = _finish(self.data, [self.cfgs[i] for i in positions], head, history,
                          self.best.epoch[rows].tolist(), self.seconds * len(positions) / len(self.cfgs))
        # A model that never had a finite validation epoch kept its initial weights: diverged at epoch 1.
        never = (self.best.diverged[rows] == 0) & (self.best.epoch[rows] == 0)
        for r, epoch in zip(results, torch.where(never, 1, self.best.diverged[rows]).tolist()):
            r.diverged = epoch or None
        return list(zip(ids, results))


HISTORY_SCHEMA = {"model": pl.Int64, "epoch": pl.Int64, "train_loss": pl.Float64, "val_loss": pl.Float64,
                  "val_auc": pl.Float64, "val_eer": pl.Float64, "val_video_auc": pl.Float64, "seconds": pl.Float64}


def train_group(data: Data, cfgs: list[RunConfig], *, log: Callable[[str], None] = print,
                progress: bool = False, batch_seed: int | None = None) -> list[RunResult]:
    """Train configs that share group_key(...) as one batched head for their epochs; one RunResult each.

    The whole training loop (GroupRun): gather a shared batch, optional feature noise, forward,
    CVaR + AUC loss, (SAM) AdamW step, then per-epoch validation and best-state tracking.
    """
    run = GroupRun(data, cfgs, log=log, progress=progress, batch_seed=batch_seed)
    run.run_until(cfgs[0].epochs)
    return [r for _, r in run.finish()]

def _per_model_text(cfg: RunConfig) -> str:
    """The settings that may differ inside a group (lr, alpha, ...), as options: what tells its heads apart."""
    defaults = RunConfig()
    shown = [n for n in PER_MODEL if n in ("lr", "seed") or getattr(cfg, n) != getattr(defaults, n)]
    return " ".join(f"{option_name(n)} {getattr(cfg, n):g}" for n in shown)


def note_small_batches(data: Data, cfgs: list[RunConfig], log: Callable[[str], None]) -> None:
    """One line each, once per fit or sweep (not per group or chunk): the training set is smaller
    than a batch; a kept last batch would hand BatchNorm a single row, so it is dropped."""
    n = data.y.numel()
    sizes = sorted({c.batch_size for c in cfgs if c.batch_size > n})
    if sizes:
        log(f"note: only {n} training rows, so batches are {n} rows, not {', '.join(map(str, sizes))}")
    for c in cfgs:
        size = min(c.batch_size, n)
        if not c.drop_last and n % size and not _batches_per_epoch(c, n, size)[1]:
            log("note: the last batch of each epoch has one row, which BatchNorm cannot normalise: it is dropped")
            break


def _finish(data: Data, cfgs: list[RunConfig], head: Head, history: pl.DataFrame, best_epoch: list[int],
            seconds: float) -> list[RunResult]:
    """Thresholds from val, full reports on val and the held-out sources, split into K results.

    The val and holdout scores are computed here once and carried in each result (for its plot).
    """
    c0, k = cfgs[0], len(cfgs)
    sets = {"val": data.val} | ({"holdout": data.holdout} if data.holdout is not None else {})
    logits = {name: predict_logits(head, s.x, l2_normalize=c0.l2_normalize, precision=c0.precision)
              for name, s in sets.items()}
    scores = {name: torch.sigmoid(z) for name, z in logits.items()}
    thresholds = torch.cat([metrics.pick_threshold(c.threshold, scores["val"][i:i + 1], data.val.y)
                            for i, c in enumerate(cfgs)])
    reports = {name: metrics.evaluate(scores[name], s.y, sources=s.meta["source"].to_list(), groups=s.groups,
                                      threshold=thresholds, pool=c0.video_pool, temperature=c0.pool_temperature)
               for name, s in sets.items()}
    host = {name: (scores[name].cpu().numpy(), s.y.cpu().numpy()) for name, s in sets.items()}
    host_logits = {name: z.cpu().numpy() for name, z in logits.items()}
    # The calibration of each head, fitted on its val logits (heads.calibration), and its numbers on every set.
    cals = [fit_calibration(c.calibration, host_logits["val"][i], host["val"][1], float(thresholds[i]))
            for i, c in enumerate(cfgs)]
    for name, rep in reports.items():
        for i, cal in enumerate(cals):
            rep[i]["calibration"] = scores_report(host_logits[name][i], host[name][1], cal)
            rep[i].update({f"{k}@threshold": v for k, v in threshold_rates(rep[i]).items()})
    return [
        RunResult(cfg, head.select([i]), history.filter(pl.col("model") == i).drop("model"), best_epoch[i],
                  float(thresholds[i]), {name: rep[i] for name, rep in reports.items()}, seconds / k,
                  {name: (s[i], y) for name, (s, y) in host.items()}, calibration=cals[i])
        for i, cfg in enumerate(cfgs)
    ]


def train(data: Data | object, cfgs: list[RunConfig], *, val_store=None, device: str = "auto",
          log: Callable[[str], None] = print, progress: bool = False,
          halving: Halving | None = None) -> tuple[list[RunResult], Data]:
    """Train every config (grouped into batched heads) on one resident copy of the data.

    `data` is a store (a path or store.Store, loaded here with heads.data.load_data onto
    `device`, with `val_store` if given) or an already loaded Data, used as it is. Configs of
    different `feature`s train one feature after the other from the same open store; the Data
    returned is the last one loaded (its provenance and counts are those of every feature).
    halving: successive halving over the configs (see Halving); None trains every config fully.
    With several features, each feature's configs are halved among themselves.
    """
    if not cfgs:
        raise UserError("nothing to train: give at least one configuration")
    for name in (n for n, f in FIELDS.items() if f.metadata["sweep"] == ONE_VALUE):  # the data's own settings
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise UserError(f"{option_name(name)} must be one value for a whole sweep "
                            "(all heads share the data and how it is validated)")
    if halving is not None:
        halving.check(cfgs)
    if isinstance(data, Data):
        if val_store is not None:
            raise ValueError("val_store is for loading a store: loaded Data already holds its validation set")
        if any(c.feature != data.feature for c in cfgs):
            raise ValueError(f"loaded Data holds feature {data.feature}; every config must use it")
    else:  # one open of each store: its metadata is read once, whatever the features
        data = data if store.is_view(data) else store.open(data)
        if val_store is not None and not store.is_view(val_store):
            val_store = store.open(val_store)
        # Over fused stores every part names its store, as the run records it ("proj" -> "A:proj+B:proj").
        cfgs = [dataclasses.replace(c, feature=data.expand_feature(c.feature)) for c in cfgs]
    by_feature: dict[str, list[int]] = {}
    for i, c in enumerate(cfgs):
        by_feature.setdefault(c.feature, []).append(i)
    # "auto" becomes what it means on this device, so results and config.json record the precision used.
    dev = data.x.device if isinstance(data, Data) else resolve_device(device)
    cfgs = [dataclasses.replace(c, precision=resolve_precision(c.precision, dev)) for c in cfgs]
    results: list[RunResult | None] = [None] * len(cfgs)
    with tf32_precision():  # as in evaluate_run and predict_store
        # Configs with different features train in separate groups, each on its own feature's rows;
        # one feature's embeddings are resident at a time.
        loaded = None
        for idx in by_feature.values():
            loaded = None  # free the previous feature's rows before loading the next
            loaded = data if isinstance(data, Data) else load_data(data, cfgs[idx[0]], val_store=val_store,
                                                                   device=dev)
            mine = [cfgs[i] for i in idx]
            log(f"{describe_data(loaded, mine[0])}; head matmuls in {' and '.join(sorted({c.precision for c in mine}))}")
            for note in loaded.notes:
                log(note)
            note_small_batches(loaded, mine, log)
            val_video_index(loaded, mine)  # --select video_auc without videos: refused before any training
            for i, r in zip(idx, _train_groups(loaded, mine, log=log, progress=progress, halving=halving)):
                results[i] = r
        return results, loaded


@dataclass(frozen=True)
class Halving:
    """Successive halving (the ASHA / Hyperband rule): train every config to the first rung, keep
    the best 1/eta by the --select metric on val (ties: the earlier config), go on to the next rung.

    Rungs are at min_epochs * eta^k epochs below --epochs, then --epochs itself; at least one config
    reaches it. A dropped config's result is its best epoch so far (RunResult.history ends at its rung).
    """

    eta: int = 3
    min_epochs: int = 1

    def check(self, cfgs: list[RunConfig]) -> None:
        """UserError for an eta below 2, or a min_epochs outside 1..--epochs (which must be one value)."""
        if self.eta < 2:
            raise UserError(f"--eta must be an integer >= 2 (keep the best 1/eta at each rung), got {self.eta}")
        epochs = {c.epochs for c in cfgs}
        if len(epochs) > 1:
            raise UserError(f"--halving needs one --epochs for the whole sweep, got {sorted(epochs)}")
        if not 1 <= self.min_epochs <= cfgs[0].epochs:
            raise UserError(f"--min-epochs must be between 1 and --epochs ({cfgs[0].epochs}), got {self.min_epochs}")
        selects = {c.select for c in cfgs}
        if len(selects) > 1:  # rungs rank every config by one score: val AUC and val loss cannot be mixed
            raise UserError(f"--halving needs one --select for the whole sweep, got {', '.join(sorted(selects))}")

    def rungs(self, epochs: int) -> list[int]:
        """The epochs at which configs are ranked: [1, 3, 9, 10] for eta 3, min_epochs 1, 10 epochs."""
        out, e = [], self.min_epochs
        while e < epochs:
            out.append(e)
            e *= self.eta
        return out + [epochs]

    def survivors(self, scores: dict[int, float], select: str) -> list[int]:
        """The best max(1, n // eta) config ids by score (--select), ties to the lower id; NaN last."""
        def rank(i: int) -> tuple:
            v = scores[i]
            return (math.isnan(v), v if select == "loss" else -v, i)

        return sorted(sorted(scores, key=rank)[:max(1, len(scores) // self.eta)])


# On a CPU, K heads' activations of [K, B, hidden] floats stop fitting in cache long before
# the batching pays off (measured: 24 MLP-768 heads at once ran 1.8x slower than 24 fits), so
# CPU groups train in chunks whose activations stay near this size. GPUs take whole groups.
CPU_CHUNK_BYTES = 6 * 2**20


def _chunk_size(cfg: RunConfig, dim: int, device: torch.device) -> int:
    if device.type != "cpu":
        return 1 << 30
    width = HEAD_KINDS[cfg.head].width(dim, **head_options(cfg))
    rows = cfg.batch_size * (2 if cfg.feature_noise else 1)
    return max(1, CPU_CHUNK_BYTES // (rows * width * 4))


def _split_by_seed(cfg: RunConfig, device: torch.device) -> bool:
    """Whether a group of cfg's kind trains one seed per chunk on `device` (see _chunks)."""
    return device.type == "cpu" and cfg.feature_noise


def _chunks(data: Data, cfgs: list[RunConfig]) -> list[list[int]]:
    """Config indices per batched run: the groups (group_key), cut into CPU chunks. Every chunk
    follows its group's batch order; the other random streams are per seed, so a config's result
    does not depend on its chunk.

    On a CPU, feature noise also splits a group by seed: a chunk of one seed shares one noisy
    batch [2B, D] (one matmul for all its heads), where a chunk of S seeds would copy each seed's
    batch out to every head, [K, 2B, D] per step (measured: 24 linear heads of 2 seeds spent 45%
    of their sweep in that copy). A GPU keeps the group whole: the copy is cheap there, the launches are not.
    """
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(group_key(c), []).append(i)
    out = []
    for idx in groups.values():
        parts = [idx]
        if _split_by_seed(cfgs[idx[0]], data.x.device):
            by_seed: dict[int, list[int]] = {}
            for i in idx:
                by_seed.setdefault(cfgs[i].seed, []).append(i)
            parts = list(by_seed.values())
        size = _chunk_size(cfgs[idx[0]], data.dim, data.x.device)
        out.extend(part[a:a + size] for part in parts for a in range(0, len(part), size))
    return out


def _train_groups(data: Data, cfgs: list[RunConfig], *, log, progress, halving: Halving | None = None
                  ) -> list[RunResult]:
    results: list[RunResult | None] = [None] * len(cfgs)
    first_seed = {group_key(c): c.seed for c in reversed(cfgs)}  # each group's batch order
    if halving is None:
        for chunk in _chunks(data, cfgs):
            group = [cfgs[i] for i in chunk]
            trained = train_group(data, group, log=log, progress=progress, batch_seed=first_seed[group_key(group[0])])
            for i, r in zip(chunk, trained):
                results[i] = r
        return results
    # Every chunk stays resident (weights, moments, best states) until its models are dropped.
    runs = [GroupRun(data, [cfgs[i] for i in chunk], ids=chunk, log=log, progress=progress,
                     batch_seed=first_seed[group_key(cfgs[chunk[0]])]) for chunk in _chunks(data, cfgs)]
    select = cfgs[0].select  # one value: Halving.check
    rungs = halving.rungs(cfgs[0].epochs)
    for n, rung in enumerate(rungs):
        for run in runs:
            run.run_until(rung)
        if n == len(rungs) - 1:
            break
        scores = {i: s for run in runs for i, s in zip(run.ids, run.best.score.tolist())}
        keep = set(halving.survivors(scores, select))
        log(f"halving: rung {n + 1} at epoch {rung}: {len(keep)} of {len(scores)} configs go on to epoch {rungs[n + 1]}")
        for run in runs:
            for i, r in run.keep([p for p, i in enumerate(run.ids) if i in keep]):
                results[i] = r
        runs = [run for run in runs if run.cfgs and any(i in keep for i in run.ids)]
    for run in runs:
        for i, r in run.finish():
            results[i] = r
    return results
