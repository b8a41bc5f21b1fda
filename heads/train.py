"""Training K heads at once on resident embeddings. `dfhead fit` is the K = 1 case of `train`.

The data is loaded once from the store into one tensor on the device. Each step gathers one
batch that all heads of a group share, so a sweep holds the embeddings once and pays for
one gather, one noise draw and one first-layer matmul per step. Configs that share an
architecture train as one batched module; their alpha, gamma, rho, lr, wd are [K] tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from dfclip import store
from dfclip.heads import losses, metrics
from dfclip.heads.config import PER_MODEL, RunConfig, group_key, parse_threshold
from dfclip.heads.data import augment_with_noise, epoch_batches, split_rows
from dfclip.heads.models import Head, build_head
from dfclip.heads.optim import SAM, BatchedAdamW
from dfclip.errors import UserError
from dfclip.runtime import resolve_device

EVAL_CHUNK = 8192  # rows per eval forward: bounds activation memory to K * chunk * hidden


@dataclass
class EvalSet:
    """Rows of one evaluation set, resident on the device."""

    name: str
    x: torch.Tensor  # [N, D]
    y: torch.Tensor  # [N] long
    meta: pl.DataFrame

    @property
    def groups(self) -> list[str] | None:
        g = self.meta["group"]
        return g.to_list() if (g != "").any() else None


@dataclass
class Data:
    """Everything a sweep trains and evaluates on, loaded once."""

    x: torch.Tensor  # [N_train, D] training embeddings
    y: torch.Tensor  # [N_train] long
    val: EvalSet
    holdout: EvalSet | None
    provenance: dict
    dim: int
    counts: dict = field(default_factory=dict)


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


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x)
    # CPUs multiply float16 slowly: keep float32 there; GPUs keep the store's float16 (half the memory).
    return t.float() if device.type == "cpu" else t.to(device, non_blocking=True)


def load_data(train_store, cfg: RunConfig, *, val_store=None, device: torch.device) -> Data:
    """Load train/val/holdout rows once, on `device`. Split rules: heads.data.split_rows."""
    tr = store.open(train_store) if not isinstance(train_store, store.Store) else train_store
    va = None
    if val_store is not None:
        va = store.open(val_store) if not isinstance(val_store, store.Store) else val_store
        if not store.format.compatible(va.provenance, tr.provenance):
            raise UserError(
                f"--val-store {va.root} was embedded with {store.format.describe_identity(va.provenance)} but the "
                f"train store with {store.format.describe_identity(tr.provenance)}; extract both with the same model"
            )
    meta = tr.meta
    parts = split_rows(meta, val_frac=cfg.val_frac, seed=cfg.split_seed, holdout_sources=cfg.holdout_sources,
                       has_val_store=va is not None)
    ys = torch.from_numpy(meta["label"].to_numpy().astype(np.int64))

    def subset(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, pl.DataFrame]:
        # Each part is read straight from the shards (idx is sorted, so meta[idx] is in storage
        # order, as load returns it): no full copy of the store sits in memory beside the parts.
        x, rows = tr.load(meta[idx])
        return _to_device(x, device), ys[idx].to(device), rows

    x, y, _ = subset(parts["train"])
    if va is not None:
        # Held-out sources are unseen: they leave the validation store too, not only the train store.
        vmeta = va.select(label=[0, 1], where=~pl.col("source").is_in(list(cfg.holdout_sources)))
        vx, vmeta = va.load(vmeta)
        val = EvalSet("val", _to_device(vx, device),
                      torch.from_numpy(vmeta["label"].to_numpy().astype(np.int64)).to(device), vmeta)
    else:
        val = EvalSet("val", *subset(parts["val"]))
    if val.y.numel() == 0 or val.y.min() == val.y.max():
        if va is not None:
            fix = f"give a --val-store with both classes ({va.root} has one, after any --holdout-source)"
        elif (meta["split"] == "val").any():  # the split column decided, so --val-frac cannot help
            fix = "label both classes among the store's split='val' rows, or give --val-store"
        else:
            fix = "raise --val-frac or give --val-store"
        raise UserError(f"the validation set needs both real and fake rows; {fix}")
    holdout = None
    if len(parts["holdout"]):
        hx, hy, hmeta = subset(parts["holdout"])
        if not (hy == 0).any():  # unseen fakes are ranked against the validation reals
            reals = val.y == 0
            hx, hy = torch.cat([hx, val.x[reals]]), torch.cat([hy, val.y[reals]])
            hmeta = pl.concat([hmeta, val.meta.filter(pl.Series(reals.cpu().numpy()))])
        holdout = EvalSet("holdout", hx, hy, hmeta)
    counts = {"train": int(y.numel()), "train_fake": int(y.sum()), "val": int(val.y.numel()),
              "holdout": int(holdout.y.numel()) if holdout else 0,
              "store": str(tr.root), "val_store": str(va.root) if va is not None else None}
    return Data(x, y, val, holdout, tr.provenance, tr.dim, counts)


def describe_data(data: Data, cfg: RunConfig) -> str:
    """One line on what is trained and tested, imbalance included, so no report hides it."""
    def part(name: str, y: torch.Tensor) -> str:
        fake = int(y.sum())
        real = y.numel() - fake
        ratio = f"{fake / real:.1f}:1" if real else "no reals"
        return f"{name} {y.numel()} ({fake} fake : {real} real = {ratio})"

    text = f"data on {data.x.device}: {part('train', data.y)}, {part('val', data.val.y)}"
    if data.holdout is not None:
        text += f", unseen {', '.join(cfg.holdout_sources)}: {part('holdout', data.holdout.y)}"
    return text


def _per_model(cfgs: list[RunConfig], name: str, device) -> torch.Tensor:
    return torch.tensor([float(getattr(c, name)) for c in cfgs], device=device)


def _lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 over the remaining steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def predict_logits(head: Head, x: torch.Tensor, *, l2_normalize: bool = False) -> torch.Tensor:
    """Logits [K, N] of every model on shared rows x [N, D], in eval mode, chunked."""
    was_training = head.training
    head.eval()
    out = []
    for chunk in x.split(EVAL_CHUNK):
        chunk = chunk.float()
        out.append(head(F.normalize(chunk, dim=-1) if l2_normalize else chunk))
    head.train(was_training)
    return torch.cat(out, dim=1) if out else torch.empty(head.k, 0, device=x.device)


def pick_threshold(spec: str, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-model decision thresholds [K] from validation scores [K, N] (predict fake when score >= t)."""
    kind, value = parse_threshold(spec)
    k = scores.shape[0]
    if kind == "fixed":
        return torch.full((k,), value, dtype=torch.float64, device=scores.device)
    if kind == "eer":
        return metrics.eer(scores, labels)[1].double().nan_to_num(0.5)
    # fpr@v: the lowest threshold whose false-positive rate on val reals is <= v.
    reals = scores[:, labels == 0].sort(dim=1, descending=True).values
    allowed = math.floor(value * reals.shape[1])
    if allowed >= reals.shape[1]:
        return reals[:, -1].double()
    # Step to the next score above the first real that must stay below, in the scores' own dtype:
    # metrics and predict compare in that dtype, where a float64 step would round back onto it.
    above = torch.nextafter(reals[:, allowed], torch.tensor(math.inf, dtype=reals.dtype, device=scores.device))
    return above.double()


