"""Reading a store: `open(dir)` checks the shards agree, then loads rows into one preallocated array."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from store import format as fmt
from store.errors import UserError

META_SCHEMA = {
    "path": pl.Utf8, "label": pl.Int8, "source": pl.Utf8, "split": pl.Utf8, "group": pl.Utf8,
    "size": pl.Int64, "mtime_ns": pl.Int64, "shard": pl.Int32, "row": pl.Int64,
}
FAILURE_SCHEMA = {"path": pl.Utf8, "error": pl.Utf8, "message": pl.Utf8, "size": pl.Int64, "mtime_ns": pl.Int64}


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
                prov = json.loads(f.attrs["provenance"])
                shards.append(Shard(p, int(m.group(1)), int(m.group(2)), int(f.attrs["created_ns"]),
                                    int(f[fmt.EMBEDDINGS].shape[0]), prov))
        except (OSError, KeyError, ValueError) as e:
            raise _unreadable(p, e) from None
    return sorted(shards, key=lambda s: (s.created_ns, s.rank, s.seq))


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
                differ = [k for k in fmt.IDENTITY_KEYS if s.provenance.get(k) != self.provenance.get(k)]
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
                with h5py.File(s.path, "r") as f:
                    cols = {c: _strings(f[c]) for c in fmt.STRING_COLUMNS}
                    cols.update({fmt.LABEL: f[fmt.LABEL][:], **{c: f[c][:] for c in fmt.FILE_COLUMNS}})
                    rows.append(pl.DataFrame({**cols, "shard": np.full(s.n_rows, i, np.int32),
                                              "row": np.arange(s.n_rows, dtype=np.int64)}, schema=META_SCHEMA))
                    g = f[fmt.FAILURES_GROUP]
                    fcols = {c: _strings(g[c]) for c in fmt.FAILURE_STRING_COLUMNS}
                    fcols.update({c: g[c][:] for c in fmt.FILE_COLUMNS})
                    fails.append(pl.DataFrame(fcols, schema=FAILURE_SCHEMA).with_columns(shard=pl.lit(i, pl.Int32)))
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

    def load(self, rows: pl.DataFrame | None = None, *, dtype: str | np.dtype | None = None,
             **filters) -> tuple[np.ndarray, pl.DataFrame]:
        """Embeddings and metadata of `rows` (default: `select(**filters)`), both in storage order.

        Reads straight into one preallocated array with h5py's read_direct, one call per
        contiguous run of rows, so loading a whole store costs about one pass over its bytes.
        """
        rows = self.select(**filters) if rows is None else rows
        rows = rows.sort(["shard", "row"])  # storage order: long contiguous runs, each shard opened once
        dtype = np.dtype(dtype or self.provenance.get("dtype", "float32"))
        out = np.empty((rows.height, self.dim), dtype=dtype)
        if rows.height == 0:  # an empty selection is a valid answer, not an error
            return out, rows
        shard_col, row_col = rows["shard"].to_numpy(), rows["row"].to_numpy()
        # Cut the rows into runs that are contiguous within one shard: each run is one read_direct.
        cuts = np.flatnonzero((np.diff(shard_col) != 0) | (np.diff(row_col) != 1)) + 1
        starts, ends = np.r_[0, cuts], np.r_[cuts, len(row_col)]
        f, open_shard = None, -1
        try:
            for a, b in zip(starts, ends):
                if shard_col[a] != open_shard:
                    if f is not None:
                        f.close()
                    open_shard = shard_col[a]
                    # No chunk cache: each chunk is read once, straight into `out`; the cache only
                    # adds a copy (measured 1.8x slower whole-store loads, bench/store.py).
                    f = h5py.File(self.shards[open_shard].path, "r", rdcc_nbytes=0)
                f[fmt.EMBEDDINGS].read_direct(out, np.s_[row_col[a]:row_col[b - 1] + 1], np.s_[a:b])
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
            "model": p.get("model"), "pretrained": p.get("pretrained"), "feature": p.get("feature"),
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
