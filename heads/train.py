"""Training K heads at once on resident embeddings. `dfhead fit` is the K = 1 case of `train`.

The data is loaded once (heads.data.load_data) into one tensor on the device. Each step gathers
one batch that all heads of a group share, so a sweep holds the embeddings once and pays for
one gather, one noise draw and one first-layer matmul per step. Configs that share an
architecture train as one batched module; their alpha, gamma, rho, lr, wd are [K] tensors.
The loss is heads.losses.Objective, the metrics and thresholds heads.metrics.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from dfclip.errors import UserError
from dfclip.heads import losses, metrics
from dfclip.heads.config import RunConfig, group_key
from dfclip.heads.data import Data, EvalSet, augment_with_noise, describe_data, epoch_batches, load_data
from dfclip.heads.models import HEAD_KINDS, Head, build_head, head_options
from dfclip.heads.optim import SAM, BatchedAdamW
from dfclip.heads.precision import matmuls_in, resolve_precision
from dfclip.heads.report import StepProgress
from dfclip.runtime import resolve_device

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


def _per_model(cfgs: list[RunConfig], name: str, device) -> torch.Tensor:
    return torch.tensor([float(getattr(c, name)) for c in cfgs], device=device)


def _lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def predict_logits(head: Head, x: torch.Tensor, *, l2_normalize: bool = False, precision: str = "fp32") -> torch.Tensor:
    """Logits [K, N] (float32) of every model on shared rows x [N, D], in eval mode, chunked.

    precision: the resolved precision of the hidden matmuls, fp32 or bf16 (heads.precision).
    """
    was_training = head.training
    head.eval()
    out = []
    with matmuls_in(precision, x.device):  # one context: the bf16 weight copies are made once
        for chunk in x.split(EVAL_CHUNK):
            chunk = chunk.float()
            out.append(head(F.normalize(chunk, dim=-1) if l2_normalize else chunk))
    head.train(was_training)
    return torch.cat(out, dim=1) if out else torch.empty(head.k, 0, device=x.device)


def validate_epoch(head: Head, val: EvalSet, *, l2_normalize: bool = False, precision: str = "fp32"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(val_loss, val_auc, val_eer, finite), each [K]: all K models on the same rows, one batched pass.

    A diverged head (non-finite logits, e.g. too high an lr) must not stop the others: it
    scores NaN on all three and finite=False, so it never counts as improved.
    """
    logits = predict_logits(head, val.x, l2_normalize=l2_normalize, precision=precision)
    finite = torch.isfinite(logits).all(1)
    logits = torch.where(finite[:, None], logits, 0.0)
    val_loss = F.binary_cross_entropy_with_logits(logits, val.y.float().expand_as(logits), reduction="none").mean(1)
    val_auc, val_eer = metrics.auc_and_eer(torch.sigmoid(logits), val.y)
    return (*(torch.where(finite, v, math.nan) for v in (val_loss, val_auc, val_eer)), finite)


class BestStates:
    """Per-model selection (--select) and early stopping (--patience) of a group, on the device.

    A model that would have stopped early alone keeps training with the group, but its best
    state and history freeze at its stop, so a sweep reports what its fit would.
    """

    def __init__(self, head: Head, select: str, patience: int) -> None:
        k, device = head.k, next(head.parameters()).device
        self.select, self.patience = select, patience
        self.best = {n: t.detach().clone() for n, t in head.state_dict().items()}
        self.score = torch.full((k,), math.inf if select == "loss" else -math.inf, device=device)
        self.epoch = torch.zeros(k, dtype=torch.long, device=device)
        self.stale = torch.zeros(k, dtype=torch.long, device=device)
        self.stopped = torch.zeros(k, dtype=torch.bool, device=device)

    def update(self, head: Head, epoch: int, val_loss: torch.Tensor, val_auc: torch.Tensor,
               finite: torch.Tensor) -> None:
        """Keep the weights of every still-running model whose val score improved this epoch."""
        if self.select == "last":
            improved = torch.ones_like(self.stopped)
        elif self.select == "loss":
            improved = val_loss < self.score
        else:
            improved = val_auc > self.score
        improved &= ~self.stopped & finite
        self.score = torch.where(improved, val_loss if self.select == "loss" else val_auc, self.score)
        self.epoch = torch.where(improved, torch.full_like(self.epoch, epoch), self.epoch)
        self.stale = torch.where(improved, torch.zeros_like(self.stale), self.stale + 1)
        for n, t in head.state_dict().items():
            mask = improved.view(-1, *([1] * (t.dim() - 1)))
            self.best[n] = torch.where(mask, t.detach(), self.best[n])

    def all_stopped(self) -> bool:
        """Count this epoch against --patience; True once no model of the group is left running."""
        if self.patience <= 0:
            return False
        self.stopped |= self.stale >= self.patience
        return bool(self.stopped.all())


