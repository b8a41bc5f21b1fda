"""Several stores of the same images read as one: `fuse([A, B])` joins their rows by path.

    from dfclip import store
    s = store.fuse(["st_clip", "st_dino"])       # rows in both stores, labels checked to agree
    X, meta = s.load(feature="proj")             # st_clip's proj, then st_dino's proj, per row
    X, meta = s.load(feature="st_clip:proj+st_dino:block12")

A `FusedStore` offers what heads/ reads of a Store (`meta`, `select`, `load(feature=...)`,
`feature_dim`, `provenance`, `root`, `missing_inputs`), so training, eval and predict need no
special case for it. Rows join on `path`: the relative path of an image, or VIDEO#fNNNNNN (@K) of a
frame (or face), so frames join too when both stores sampled them alike.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl

from dfclip.errors import UserError
from dfclip.store import format as fmt
from dfclip.store.reader import Store

# Columns the stores must agree on for a row: they say what the image is and how it is used.
AGREE_COLUMNS = ("label", "source", "split", "group")


class FusedStore:
    """A read-only view of stores of the same images (one per backbone), joined by path.

    names: how features name each store ("st_dino:block12"); default their folder names. A run
    records the names it trained with, and eval/predict pass them back, whatever the folders are called.
    `join_note`: one line on the rows present in some of the stores only (left out), or None.
    """

    def __init__(self, stores: list[Store], names: list[str] | None = None) -> None:
        if len(stores) < 2:
            raise ValueError("fusing needs two or more stores")
        self.stores = stores
        self.names = list(names) if names is not None else [s.root.resolve().name for s in stores]
        _check_names(self.stores, self.names)
        self.root = stores[0].root
        self.roots = [s.root for s in stores]
        self.provenance = {**stores[0].provenance, fmt.FUSION_KEY: [
            {"name": n, "provenance": s.provenance, "root": str(s.root.resolve())} for n, s in zip(self.names, stores)]}
        self.dim = sum(s.dim for s in stores)
        self._meta: pl.DataFrame | None = None
        self._note: str | None = None

    def __repr__(self) -> str:
        return f"FusedStore({', '.join(str(r) for r in self.roots)})"

    @property
    def meta(self) -> pl.DataFrame:
        """The first store's rows whose path every store holds (its shard and row columns), checked to agree."""
        if self._meta is None:
            self._meta, self._note = _join(self.stores, self.names)
        return self._meta

    @property
    def join_note(self) -> str | None:
        """One line on the rows held by some of the stores only (left out), or None when every store holds every row."""
        _ = self.meta
        return self._note

    def __len__(self) -> int:
        return self.meta.height

    def select(self, *, label=None, source=None, split=None, where: pl.Expr | None = None) -> pl.DataFrame:
        """As Store.select, over the joined rows."""
        m = self.meta
        for col, val in (("label", label), ("source", source), ("split", split)):
            if val is not None:
                m = m.filter(pl.col(col).is_in(val if isinstance(val, (list, tuple, set)) else [val]))
        return m.filter(where) if where is not None else m

    def expand_feature(self, spec: str) -> str:
        """`spec` with every part naming its store: "proj" -> "st_clip:proj+st_dino:proj" (what a run records)."""
        pairs = fmt.fused_feature(spec, self.names)
        for i, part in pairs:
            self.stores[i].feature_dim(part)  # a part the store lacks is one UserError, naming it
        return fmt.fused_spec(pairs, self.names)

    def feature_dim(self, feature: str = fmt.DEFAULT_FEATURE) -> int:
        """Columns of `feature` over the stores (the sum of its parts' widths)."""
        return sum(self.stores[i].feature_dim(p) for i, p in fmt.fused_feature(feature, self.names))

    def part_widths(self, feature: str = fmt.DEFAULT_FEATURE) -> list[int]:
        """The width of each part of `feature`, in order (a layer mix needs them equal)."""
        return [self.stores[i].feature_dim(p) for i, p in fmt.fused_feature(feature, self.names)]

    def load(self, rows: pl.DataFrame | None = None, *, dtype: str | np.dtype | None = None,
             feature: str = fmt.DEFAULT_FEATURE, **filters) -> tuple[np.ndarray, pl.DataFrame]:
        """Features and metadata of `rows` (default: `select(**filters)`), in the first store's storage order.

        Each part of `feature` is read from its store (consecutive parts of one store in one read) and
        placed beside the others row by row, matched on path. Without `dtype` the result has the widest
        of the stores' dtypes."""
        pairs = fmt.fused_feature(feature, self.names)
        width = sum(self.stores[i].feature_dim(part) for i, part in pairs)  # checks every part first
        rows = self.select(**filters) if rows is None else rows
        rows = rows.sort(["shard", "row"])
        if dtype is None:
            dtype = np.result_type(*(np.dtype(self.stores[i].provenance.get("dtype", "float32")) for i, _ in pairs))
        runs: list[tuple[int, list[str]]] = []
        for i, part in pairs:
            if runs and runs[-1][0] == i:
                runs[-1][1].append(part)
            else:
                runs.append((i, [part]))
        out, col = np.empty((rows.height, width), dtype), 0
        for i, parts in runs:  # each store's columns straight into place: one copy of the result in memory
            s = self.stores[i]
            mine = rows if i == 0 else s.meta.join(rows.select("path"), on="path", how="semi")
            x, got = s.load(mine, dtype=dtype, feature="+".join(parts))
            order = (rows.select("path").with_row_index("want")
                     .join(got.select("path").with_row_index("have"), on="path", how="left").sort("want")["have"])
            if order.null_count():  # rows not from this view's meta
                raise ValueError(f"rows not held by store {s.root}, e.g. {rows['path'][order.is_null().arg_max()]}")
            order = order.to_numpy()
            out[:, col:col + x.shape[1]] = x if np.array_equal(order, np.arange(len(order))) else x[order]
            col += x.shape[1]
        return out, rows

    def missing_inputs(self) -> pl.DataFrame:
        """Joined rows whose image file is gone from the first store's input folder (Store.missing_inputs)."""
        return self.stores[0].missing_inputs().join(self.meta.select("path"), on="path", how="semi")