def train_group(data: Data, cfgs: list[RunConfig], *, log: Callable[[str], None] = print,
                progress: bool = False, batch_seed: int | None = None) -> list[RunResult]:
    """Train configs that share group_key(...) as one batched head; returns one RunResult each.

    This is the whole training loop: gather a shared batch, optional feature noise, forward,
    CVaR + AUC loss, (SAM) AdamW step, then per-epoch validation and best-state tracking.
    """
    c0, k, device = cfgs[0], len(cfgs), data.x.device
    assert all(group_key(c) == group_key(c0) for c in cfgs), "train_group needs configs of one group"
    arch = {"hidden": c0.hidden, "depth": c0.depth, "dropout": c0.dropout} if c0.head == "mlp" else {}
    head = build_head(c0.head, k, data.dim, seeds=[c.seed for c in cfgs], **arch).to(device)
    opt = BatchedAdamW(list(head.parameters()), lr=_per_model(cfgs, "lr", device),
                       weight_decay=_per_model(cfgs, "weight_decay", device))
    rho = _per_model(cfgs, "sam_rho", device)
    sam = SAM(opt, rho, adaptive=c0.sam_adaptive) if any(c.sam_rho > 0 for c in cfgs) else None
    alpha, gamma = _per_model(cfgs, "cvar_alpha", device), _per_model(cfgs, "auc_gamma", device)
    use_auc = any(c.auc_gamma > 0 for c in cfgs)
    vs = {n: _per_model(cfgs, f"vs_{n}", device)[:, None] for n in
          ("delta_fake", "delta_real", "iota_fake", "iota_real", "scale")}
    margin = _per_model(cfgs, "auc_margin", device)[:, None, None]

    # Only models with gamma > 0 pay for the O(B^2) pair term: grids often mix in gamma = 0
    # (measured: a 24-head linear sweep with half gamma = 0 ran 1.9x faster on CPU, same results).
    auc_models = [i for i, c in enumerate(cfgs) if c.auc_gamma > 0]
    auc_idx = torch.tensor(auc_models, device=device)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.float()
        loss = losses.head_loss(logits, y, alpha=alpha, gamma=0.0, per_sample=c0.loss, vs=vs)  # [K]
        if not use_auc:
            return loss
        if len(auc_models) == k:
            return loss + gamma * losses.pairwise_auc_loss(logits, y, c0.auc_kind, margin)
        auc = losses.pairwise_auc_loss(logits[auc_idx], y[auc_idx], c0.auc_kind, margin[auc_idx])
        return loss.index_add(0, auc_idx, gamma[auc_idx] * auc)

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
    minimize = c0.select == "loss"
    best = {n: t.detach().clone() for n, t in head.state_dict().items()}
    best_score = torch.full((k,), math.inf if minimize else -math.inf, device=device)
    best_epoch = torch.zeros(k, dtype=torch.long, device=device)
    stale = torch.zeros(k, dtype=torch.long, device=device)
    # A model that would have stopped early alone keeps training with the group, but its best
    # state and history freeze at its stop, so a sweep reports what its fit would.
    stopped = torch.zeros(k, dtype=torch.bool, device=device)
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
            loss = loss_fn(head(xb, generator=rng), yb)
            loss.sum().backward()  # models are independent: the sum gives each its own gradient
            if sam is not None:
                sam.first_step(zero_grad=True)
                loss_fn(head(xb, update_stats=False, generator=rng), yb).sum().backward()
                sam.second_step(zero_grad=True, lr_scale=scale)
            else:
                opt.step(lr_scale=scale)
                opt.zero_grad(set_to_none=True)
            train_loss += loss.detach()
            step += 1
            if bar is not None:
                bar.advance()
        # Validation: all K models on the same rows, one batched pass.
        logits = predict_logits(head, data.val.x, l2_normalize=c0.l2_normalize)
        # A diverged head (non-finite logits, e.g. too high an lr) must not stop the others: it
        # scores NaN, never counts as improved, and so keeps its last finite best state.
        finite = torch.isfinite(logits).all(1)
        logits = torch.where(finite[:, None], logits, 0.0)
        val_loss = F.binary_cross_entropy_with_logits(logits, data.val.y.float().expand_as(logits),
                                                      reduction="none").mean(1)
        scores = torch.sigmoid(logits)
        val_loss, val_auc, val_eer = (torch.where(finite, v, math.nan) for v in (
            val_loss, *metrics.auc_and_eer(scores, data.val.y)))
        score = val_loss if minimize else val_auc
        if c0.select == "last":
            improved = torch.ones(k, dtype=torch.bool, device=device)
        else:
            improved = score < best_score if minimize else score > best_score
        improved &= ~stopped & finite
        best_score = torch.where(improved, score, best_score)
        best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
        stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
        for n, t in head.state_dict().items():
            mask = improved.view(k, *([1] * (t.dim() - 1)))
            best[n] = torch.where(mask, t.detach(), best[n])
        seconds = time.perf_counter() - te
        tl, vl, va, ve = (v.tolist() for v in (train_loss / max(1, len(batches)), val_loss, val_auc, val_eer))
        active = (~stopped).tolist()
        for i in range(k):
            if active[i]:
                rows.append({"model": i, "epoch": epoch, "train_loss": tl[i],
                             "val_loss": vl[i], "val_auc": va[i], "val_eer": ve[i], "seconds": seconds})
        if k == 1:
            log(f"epoch {epoch:3d}/{c0.epochs}  loss {tl[0]:.4f}  val_loss {vl[0]:.4f}  val_auc {va[0]:.4f}  "
                f"val_eer {ve[0]:.4f}  {seconds:.1f}s")
        else:
            log(f"epoch {epoch:3d}/{c0.epochs}  {k} heads  val_auc best {np.nanmax(va):.4f} mean {np.nanmean(va):.4f}  {seconds:.1f}s")
        if c0.patience > 0:
            stopped |= stale >= c0.patience
            if bool(stopped.all()):
                log(f"early stop: no model improved its val {c0.select} for {c0.patience} epochs")
                break
    if bar is not None:
        bar.close()
    head.load_state_dict(best)
    return _finish(data, cfgs, head, pl.DataFrame(rows), best_epoch.tolist(), time.perf_counter() - t0)


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