def _log_epoch(log: Callable[[str], None], epoch: int, epochs: int, values: list[list[float]], seconds: float) -> None:
    tl, vl, va, ve = values
    if len(tl) == 1:
        log(f"epoch {epoch:3d}/{epochs}  loss {tl[0]:.4f}  val_loss {vl[0]:.4f}  val_auc {va[0]:.4f}  "
            f"val_eer {ve[0]:.4f}  {seconds:.1f}s")
    else:
        log(f"epoch {epoch:3d}/{epochs}  {len(tl)} heads  val_auc best {np.nanmax(va):.4f} mean {np.nanmean(va):.4f}  "
            f"{seconds:.1f}s")


def train_group(data: Data, cfgs: list[RunConfig], *, log: Callable[[str], None] = print,
                progress: bool = False, batch_seed: int | None = None) -> list[RunResult]:
    """Train configs that share group_key(...) as one batched head; returns one RunResult each.

    This is the whole training loop: gather a shared batch, optional feature noise, forward,
    CVaR + AUC loss, (SAM) AdamW step, then per-epoch validation and best-state tracking.
    """
    c0, k, device = cfgs[0], len(cfgs), data.x.device
    assert all(group_key(c) == group_key(c0) for c in cfgs), "train_group needs configs of one group"
    head = build_head(c0.head, k, data.dim, seeds=[c.seed for c in cfgs], **head_options(c0)).to(device)
    opt = BatchedAdamW(list(head.parameters()), lr=_per_model(cfgs, "lr", device),
                       weight_decay=_per_model(cfgs, "weight_decay", device))
    rho = _per_model(cfgs, "sam_rho", device)
    sam = SAM(opt, rho, adaptive=c0.sam_adaptive) if any(c.sam_rho > 0 for c in cfgs) else None
    loss_fn = losses.Objective(cfgs, device)  # [K, B] logits -> [K] losses

    # One pass over the data per step: every head of the group sees the same batch (and the same
    # noisy copies), so a sweep gathers each batch once and the first layer is one matmul for all
    # K heads. The batch order follows the group's first seed (a fit: its own seed); per-head
    # seeds set each head's initial weights, and dropout draws independent masks per head.
    batch_gen = torch.Generator(device).manual_seed(c0.seed if batch_seed is None else batch_seed)
    rng = torch.Generator(device).manual_seed(c0.seed + 1_000_003)
    batch_size = min(c0.batch_size, data.y.numel())
    if batch_size < c0.batch_size:
        log(f"note: only {data.y.numel()} training rows, so batches are {batch_size} rows, not {c0.batch_size}")
    steps = data.y.numel() // batch_size  # drop_last, also for balanced batches
    total, warmup = c0.epochs * steps, int(c0.warmup_epochs * steps)
    best = BestStates(head, c0.select, c0.patience)
    rows, step, t0 = [], 0, time.perf_counter()
    bar = StepProgress(total, f"{k} head{'s' if k > 1 else ''}") if progress else None
    for epoch in range(1, c0.epochs + 1):
        te = time.perf_counter()
        head.train()
        train_loss = torch.zeros(k, device=device)
        batches = epoch_batches(data.y, 1, batch_size, [batch_gen],
                                balanced_fake_rate=c0.fake_rate if c0.balanced else None)
        for idx in batches:
            xb, yb = data.x[idx[0]].float(), data.y[idx[0]]  # [B, D], [B]: shared by the K heads
            if c0.l2_normalize:
                xb = F.normalize(xb, dim=-1)
            if c0.feature_noise:
                xb, yb = augment_with_noise(xb, yb, rng)
            yb = yb.expand(k, -1)  # [K, B] view for the per-head losses
            scale = _lr_scale(step, total, warmup)
            # One precision context per forward (heads.precision.matmuls_in); logits come out float32.
            with matmuls_in(c0.precision, device):
                logits = head(xb, generator=rng)
            loss = loss_fn(logits, yb)
            loss.sum().backward()  # models are independent: the sum gives each its own gradient
            if sam is not None:
                sam.first_step(zero_grad=True)
                with matmuls_in(c0.precision, device):
                    logits = head(xb, update_stats=False, generator=rng)
                loss_fn(logits, yb).sum().backward()
                sam.second_step(zero_grad=True, lr_scale=scale)
            else:
                opt.step(lr_scale=scale)
                opt.zero_grad()
            train_loss += loss.detach()
            step += 1
            if bar is not None:
                bar.advance()
        val_loss, val_auc, val_eer, finite = validate_epoch(head, data.val, l2_normalize=c0.l2_normalize,
                                                            precision=c0.precision)
        best.update(head, epoch, val_loss, val_auc, finite)
        seconds = time.perf_counter() - te
        values = [v.tolist() for v in (train_loss / max(1, len(batches)), val_loss, val_auc, val_eer)]
        for i, active in enumerate((~best.stopped).tolist()):
            if active:
                rows.append({"model": i, "epoch": epoch, "train_loss": values[0][i], "val_loss": values[1][i],
                             "val_auc": values[2][i], "val_eer": values[3][i], "seconds": seconds})
        _log_epoch(log, epoch, c0.epochs, values, seconds)
        if best.all_stopped():
            log(f"early stop: no model improved its val {c0.select} for {c0.patience} epochs")
            break
    if bar is not None:
        bar.close()
    head.load_state_dict(best.best)
    return _finish(data, cfgs, head, pl.DataFrame(rows), best.epoch.tolist(), time.perf_counter() - t0)


