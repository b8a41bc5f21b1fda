"""The data the trainer needs: train/val/holdout rows loaded once onto the device (`load_data`,
`Data`), feature noise, the split rules and batches.

Files are read only through dfclip.store (store.open / Store.load, in `load_data`, or store.fuse's view
of several stores, which offers the same interface); everything else is tensor and table logic. `meta`
is a polars DataFrame with one row per embedding row, in the embedding array's order: path, label
(Int8: 1 fake, 0 real, -1 unknown), source, split and group (Utf8; "" = none).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from dfclip import store
from dfclip.errors import UserError

Generators = torch.Generator | Sequence[torch.Generator] | None


# --- feature augmentation --------------------------------------------------------------


def feature_noise(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Originals followed by noisy copies along the batch dim: [..., B, D] -> [..., 2B, D].

    The reference's augmentation: x_aug = x + lam * sigma * eps with lam, sigma ~ U(0, 1) drawn
    per sample and eps ~ N(0, I). x is [B, D] or [K, B, D]. generator: one for the whole draw,
    or (for [K, B, D]) a list of K so model k's noise does not depend on K; generators must
    live on x's device. Computed and returned in float32 (or x's dtype if wider).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)

    def draw(shape: torch.Size, g: torch.Generator | None) -> torch.Tensor:
        scale_shape = (*shape[:-1], 1)  # one lam and one sigma per sample
        sigma = torch.rand(scale_shape, generator=g, device=x.device, dtype=dtype)
        lam = torch.rand(scale_shape, generator=g, device=x.device, dtype=dtype)
        return lam * sigma * torch.randn(shape, generator=g, device=x.device, dtype=dtype)

    if generator is None or isinstance(generator, torch.Generator):
        noise = draw(x.shape, generator)
    else:
        if x.dim() != 3 or len(generator) != x.shape[0]:
            raise ValueError(f"a list of generators needs x [K, B, D] with K={len(generator)}, got {tuple(x.shape)}")
        noise = torch.stack([draw(x.shape[1:], g) for g in generator])
    return torch.cat([x, x + noise], dim=-2)


def augment_with_noise(
    x: torch.Tensor, y: torch.Tensor, generator: Generators = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """feature_noise(x) with labels duplicated to match: x [..., B, D], y [..., B] -> [..., 2B, D], [..., 2B]."""
    return feature_noise(x, generator), torch.cat([y, y], dim=-1)


# --- train / val / holdout rows ---------------------------------------------------------

TRAIN_SPLITS = ("train", "")  # split values that may be trained on
VAL_SPLIT = "val"


def split_rows(
    meta: pl.DataFrame,
    *,
    val_frac: float = 0.2,
    seed: int = 0,
    holdout_sources: Sequence[str] = (),
    has_val_store: bool = False,
) -> dict[str, np.ndarray]:
    """Row indices (sorted int64) for "train", "val" and "holdout".

    Only labelled rows (0 or 1; -1 and null are unknown and never supervised) enter any set.
    "holdout": every labelled row of `holdout_sources` (the unseen-generator test); these
    rows never enter train or val. Rows whose split is not "train", "val" or "" (e.g.
    "test") are reserved and never trained on. Of the rest, first rule that applies:
      1. has_val_store: all of them are train (validation comes from the other store);
      2. the split column has "val" rows: split decides ("val" -> val, "train"/"" -> train);
      3. a seeded split stratified by label, val_frac of each class to val, moving whole
         groups (the `group` column, e.g. a video) so no group is in both; rows with group
         "" are their own group.
    """
    if not 0.0 < val_frac < 1.0:
        raise UserError(f"val_frac must be between 0 and 1 (exclusive), got {val_frac}; try 0.2")
    n = meta.height
    labels = meta["label"].fill_null(-1).cast(pl.Int64).to_numpy()
    odd = sorted(set(np.unique(labels).tolist()) - {-1, 0, 1})
    if odd:
        raise UserError(f"labels must be 1 (fake), 0 (real) or -1 (unknown), found {odd}; fix the store's labels")
    labelled = labels >= 0
    if n == 0:
        raise UserError("the store has no rows; embed images into it with `dfembed extract` first")
    if not labelled.any():
        raise UserError("the store has no labelled rows (every label is -1); label rows 1 (fake) or 0 (real) to train")

    sources = meta["source"].cast(pl.Utf8).fill_null("")
    known = sorted(sources.unique().to_list())
    unknown = sorted(set(holdout_sources) - set(known))
    if unknown:
        raise UserError(f"unknown holdout source(s) {', '.join(unknown)}; known sources: {', '.join(known)}")
    in_holdout = sources.is_in(list(holdout_sources)).to_numpy()
    split = _str_column(meta, "split")
    is_val = (split == VAL_SPLIT).to_numpy()

    usable = labelled & ~in_holdout & split.is_in([*TRAIN_SPLITS, VAL_SPLIT]).to_numpy()
    if has_val_store:
        train, val = usable, np.zeros(n, dtype=bool)
    elif (usable & is_val).any():
        train, val = usable & ~is_val, usable & is_val
    else:
        val = _grouped_stratified_val(labels, _str_column(meta, "group"), usable, val_frac, seed)
        train = usable & ~val

    for cls, name in ((1, "fake"), (0, "real")):
        if not (train & (labels == cls)).any():
            hint = ", or hold out fewer sources" if len(holdout_sources) else ""
            raise UserError(
                f"the training set has no {name} (label {cls}) rows; it needs both classes: "
                f"add labelled {name} images to the store{hint}"
            )
    if not has_val_store and not val.any():
        raise UserError(
            f"the validation split is empty ({int(usable.sum())} labelled rows, val_frac={val_frac}); "
            "raise val_frac, mark rows split='val', or give a validation store"
        )
    return {
        "train": np.flatnonzero(train),
        "val": np.flatnonzero(val),
        "holdout": np.flatnonzero(labelled & in_holdout),
    }


def _str_column(meta: pl.DataFrame, name: str) -> pl.Series:
    """A Utf8 column with nulls as ""; all "" if the column is missing."""
    if name not in meta.columns:
        return pl.Series(name, [""] * meta.height, dtype=pl.Utf8)
    return meta[name].cast(pl.Utf8).fill_null("")


def _grouped_stratified_val(
    labels: np.ndarray, groups: pl.Series, usable: np.ndarray, val_frac: float, seed: int
) -> np.ndarray:
    """Boolean val mask over all rows: per class, shuffled whole groups until closest to val_frac."""
    val = np.zeros(len(labels), dtype=bool)
    rows = np.flatnonzero(usable)
    if len(rows) == 0:
        return val
    # Dense group codes; rows without a group get a fresh code each.
    groups = groups.gather(rows)
    codes = groups.rank("dense").cast(pl.Int64).to_numpy().copy()
    alone = (groups == "").to_numpy()
    codes[alone] = codes.max() + 1 + np.arange(alone.sum())
    _, group_of_row = np.unique(codes, return_inverse=True)
    size = np.bincount(group_of_row)
    fakes = np.bincount(group_of_row, weights=labels[rows])
    group_label = (2 * fakes > size).astype(np.int64)  # majority label; ties count as real

    rng = np.random.default_rng(seed)
    val_groups = []
    for cls in (0, 1):
        members = rng.permutation(np.flatnonzero(group_label == cls))
        if len(members) < 2:
            continue  # a lone group stays in train
        target = round(val_frac * size[members].sum())
        taken = np.concatenate([[0], np.cumsum(size[members])[:-1]])  # rows in val after j groups, j < m
        val_groups.append(members[: int(np.argmin(np.abs(taken - target)))])
    val[rows[np.isin(group_of_row, np.concatenate([*val_groups, np.empty(0, np.int64)]))]] = True
    return val


# --- batches ----------------------------------------------------------------------------


def epoch_batches(
    labels: torch.Tensor,
    k: int,
    batch_size: int,
    generators: Sequence[torch.Generator],
    *,
    balanced_fake_rate: float | None = None,
    drop_last: bool = True,
) -> list[torch.Tensor]:
    """One epoch of batches for K models: a list over steps of [K, B] positions into `labels`.

    labels: [n] 0/1 labels of the training rows, on the device the indices should live on.
    Model k's batches come only from generators[k] (on labels' device), so they equal a K=1
    call with the same generator state. Without balancing each model sees its own random
    permutation of all n rows (the last, short batch kept unless drop_last). With
    balanced_fake_rate=r every batch holds exactly round(r*B) fakes (half rounds up), fakes
    first, drawn from per-model reshuffles of the fake and real pools (a pool is reshuffled
    each time it runs out); an epoch is then n // B steps (ceil without drop_last), the same
    compute as an unbalanced epoch.
    """
    if len(generators) != k:
        raise ValueError(f"need one generator per model: k={k} but {len(generators)} generators")
    n, device = labels.numel(), labels.device
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    steps = n // batch_size if drop_last else math.ceil(n / batch_size)
    if steps == 0:
        raise UserError(f"the training set has {n} rows, fewer than the batch size {batch_size}; lower the batch size")

    if balanced_fake_rate is None:
        perms = torch.stack([torch.randperm(n, generator=g, device=device) for g in generators])
        if drop_last:
            perms = perms[:, : steps * batch_size]
        return list(perms.split(batch_size, dim=1))

    n_fake = math.floor(balanced_fake_rate * batch_size + 0.5)
    if not 1 <= n_fake <= batch_size - 1:
        raise UserError(
            f"balanced fake rate {balanced_fake_rate} gives {n_fake} fakes per batch of {batch_size}; "
            "choose a rate that leaves at least one fake and one real per batch"
        )
    fake_pool = torch.nonzero(labels == 1).flatten()
    real_pool = torch.nonzero(labels == 0).flatten()
    if len(fake_pool) == 0 or len(real_pool) == 0:
        raise UserError("balanced batches need both fake (1) and real (0) training rows; add the missing class")
    per_model = []
    for g in generators:
        fakes = _draw_cycling(fake_pool, steps * n_fake, g).view(steps, n_fake)
        reals = _draw_cycling(real_pool, steps * (batch_size - n_fake), g).view(steps, -1)
        per_model.append(torch.cat([fakes, reals], dim=1))
    return list(torch.stack(per_model, dim=1).unbind(0))


def _draw_cycling(pool: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """`count` entries of pool: consecutive fresh random permutations of it, truncated."""
    m = len(pool)
    cycles = math.ceil(count / m)
    if cycles <= 16:
        order = torch.cat([torch.randperm(m, generator=g, device=pool.device) for _ in range(cycles)])
    else:
        # A small pool reused many times: one call instead of `cycles` small ones; the argsort
        # of uniform keys along each row is a random permutation of that row.
        keys = torch.rand(cycles, m, generator=g, device=pool.device, dtype=torch.float64)
        order = keys.argsort(dim=1).flatten()
    return pool[order[:count]]


# --- the data of a fit or sweep, loaded once --------------------------------------------------


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
    notes: list[str] = field(default_factory=list)  # warning lines for the log (dropped rows, overlaps)
    feature: str = "proj"  # the stored feature x holds (store.format.feature_parts)
    train_paths: pl.Series | None = None  # the path of every training row (recorded in the run: eval leaves them out)


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x)
    # CPUs multiply float16 slowly: keep float32 there; GPUs keep the store's float16 (half the memory).
    return t.float() if device.type == "cpu" else t.to(device, non_blocking=True)


def finite_rows(x: np.ndarray, rows: pl.DataFrame) -> tuple[np.ndarray, pl.DataFrame, int]:
    """(x, rows) without the rows whose embedding holds NaN or inf, and how many were dropped.

    Stores written by dfembed never hold such rows; other tools' shards may, and one NaN row
    would turn every loss and score it touches into NaN.
    """
    keep = np.isfinite(x).all(axis=1) if x.size else np.ones(len(x), dtype=bool)
    if keep.all():
        return x, rows, 0
    return x[keep], rows.filter(pl.Series(keep)), int((~keep).sum())


def non_finite_note(dropped: dict[str, int]) -> str | None:
    """The one warning line for rows dropped by finite_rows, {store: count}; None when none were."""
    dropped = {k: v for k, v in dropped.items() if v}
    if not dropped:
        return None
    where = ", ".join(f"{n} in {k}" for k, v in dropped.items() for n in [v])
    return (f"warning: dropped {sum(dropped.values())} rows whose embeddings hold NaN or inf ({where}); "
            "re-extract them to use them")


def _check_val_store(tr: store.Store, va: store.Store, notes: list[str]) -> None:
    """Refuse the train store itself as --val-store; warn when the two share image paths."""
    if va.root.resolve() == tr.root.resolve():
        raise UserError(f"--val-store {va.root} is the training store itself, so validation would score rows the "
                        "heads trained on; give a store of other images, or leave --val-store out to split the store")
    shared = tr.meta.select("path").join(va.meta.select("path"), on="path", how="semi").height
    if shared:
        notes.append(f"warning: {shared} of the {len(va)} --val-store rows have paths that are also in the training "
                     f"store {tr.root}; if they are the same images, validation scores training rows")


def missing_inputs_note(s: store.Store, rows: pl.DataFrame | None = None) -> str | None:
    """One line on the rows of `s` (or only those of `rows`) whose image file is gone from the store's
    input folder; None when every file is there, or for imported stores (no input folder).

    A file moved from real/ to fake/ and extracted again is stored twice, with both labels, until
    `--prune-missing`: the old row is used with its old label. Such rows are kept (a store is
    often read where its images are not), but never silently: this line gives their count. When
    the input folder itself is not on this machine, nothing can be checked, and the note says so.
    """
    root = s.provenance.get("input_root")
    if not root:
        return None
    if not os.path.isdir(root):
        return (f"note: the input folder {root} of store {s.root} is not on this machine, so rows whose image was "
                "moved or deleted since it was embedded cannot be detected")
    rows = s.meta if rows is None else rows
    gone = rows.join(s.missing_inputs().select("path"), on="path", how="semi")
    if gone.height == 0:
        return None
    return (f"warning: {gone.height} of the {rows.height} rows of store {s.root} have no image file in {root} any "
            f"more (moved or deleted since they were embedded, e.g. {gone['path'][0]}); they are used with their "
            "stored labels: `dfembed extract ... --prune-missing` drops them")


def load_data(train_store, cfg, *, val_store=None, device: torch.device) -> Data:
    """Load train/val/holdout rows of cfg.feature once, on `device`, as cfg (a RunConfig) splits them (see
    split_rows). Stores may be paths or open store.Store objects (whose metadata is then read only once).

    Rows whose embeddings are not finite are dropped, with one warning line in Data.notes; rows whose
    image file is gone from the input folder are counted there too (missing_inputs_note).
    """
    tr = train_store if store.is_view(train_store) else store.open(train_store)
    va, notes = None, []
    if val_store is not None:
        va = val_store if store.is_view(val_store) else store.open(val_store)
        if isinstance(tr, store.FusedStore) or isinstance(va, store.FusedStore):
            raise UserError("--val-store does not combine with --with (fused stores); mark validation rows "
                            "split='val' in the stores, or let --val-frac split them")
        store.format.require_compatible(va.provenance, tr.provenance, what=f"--val-store {va.root}",
                                        fix="extract the train and validation stores with the same model")
        _check_val_store(tr, va, notes)
    meta = tr.meta  # a fused view joins its stores here, and sets its join_note
    notes += [n for n in (tr.join_note, missing_inputs_note(tr), missing_inputs_note(va) if va is not None else None)
              if n]
    _check_layermix_widths(tr, cfg)
    parts = split_rows(meta, val_frac=cfg.val_frac, seed=cfg.split_seed, holdout_sources=cfg.holdout_sources,
                       has_val_store=va is not None)

    dropped = {str(tr.root): 0} | ({str(va.root): 0} if va is not None else {})

    def subset(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, pl.DataFrame]:
        # Each part is read straight from the shards (idx is sorted, so meta[idx] is in storage
        # order, as load returns it): no full copy of the store sits in memory beside the parts.
        x, rows = tr.load(meta[idx], feature=cfg.feature)
        x, rows, n = finite_rows(x, rows)
        dropped[str(tr.root)] += n
        return _to_device(x, device), _labels(rows, device), rows

    x, y, train_rows = subset(parts["train"])
    if va is not None:
        # Held-out sources are unseen: they leave the validation store too, not only the train store.
        vmeta = va.select(label=[0, 1], where=~pl.col("source").is_in(list(cfg.holdout_sources)))
        vx, vmeta, dropped[str(va.root)] = finite_rows(*va.load(vmeta, feature=cfg.feature))
        val = EvalSet("val", _to_device(vx, device), _labels(vmeta, device), vmeta)
    else:
        val = EvalSet("val", *subset(parts["val"]))
    if (note := non_finite_note(dropped)) is not None:
        notes.append(note)
    if y.numel() == 0:
        raise UserError(f"store {tr.root} has no finite training rows left; re-extract it")
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
              "store": str(tr.root), "val_store": str(va.root) if va is not None else None,
              "store_root": str(tr.root.resolve())}  # eval matches its stores against this
    return Data(x, y, val, holdout, tr.provenance, tr.feature_dim(cfg.feature), counts, notes, cfg.feature,
                train_rows["path"])


def _check_layermix_widths(s, cfg) -> None:
    """The layermix head mixes its feature's parts by a weighted sum, so they need one width: one line if not
    (say proj of two backbones of different widths)."""
    if cfg.head != "layermix":
        return
    widths = s.part_widths(cfg.feature)
    if len(set(widths)) > 1:
        raise UserError(f"--head layermix sums the parts of --feature {cfg.feature}, but their widths differ "
                        f"({', '.join(map(str, widths))}); mix parts of one width, or use --head mlp on the concatenation")


def _labels(rows: pl.DataFrame, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(rows["label"].to_numpy().astype(np.int64)).to(device)


def describe_data(data: Data, cfg) -> str:
    """One line on what is trained and tested, imbalance included, so no report hides it."""
    def part(name: str, y: torch.Tensor) -> str:
        fake = int(y.sum())
        real = y.numel() - fake
        ratio = f"{fake / real:.1f}:1" if real else "no reals"
        return f"{name} {y.numel()} ({fake} fake : {real} real = {ratio})"

    text = f"data on {data.x.device}: {part('train', data.y)}, {part('val', data.val.y)}"
    if data.holdout is not None:
        text += f", unseen {', '.join(cfg.holdout_sources)}: {part('holdout', data.holdout.y)}"
    return text + f"; feature {data.feature} ({data.dim}-d)"