def _finish(data: Data, cfgs: list[RunConfig], head: Head, history: pl.DataFrame, best_epoch: list[int],
            seconds: float) -> list[RunResult]:
    """Thresholds from val, full reports on val and the held-out sources, split into K results."""
    c0, k = cfgs[0], len(cfgs)
    val_scores = torch.sigmoid(predict_logits(head, data.val.x, l2_normalize=c0.l2_normalize))
    thresholds = torch.cat([pick_threshold(c.threshold, val_scores[i:i + 1], data.val.y) for i, c in enumerate(cfgs)])
    reports = {"val": metrics.evaluate(val_scores, data.val.y, sources=data.val.meta["source"].to_list(),
                                       groups=data.val.groups, threshold=thresholds)}
    if data.holdout is not None:
        h = data.holdout
        hs = torch.sigmoid(predict_logits(head, h.x, l2_normalize=c0.l2_normalize))
        reports["holdout"] = metrics.evaluate(hs, h.y, sources=h.meta["source"].to_list(), groups=h.groups,
                                              threshold=thresholds)
    return [
        RunResult(cfg, head.select([i]), history.filter(pl.col("model") == i).drop("model"), best_epoch[i],
                  float(thresholds[i]), {name: rep[i] for name, rep in reports.items()}, seconds / k)
        for i, cfg in enumerate(cfgs)
    ]


def train(train_store, cfgs: list[RunConfig], *, val_store=None, device: str = "auto",
          log: Callable[[str], None] = print, progress: bool = False) -> tuple[list[RunResult], Data]:
    """Train every config (grouped into batched heads) on one resident copy of the data."""
    if not cfgs:
        raise UserError("nothing to train: give at least one configuration")
    shared = ("val_frac", "split_seed", "holdout_sources")
    for name in shared:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise UserError(f"--{name.replace('_', '-')} must be one value for a whole sweep (all heads share the data)")
    dev = resolve_device(device)
    data = load_data(train_store, cfgs[0], val_store=val_store, device=dev)
    log(describe_data(data, cfgs[0]))
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
    width = (cfg.hidden or dim) if cfg.head == "mlp" else 1
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
