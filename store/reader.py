"""Reading a store: `open(dir)` checks the shards agree, then loads rows into one preallocated array."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dfclip.store import format as fmt
from dfclip.errors import UserError

META_SCHEMA = {**fmt.ROW_SCHEMA, "shard": pl.Int32, "row": pl.Int64}  # the rows, and where each lies
# load() cost model: one read call costs about as much as reading READ_CALL_BYTES, so selected rows
# closer than that are fetched by one call (the gap is read and dropped) instead of one call per run
# (~0.1 ms each: a scattered half of 200k rows took 10 s that way). Spans are capped for memory.
READ_CALL_BYTES = 1 << 19
MAX_SPAN_BYTES = 64 << 20


@dataclass(frozen=True)
class Shard:
    path: Path
    rank: int
    seq: int
    created_ns: int
    n_rows: int
    provenance: dict


def list_shards(root: str | os.PathLike) -> list[Shard]:
    """Every committed shard, oldest first (temp files and other names are ignored)."""
    shards = []
    for p in Path(root).glob(fmt.SHARD_GLOB):
        m = fmt.SHARD_RE.match(p.name)
        if not m:
            continue
        try:
            with h5py.File(p, "r") as f:
                if f.attrs["format"] != fmt.FORMAT_VERSION:  # never guess at a layout we don't know
                    raise UserError(f"{p} is in format {f.attrs['format']!r} but this dfclip reads "
                                    f"{fmt.FORMAT_VERSION!r}; upgrade dfclip or move the shard out of the store")
                prov = json.loads(f.attrs["provenance"])
                shards.append(Shard(p, int(m.group(1)), int(m.group(2)), int(f.attrs["created_ns"]),
                                    int(f[fmt.EMBEDDINGS].shape[0]), prov))
        except (OSError, KeyError, ValueError) as e:
            raise _unreadable(p, e) from None
    return sorted(shards, key=lambda s: (s.created_ns, s.rank, s.seq))


def stored_provenance(root: str | os.PathLike) -> dict | None:
    """The provenance of the store at `root` (its oldest shard's), or None while it has no shard."""
    shards = list_shards(root) if Path(root).is_dir() else []
    return shards[0].provenance if shards else None


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not a readable dfclip shard ({e}); move it out of the store and re-run")


def _strings(ds) -> np.ndarray:
    return ds.asstr()[:] if len(ds) else np.array([], dtype=object)


class Store:
    """A read-only view of a store directory. Build it with `store.open(dir)`.

    `meta` has one row per live embedding: if a path was embedded more than once (its file
    changed, or a failure was retried), the newest shard wins, so no path appears twice.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"store {self.root} does not exist; create it with `dfembed extract IMAGES --out {self.root}`")
        self.shards = list_shards(self.root)
        if not self.shards:
            raise UserError(f"store {self.root} has no shards; run `dfembed extract IMAGES --out {self.root}` first")
        self.provenance = self.shards[0].provenance
        ident = fmt.identity(self.provenance)
        for s in self.shards[1:]:
            if fmt.identity(s.provenance) != ident:
                # Name the differing keys: model_config / preprocess differences don't show in the short form.
                differ = [k for k in fmt.IDENTITY_KEYS
                          if fmt.identity({k: s.provenance.get(k)}) != fmt.identity({k: self.provenance.get(k)})]
                raise UserError(
                    f"store {self.root} mixes embeddings: {s.path.name} has {fmt.describe_identity(s.provenance)} but "
                    f"{self.shards[0].path.name} has {fmt.describe_identity(self.provenance)} "
                    f"(differs in {', '.join(differ)}); keep one model per store"
                )
        self.dim = int(self.provenance["dim"])
        self._meta: pl.DataFrame | None = None
        self._failures: pl.DataFrame | None = None

    def _scan(self) -> None:
        rows, fails = [], []
        for i, s in enumerate(self.shards):
            try:  # a file named like a shard but missing datasets is the user's to move, not a crash
                cache = s.path.with_name(fmt.meta_cache_name(s.path.name, s.created_ns))
                cached = pl.read_parquet(cache) if cache.is_file() else None
                with h5py.File(s.path, "r") as f:
                    if cached is not None and cached.height == s.n_rows:
                        cols = {c: cached[c] for c in fmt.ROW_COLUMNS}
                    else:  # no cache (e.g. a shard written by other tools): the shard itself is the truth
                        cols = {c: _strings(f[c]) for c in fmt.STRING_COLUMNS}
                        cols.update({fmt.LABEL: f[fmt.LABEL][:], **{c: f[c][:] for c in fmt.FILE_COLUMNS}})
                    rows.append(pl.DataFrame({**cols, "shard": np.full(s.n_rows, i, np.int32),
                                              "row": np.arange(s.n_rows, dtype=np.int64)}, schema=META_SCHEMA))
                    g = f[fmt.FAILURES_GROUP]
                    fcols = {c: _strings(g[c]) for c in fmt.FAILURE_STRING_COLUMNS}
                    fcols.update({c: g[c][:] for c in fmt.FILE_COLUMNS})
                    fails.append(pl.DataFrame(fcols, schema=fmt.FAILURE_SCHEMA).with_columns(shard=pl.lit(i, pl.Int32)))
            except (OSError, KeyError, ValueError, pl.exceptions.PolarsError) as e:
                raise _unreadable(s.path, e) from None
        events = pl.concat([
            pl.concat(rows).select("path", "shard").with_columns(ok=pl.lit(True)),
            pl.concat(fails).select("path", "shard").with_columns(ok=pl.lit(False)),
        ])
        # The newest event per path decides: a row (live) or a failure (listed in failures).
        last = events.sort("shard", maintain_order=True).unique("path", keep="last", maintain_order=True)
        live = last.filter(pl.col("ok")).select("path", "shard")
        # A path added twice within one shard keeps its last row.
        self._meta = (pl.concat(rows).join(live, on=["path", "shard"], how="semi")
                      .sort(["shard", "row"]).unique("path", keep="last", maintain_order=True))
        failed = last.filter(~pl.col("ok")).select("path", "shard")
        self._failures = (pl.concat(fails).join(failed, on=["path", "shard"], how="semi")
                          .unique(["path", "shard"], keep="last").sort("path").drop("shard"))

    @property
    def meta(self) -> pl.DataFrame:
        """path, label, source, split, group, size, mtime_ns, shard, row — one row per live embedding."""
        if self._meta is None:
            self._scan()
        return self._meta

    @property
    def failures(self) -> pl.DataFrame:
        """Inputs whose latest attempt failed: path, error, message, size, mtime_ns."""
        if self._failures is None:
            self._scan()
        return self._failures

    def __len__(self) -> int:
        return self.meta.height

    def select(self, *, label: int | list[int] | None = None, source: str | list[str] | None = None,
               split: str | list[str] | None = None, where: pl.Expr | None = None) -> pl.DataFrame:
        """The metadata rows matching every given filter (values may be single or lists)."""
        m = self.meta
        for col, val in (("label", label), ("source", source), ("split", split)):
            if val is not None:
                m = m.filter(pl.col(col).is_in(val if isinstance(val, (list, tuple, set)) else [val]))
        return m.filter(where) if where is not None else m

    @property
    def features(self) -> list[str]:
        """Feature names this store holds, for `load(feature=...)`: "proj" and "block{i}" per stored layer."""
        return fmt.stored_features(self.provenance)

    def feature_dim(self, feature: str = fmt.DEFAULT_FEATURE) -> int:
        """Columns of `feature` ("proj", "block16", "block8+block16": the sum of its parts)."""
        return sum(self._part_dim(p) for p in self._check_feature(feature))

    def _part_dim(self, part: str) -> int:
        return self.dim if part == fmt.DEFAULT_FEATURE else int(self.provenance["layer_width"])

    def _check_feature(self, feature: str) -> list[str]:
        parts = fmt.feature_parts(feature)
        missing = [p for p in parts if p not in self.features]
        if missing:
            raise UserError(f"store {self.root} has no feature {', '.join(missing)} (it holds {', '.join(self.features)}); "
                            f"extract it with `dfembed extract --layers ...` into another store, or pick a stored one")
        return parts

    def load(self, rows: pl.DataFrame | None = None, *, dtype: str | np.dtype | None = None,
             feature: str = fmt.DEFAULT_FEATURE, **filters) -> tuple[np.ndarray, pl.DataFrame]:
        """Features and metadata of `rows` (default: `select(**filters)`), both in storage order.

        feature: "proj" (the `embeddings` dataset), "block16" (`features/block16`, stored with
        `--layers`), or parts joined by "+" ("block8+block16"), concatenated in that order.
        Reads into one preallocated array: contiguous rows straight in with h5py's read_direct,
        scattered rows by reading their span once and gathering, so loading a whole store or a
        filtered part of it costs about one pass over the bytes involved.
        """
        parts = self._check_feature(feature)
        if len(parts) > 1:
            loaded = [self.load(rows, dtype=dtype, feature=p, **filters) for p in parts]
            return np.concatenate([x for x, _ in loaded], axis=1), loaded[0][1]
        dataset, width = fmt.feature_dataset(parts[0]), self._part_dim(parts[0])
        rows = self.select(**filters) if rows is None else rows
        rows = rows.sort(["shard", "row"])  # storage order: long contiguous runs, each shard opened once
        dtype = np.dtype(dtype or self.provenance.get("dtype", "float32"))
        out = np.empty((rows.height, width), dtype=dtype)
        if rows.height == 0:  # an empty selection is a valid answer, not an error
            return out, rows
        shard_col, row_col = rows["shard"].to_numpy(), rows["row"].to_numpy()
        row_bytes = width * np.dtype(self.provenance.get("dtype", "float32")).itemsize
        gap_rows, max_span = max(1, READ_CALL_BYTES // row_bytes), max(1, MAX_SPAN_BYTES // row_bytes)
        # Segments of sorted rows, one read call each: cut at a new shard or at a gap too wide to read through.
        cuts = np.flatnonzero((np.diff(shard_col) != 0) | (np.diff(row_col) > gap_rows)) + 1
        next_row = np.r_[np.diff(row_col) == 1, False]  # row i+1 follows row i in the same shard
        f, open_shard, buf = None, -1, None
        try:
            for a0, b0 in zip(np.r_[0, cuts], np.r_[cuts, len(row_col)]):
                r = row_col[a0:b0]  # split spans longer than max_span so the scratch buffer stays bounded
                inner = a0 + np.searchsorted(r, np.arange(r[0] + max_span, r[-1] + 1, max_span))
                for a, b in zip(np.r_[a0, inner], np.r_[inner, b0]):
                    if a == b:
                        continue
                    if shard_col[a] != open_shard:
                        if f is not None:
                            f.close()
                        open_shard = shard_col[a]
                        # No chunk cache: each chunk is read once, straight into the destination; the
                        # cache only adds a copy (whole-store loads 1.8x slower with it, bench/store.py).
                        f = h5py.File(self.shards[open_shard].path, "r", rdcc_nbytes=0)
                    ds, lo, hi = f[dataset], row_col[a], row_col[b - 1] + 1
                    if next_row[a:b - 1].all():  # one contiguous run: straight into out
                        ds.read_direct(out, np.s_[lo:hi], np.s_[a:b])
                        continue
                    if buf is None or len(buf) < hi - lo:
                        buf = np.empty((hi - lo, width), ds.dtype)
                    ds.read_direct(buf, np.s_[lo:hi], np.s_[0:hi - lo])
                    out[a:b] = buf[row_col[a:b] - lo]
        finally:
            if f is not None:
                f.close()
        return out, rows

    def info(self) -> dict:
        """Summary for `dfembed info`: counts, model, failures and size on disk."""
        m = self.meta
        by = lambda c: {str(k): int(v) for k, v in m.group_by(c).len().sort(c).iter_rows()}
        p = self.provenance
        return {
            "store": str(self.root), "rows": m.height, "dim": self.dim, "dtype": p.get("dtype"),
            "model": p.get("model"), "pretrained": fmt.weights_name(p), "feature": p.get("feature"),
            "layers": p.get("layers") or [], "perturb": p.get("perturb") or "none",
            "shards": len(self.shards), "labels": by("label"), "sources": by("source"), "splits": by("split"),
            "failures": self.failures.height,
            "bytes_on_disk": sum(f.stat().st_size for f in self.root.iterdir() if f.is_file()),
        }

    def write_failures_view(self) -> Path:
        """Rebuild failures.parquet (atomically) from the shards, the source of truth."""
        dest = self.root / fmt.FAILURES_FILE
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        self.failures.write_parquet(tmp)
        os.replace(tmp, dest)
        return dest


def open(root: str | os.PathLike) -> Store:  # noqa: A001 - the natural name: store.open(dir)
    """Open a store directory for reading; refuses stores that mix models, features or dims."""
    return Store(root)