def _finish(data: Data, cfgs: list[RunConfig], head: Head, history: pl.DataFrame, best_epoch: list[int],
            seconds: float) -> list[RunResult]:
    """Thresholds from val, full reports on val and the held-out sources, split into K results.

    The val and holdout scores are computed here once and carried in each result (for its plot).
    """
    c0, k = cfgs[0], len(cfgs)
    sets = {"val": data.val} | ({"holdout": data.holdout} if data.holdout is not None else {})
    scores = {name: torch.sigmoid(predict_logits(head, s.x, l2_normalize=c0.l2_normalize, precision=c0.precision))
              for name, s in sets.items()}
    thresholds = torch.cat([metrics.pick_threshold(c.threshold, scores["val"][i:i + 1], data.val.y)
                            for i, c in enumerate(cfgs)])
    reports = {name: metrics.evaluate(scores[name], s.y, sources=s.meta["source"].to_list(), groups=s.groups,
                                      threshold=thresholds) for name, s in sets.items()}
    host = {name: (scores[name].cpu().numpy(), s.y.cpu().numpy()) for name, s in sets.items()}
    return [
        RunResult(cfg, head.select([i]), history.filter(pl.col("model") == i).drop("model"), best_epoch[i],
                  float(thresholds[i]), {name: rep[i] for name, rep in reports.items()}, seconds / k,
                  {name: (s[i], y) for name, (s, y) in host.items()})
        for i, cfg in enumerate(cfgs)
    ]


def train(data: Data | object, cfgs: list[RunConfig], *, val_store=None, device: str = "auto",
          log: Callable[[str], None] = print, progress: bool = False) -> tuple[list[RunResult], Data]:
    """Train every config (grouped into batched heads) on one resident copy of the data.

    `data` is a store (a path or store.Store, loaded here with heads.data.load_data onto
    `device`, with `val_store` if given) or an already loaded Data, used as it is.
    """
    if not cfgs:
        raise UserError("nothing to train: give at least one configuration")
    shared = ("val_frac", "split_seed", "holdout_sources")
    for name in shared:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise UserError(f"--{name.replace('_', '-')} must be one value for a whole sweep (all heads share the data)")
    if not isinstance(data, Data):
        data = load_data(data, cfgs[0], val_store=val_store, device=resolve_device(device))
    elif val_store is not None:
        raise ValueError("val_store is for loading a store: loaded Data already holds its validation set")
    # "auto" becomes what it means on this device, so results and config.json record the precision used.
    device = data.x.device
    cfgs = [dataclasses.replace(c, precision=resolve_precision(c.precision, device)) for c in cfgs]
    log(f"{describe_data(data, cfgs[0])}; head matmuls in {' and '.join(sorted({c.precision for c in cfgs}))}")
    # TF32 tensor cores for the heads' matmuls on GPUs (inputs rounded to 10 mantissa bits, fp32
    # accumulation), as is usual for training; the flag is restored afterwards. CPUs are unaffected.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _train_groups(data, cfgs, log=log, progress=progress), data
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


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


def _train_groups(data: Data, cfgs: list[RunConfig], *, log, progress) -> list[RunResult]:
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(group_key(c), []).append(i)
    results: list[RunResult | None] = [None] * len(cfgs)
    for idx in groups.values():
        first = cfgs[idx[0]]
        size = _chunk_size(first, data.dim, data.x.device)
        for a in range(0, len(idx), size):
            chunk = idx[a:a + size]
            # Every chunk follows the group's batch order; dropout masks and noise are drawn per chunk,
            # so with dropout or feature noise a config's result depends on its chunk (CPU only).
            trained = train_group(data, [cfgs[i] for i in chunk], log=log, progress=progress, batch_seed=first.seed)
            for i, r in zip(chunk, trained):
                results[i] = r
    return results
