"""Writing a store: ShardWriter (atomic, immutable shards) and the per-rank writer lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dfclip.store import format as fmt
from dfclip.errors import UserError

_STR = h5py.string_dtype("utf-8")


def _chunk_rows(dim: int, itemsize: int) -> int:
    # ~1 MiB chunks: big enough for fast sequential reads, small enough for subset reads.
    return max(1, (1 << 20) // max(1, dim * itemsize))


class ShardWriter:
    """Buffers rows and writes them as immutable HDF5 shards of at most `shard_size` rows.

    Each shard is written to a hidden temporary file and moved into place with os.replace,
    so a reader (or a resumed run) never sees a half-written shard. A killed writer loses at
    most its unflushed buffer, which a resumed run recomputes; it never duplicates a row.
    Leaving the context (normally or by an exception) flushes the completed rows.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        provenance: dict,
        *,
        dim: int,
        dtype: str = "float16",
        shard_size: int = 16384,
        rank: int = 0,
    ) -> None:
        fmt.check_layout(dtype, shard_size)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.provenance = {**provenance, "dim": int(dim), "dtype": dtype}
        self.dim, self.dtype, self.shard_size, self.rank = int(dim), np.dtype(dtype), int(shard_size), int(rank)
        self._emb = np.empty((self.shard_size, self.dim), dtype=self.dtype)
        # Block layers (provenance "layers", "layer_width"): features/block{i}, buffered as [rows, blocks, width].
        self.layers = [int(b) for b in provenance.get("layers") or []]
        self.layer_width = int(provenance["layer_width"]) if self.layers else 0
        self._blocks = np.empty((self.shard_size if self.layers else 0, len(self.layers), self.layer_width),
                                dtype=self.dtype)
        self._n = 0
        self._meta: dict[str, list] = {c: [] for c in fmt.ROW_COLUMNS}
        self._fail: dict[str, list] = {c: [] for c in fmt.FAILURE_SCHEMA}
        self._remove_stale_temps()
        self._seq = 1 + max((int(m.group(2)) for p in self.root.iterdir()
                             if (m := fmt.SHARD_RE.match(p.name)) and int(m.group(1)) == self.rank), default=-1)
        self.written: list[Path] = []
        self.rows_written = 0
        self.failures_written = 0

    def _remove_stale_temps(self) -> None:
        # Temps of this rank can only come from a dead writer: the lock excludes live ones. So can
        # a metadata cache whose shard never made it into place.
        for p in self.root.glob(f".shard-r{self.rank:03d}-*.tmp*"):
            p.unlink(missing_ok=True)
        for p in self.root.glob(f"shard-r{self.rank:03d}-*.h5.meta-*.parquet"):
            if not (self.root / p.name.split(".meta-")[0]).exists():
                p.unlink(missing_ok=True)

    def _write_meta_cache(self, name: str, created_ns: int, n: int) -> None:
        cache = self.root / fmt.meta_cache_name(name, created_ns)
        tmp = self.root / f".{cache.name}.tmp{os.getpid()}"
        columns = {c: pl.Series(c, self._meta[c], dtype=dt) for c, dt in fmt.ROW_SCHEMA.items()}
        pl.DataFrame(columns, height=n).write_parquet(tmp)
        os.replace(tmp, cache)

    def add(self, embeddings: np.ndarray, rows: dict[str, list | np.ndarray], blocks: np.ndarray | None = None) -> None:
        """Append rows. `rows` has every column of fmt.ROW_SCHEMA, one entry per row; `blocks`, for a
        store with layers, the class tokens [n, len(layers), layer_width] in the order of `layers`."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (n, {self.dim}), got {embeddings.shape}")
        want = (len(embeddings), len(self.layers), self.layer_width)
        if self.layers and (blocks is None or np.shape(blocks) != want):
            raise ValueError(f"blocks must be {want} for layers {self.layers}, got {np.shape(blocks)}")
        # Check before buffering anything: a half-added batch would misalign the columns of the shard
        # that __exit__ then flushes.
        bad = [c for c in self._meta if c not in rows or len(rows[c]) != len(embeddings)]
        if bad:
            raise ValueError(f"rows must have {len(embeddings)} entries in each of {list(self._meta)}; check {bad}")
        n, start = len(embeddings), 0
        while start < n:
            take = min(n - start, self.shard_size - self._n)
            self._emb[self._n:self._n + take] = embeddings[start:start + take]
            if self.layers:
                self._blocks[self._n:self._n + take] = blocks[start:start + take]
            for c in self._meta:
                self._meta[c].extend(list(rows[c][start:start + take]))
            self._n += take
            start += take
            if self._n == self.shard_size:
                self.flush()

    def add_failure(self, path: str, size: int, mtime_ns: int, error: str, message: str) -> None:
        """Record an input that could not be embedded; it is written with the next shard."""
        for c, v in zip(self._fail, (path, error, message, size, mtime_ns)):
            self._fail[c].append(v)

    def flush(self) -> Path | None:
        """Write buffered rows and failures as one shard; returns its path (None if nothing buffered)."""
        n, nf = self._n, len(self._fail["path"])
        if n == 0 and nf == 0:
            return None
        name = fmt.shard_name(self.rank, self._seq)
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        created_ns = time.time_ns()
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = fmt.FORMAT_VERSION
            f.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True, default=str)
            f.attrs["created_ns"] = created_ns
            f.attrs["rank"] = self.rank
            chunks = (min(n, _chunk_rows(self.dim, self.dtype.itemsize)), self.dim) if n else None
            f.create_dataset(fmt.EMBEDDINGS, data=self._emb[:n], chunks=chunks)
            if self.layers:
                width = self.layer_width
                block_chunks = (min(n, _chunk_rows(width, self.dtype.itemsize)), width) if n else None
                group = f.create_group(fmt.FEATURES_GROUP)
                for j, b in enumerate(self.layers):
                    group.create_dataset(f"block{b}", data=self._blocks[:n, j], chunks=block_chunks)
            for c in fmt.STRING_COLUMNS:
                f.create_dataset(c, data=np.array(self._meta[c], dtype=object), dtype=_STR, shape=(n,))
            f.create_dataset(fmt.LABEL, data=np.array(self._meta[fmt.LABEL], dtype=np.int8), shape=(n,))
            for c in fmt.FILE_COLUMNS:
                f.create_dataset(c, data=np.array(self._meta[c], dtype=np.int64), shape=(n,))
            g = f.create_group(fmt.FAILURES_GROUP)
            for c in fmt.FAILURE_STRING_COLUMNS:
                g.create_dataset(c, data=np.array(self._fail[c], dtype=object), dtype=_STR, shape=(nf,))
            for c in fmt.FILE_COLUMNS:
                g.create_dataset(c, data=np.array(self._fail[c], dtype=np.int64), shape=(nf,))
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        self._write_meta_cache(name, created_ns, n)  # before the shard: a live shard never lacks it
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)
        self.written.append(self.root / name)
        self.rows_written += n
        self.failures_written += nf
        self._seq += 1
        self._n = 0
        for d in (self._meta, self._fail):
            for c in d:
                d[c].clear()
        return self.root / name

    def remove_written(self) -> None:
        """Delete every shard (and its metadata cache) this writer committed, e.g. to undo an import."""
        for shard in self.written:
            shard.unlink(missing_ok=True)
            for cache in shard.parent.glob(f"{shard.name}.meta-*.parquet"):
                cache.unlink(missing_ok=True)
        self.written.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Lock descriptors held by this process. A forked child (a DataLoader worker) closes its copies
# at once: an flock lives until every copy of its descriptor is closed, so a worker outliving a
# SIGKILLed writer would otherwise keep the store locked until it noticed its parent was gone.
_held_lock_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_lock_fds:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's copy only: the parent keeps the lock
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike, rank: int = 0):
    """Hold the advisory write lock of `rank` on a store, or raise UserError if another process has it.

    fcntl locks die with their process, so a SIGKILLed run never leaves a stale lock behind.
    torchrun ranks lock different files; two plain runs on one store collide on rank 0.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".lock-r{rank:03d}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(
            f"another dfembed process (pid {holder}) is writing to {root}; wait for it to finish or use a different --out"
        ) from None
    _held_lock_fds.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        _held_lock_fds.discard(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