def _check_names(stores: list[Store], names: list[str]) -> None:
    if len(names) != len(stores):
        raise ValueError(f"{len(stores)} stores but {len(names)} names")
    roots = [s.root.resolve() for s in stores]
    twice = [str(r) for i, r in enumerate(roots) if r in roots[:i]]
    if twice:
        raise UserError(f"store {twice[0]} is given twice; --with takes the other backbones' stores of the same images")
    clash = sorted({n for n in names if names.count(n) > 1})
    bad = [n for n in names if not n or ":" in n or "+" in n or "," in n]
    if clash or bad:
        raise UserError(f"fused stores are named by their folders, and {', '.join(clash or bad)} "
                        f"{'is not unique' if clash else 'holds : + or ,'} ({', '.join(map(str, roots))}); "
                        "rename (or link) a store folder so each has its own plain name")


def _join(stores: list[Store], names: list[str]) -> tuple[pl.DataFrame, str | None]:
    """(the first store's rows held by every store, the one line on rows left out or None).

    UserError when the stores disagree on a row's label, source, split or group, naming the first rows."""
    first = stores[0].meta
    keep = first.select("path")
    for s in stores[1:]:
        keep = keep.join(s.meta.select("path"), on="path", how="semi")
    for s, name in zip(stores[1:], names[1:]):
        _check_agree(first, s.meta, keep, names[0], name)
    only = [(name, s.meta.join(keep, on="path", how="anti")["path"].sort()) for name, s in zip(names, stores)]
    note = None
    if any(len(p) for _, p in only):
        where = ", ".join(f"{len(p)} only in {name} (e.g. {p[0]})" for name, p in only if len(p))
        note = (f"note: left out rows not held by every fused store: {where}; extract the same images into each "
                "store to use them")
    roots = {os.path.realpath(r) for r in (s.provenance.get("input_root") for s in stores) if r}
    if len(roots) > 1:  # the same images elsewhere (another machine or mount): relative paths still match
        extra = f"the fused stores were extracted from different folders ({', '.join(sorted(roots))}), joined by relative path"
        note = f"{note}; {extra}" if note else f"note: {extra}"
    if keep.height == 0:
        raise UserError(f"the stores {', '.join(names)} have no image path in common, so nothing can be fused; "
                        f"extract the same images into each (e.g. {first['path'][0] if first.height else 'none'} "
                        f"is only in {names[0]})")
    return first.join(keep, on="path", how="semi"), note


def _check_agree(a: pl.DataFrame, b: pl.DataFrame, keep: pl.DataFrame, name_a: str, name_b: str) -> None:
    """One-line UserError naming the first rows where stores a and b disagree on an AGREE_COLUMNS value."""
    cols = list(AGREE_COLUMNS)
    both = (a.join(keep, on="path", how="semi").select("path", *cols)
            .join(b.select("path", *cols), on="path", how="inner", suffix="_other"))
    for c in cols:
        differ = both.filter(pl.col(c).cast(pl.Utf8).fill_null("") != pl.col(f"{c}_other").cast(pl.Utf8).fill_null(""))
        if differ.height:
            differ = differ.sort("path")
            shown = "; ".join(f"{r['path']}: {r[c]!r} in {name_a}, {r[c + '_other']!r} in {name_b}"
                              for r in differ.head(3).iter_rows(named=True))
            raise UserError(f"the fused stores disagree on the {c} of {differ.height} rows ({shown}"
                            f"{'; ...' if differ.height > 3 else ''}); re-extract them from the same labelled images")


def fuse(roots: list[str | os.PathLike | Store], names: list[str] | None = None) -> FusedStore:
    """Open stores (paths or open Stores) of the same images as one FusedStore (names: see FusedStore)."""
    from dfclip.store.reader import open as open_store

    return FusedStore([r if isinstance(r, Store) else open_store(r) for r in roots], names)


def is_view(x: object) -> bool:
    """Whether x is an open store or fused view (not a path)."""
    return isinstance(x, (Store, FusedStore))


