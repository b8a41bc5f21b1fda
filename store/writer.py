"""Writing a store: ShardWriter (atomic, immutable shards) and the per-rank writer lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
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


class ReadOnlyStore(UserError):
    """The store folder cannot be written (permissions, read-only file system)."""


class ShardWriter:
    """Buffers rows and writes them as immutable HDF5 shards of at most `shard_size` rows.

    Each shard is written to a hidden temporary file and moved into place with os.replace,
    so a reader (or a resumed run) never sees a half-written shard. A killed writer loses at
    most its unflushed buffer, which a resumed run recomputes; it never duplicates a row.
    Leaving the context (normally or by an exception) flushes the completed rows.

    The writer trusts no caller: it takes the writer lock of its rank for its whole life
    (UserError if another writer holds it), refuses a store holding another model's
    embeddings or rows of another input root (provenance "input_root"), and turns rows whose
    embedding is NaN or inf once stored in `dtype` into failures (error "non_finite").
    import_id / import_shards mark the shards of one all-or-nothing import: readers ignore
    them until all import_shards shards of that id exist (docs/store-format.md).
    expected_rows (optional) is how many rows the caller means to add, for the disk-full message.
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
        import_id: str | None = None,
        import_shards: int | None = None,
        expected_rows: int | None = None,
    ) -> None:
        fmt.check_layout(dtype, shard_size)
        self.root = Path(root)
        self.provenance = {**provenance, "dim": int(dim), "dtype": dtype}
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(writer_lock(self.root, int(rank)))
        try:
            from dfclip.store.reader import _all_shards  # the reader knows which shards count

            committed, unfinished = _all_shards(self.root)  # one read of every shard header, for both uses
            self._check_store(committed)
            self._start(dim, dtype, shard_size, rank, import_id, import_shards, expected_rows, unfinished)
        except BaseException:
            self._lock.close()
            raise

    def _start(self, dim, dtype, shard_size, rank, import_id, import_shards, expected_rows, unfinished) -> None:
        self.import_id, self.import_shards, self.expected_rows = import_id, import_shards, expected_rows
        self._broken = False  # a failed flush (disk full): close() must not try again
        self.non_finite = 0  # rows logged as failures for NaN/inf embeddings
        self.non_finite_overflow = 0  # of which finite as given, infinite only in the stored dtype
        self.dim, self.dtype, self.shard_size, self.rank = int(dim), np.dtype(dtype), int(shard_size), int(rank)
        self._emb = np.empty((self.shard_size, self.dim), dtype=self.dtype)
        # Block layers (provenance "layers", "layer_width"): features/block{i}, buffered as [rows, blocks, width].
        self.layers = [int(b) for b in self.provenance.get("layers") or []]
        self.layer_width = int(self.provenance["layer_width"]) if self.layers else 0
        self._blocks = np.empty((self.shard_size if self.layers else 0, len(self.layers), self.layer_width),
                                dtype=self.dtype)
        self._n = 0
        self._meta: dict[str, list] = {c: [] for c in fmt.ROW_COLUMNS + fmt.FACE_COLUMNS}
        self._fail: dict[str, list] = {c: [] for c in fmt.FAILURE_SCHEMA}
        self._done: dict[str, list] = {c: [] for c in fmt.INPUT_DONE_SCHEMA}
        self._detections: dict[str, list] = {c: [] for c in fmt.DETECTION_SCHEMA}
        self._remove_stale_temps([u.path for u in unfinished])
        self._seq = 1 + max((int(m.group(2)) for p in self.root.iterdir()
                             if (m := fmt.SHARD_RE.match(p.name)) and int(m.group(1)) == self.rank), default=-1)
        self.written: list[Path] = []
        self.rows_written = 0
        self.failures_written = 0

    def _check_store(self, shards: list) -> None:
        """Refuse rows that may not join this store (its committed `shards`): another model, or another input root."""
        fmt.require_compatible(shards[0].provenance if shards else None, self.provenance,
                               what=f"store {self.root}", fix="use another --out for this model", exact=True)
        fmt.require_same_input_root([s.provenance for s in shards], self.provenance, self.root)

    def _remove_stale_temps(self, unfinished_imports: list[Path]) -> None:
        # Temps of this rank can only come from a dead writer: the lock excludes live ones. So can
        # a metadata cache whose shard never made it into place, and the shards of an import that
        # was killed before it wrote its last one (readers ignore them).
        for p in self.root.glob(f".shard-r{self.rank:03d}-*.tmp*"):
            p.unlink(missing_ok=True)
        for p in unfinished_imports:
            if (m := fmt.SHARD_RE.match(p.name)) and int(m.group(1)) == self.rank:
                _remove_shard(p)
        for p in self.root.glob(f"shard-r{self.rank:03d}-*.h5.meta-*.parquet"):
            if not (self.root / p.name.split(".meta-")[0]).exists():
                p.unlink(missing_ok=True)

    def _write_meta_cache(self, name: str, created_ns: int, n: int) -> None:
        cache = self.root / fmt.meta_cache_name(name, created_ns)
        tmp = self.root / f".{cache.name}.tmp{os.getpid()}"
        columns = {c: pl.Series(c, self._meta[c], dtype=dt) for c, dt in {**fmt.ROW_SCHEMA, **fmt.FACE_SCHEMA}.items()}
        pl.DataFrame(columns, height=n).write_parquet(tmp)
        os.replace(tmp, cache)

    def add(self, embeddings: np.ndarray, rows: dict[str, list | np.ndarray], blocks: np.ndarray | None = None
            ) -> np.ndarray:
        """Append rows. `rows` has every column of fmt.ROW_SCHEMA, one entry per row, and may have those
        of fmt.FACE_SCHEMA (frame and face of a row; fmt.FACE_DEFAULTS where absent); `blocks`, for a
        store with layers, the class tokens [n, len(layers), layer_width] in the order of `layers`.

        Rows whose embedding (or a block) is not finite in the stored dtype are recorded as failures
        instead (error fmt.NON_FINITE). Returns the boolean mask of those rows.
        """
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (n, {self.dim}), got {embeddings.shape}")
        want = (len(embeddings), len(self.layers), self.layer_width)
        if self.layers and (blocks is None or np.shape(blocks) != want):
            raise ValueError(f"blocks must be {want} for layers {self.layers}, got {np.shape(blocks)}")
        # Check before buffering anything: a half-added batch would misalign the columns of the shard
        # that __exit__ then flushes.
        rows = {**{c: [fmt.FACE_DEFAULTS[c]] * len(embeddings) for c in fmt.FACE_COLUMNS}, **rows}
        bad = [c for c in self._meta if c not in rows or len(rows[c]) != len(embeddings)]
        if bad:
            raise ValueError(f"rows must have {len(embeddings)} entries in each of {list(self._meta)}; check {bad}")
        # Converted to the stored dtype once: the finiteness check and the buffer both use it.
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is exactly what is checked
            stored = embeddings.astype(self.dtype, copy=False)
            non_finite = ~np.isfinite(stored).all(axis=1)
            stored_blocks = np.asarray(blocks).astype(self.dtype, copy=False) if self.layers else None
            if self.layers:
                non_finite |= ~np.isfinite(stored_blocks).all(axis=(1, 2))
        if non_finite.any():
            keep = np.flatnonzero(~non_finite)
            rows = self._divert_non_finite(embeddings, rows, non_finite, keep)
            stored = stored[keep]
            stored_blocks = stored_blocks[keep] if self.layers else None
        self._buffer(stored, rows, stored_blocks)
        return non_finite

    def _divert_non_finite(self, embeddings: np.ndarray, rows: dict, non_finite: np.ndarray, keep: np.ndarray) -> dict:
        """Log rows with NaN/inf embeddings as failures; return the metadata of the rows `keep`."""
        source_finite = np.isfinite(embeddings[non_finite]).all(axis=1)
        for i, overflow in zip(np.flatnonzero(non_finite), source_finite):
            message = (f"embedding overflows {self.dtype} (a value beyond +-65504); --dtype float32 stores it"
                       if overflow else "embedding has NaN or inf values")
            self.add_failure(str(rows["path"][i]), int(rows["size"][i]), int(rows["mtime_ns"][i]), fmt.NON_FINITE,
                             message)
        self.non_finite += int(non_finite.sum())
        self.non_finite_overflow += int(source_finite.sum())
        return {c: [rows[c][i] for i in keep] if isinstance(rows[c], list) else np.asarray(rows[c])[keep]
                for c in self._meta}

    def _buffer(self, embeddings: np.ndarray, rows: dict[str, list | np.ndarray], blocks: np.ndarray | None) -> None:
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

    def add_done(self, path: str, size: int, mtime_ns: int, n_frames: int, n_rows: int) -> None:
        """Record that every row and failure of input file `path` has been added (a video, or an image with
        a face stage: inputs that give a variable number of rows). Written with the next shard, so it
        never lands before those rows do; a resumed extract skips the file (fmt.INPUTS_GROUP)."""
        for c, v in zip(self._done, (path, size, mtime_ns, n_frames, n_rows)):
            self._done[c].append(v)

    def add_detections(self, records: dict[str, list]) -> None:
        """Buffer face detector output, columns of fmt.DETECTION_SCHEMA (written with the next shard)."""
        for c in self._detections:
            self._detections[c].extend(records[c])

    def flush(self) -> Path | None:
        """Write buffered rows and failures as one shard; returns its path (None if nothing buffered)."""
        n, nf = self._n, len(self._fail["path"])
        if n == 0 and nf == 0 and not self._done["path"] and not self._detections["path"]:
            return None
        name = fmt.shard_name(self.rank, self._seq)
        tmp = self.root / f".{name}.tmp{os.getpid()}"
        created_ns = time.time_ns()
        try:
            self._write_shard(tmp, created_ns, n, nf)
            self._write_meta_cache(name, created_ns, n)  # before the shard: a live shard never lacks it
            os.replace(tmp, self.root / name)
        except BaseException as e:
            # Nothing of a shard that did not land may stay: not its temp, not its cache.
            self._broken = True
            tmp.unlink(missing_ok=True)
            for p in self.root.glob(f".{name}.meta-*.tmp*"):
                p.unlink(missing_ok=True)
            (self.root / fmt.meta_cache_name(name, created_ns)).unlink(missing_ok=True)
            if isinstance(e, Exception) and _is_disk_full(e):
                raise UserError(self._disk_full_message(n)) from None
            raise
        _fsync_dir(self.root)
        self.written.append(self.root / name)
        self.rows_written += n
        self.failures_written += nf
        self._seq += 1
        self._n = 0
        for d in (self._meta, self._fail, self._done, self._detections):
            for c in d:
                d[c].clear()
        return self.root / name

    def _disk_full_message(self, n: int) -> str:
        row_bytes = self.dim * self.dtype.itemsize + 200  # the embedding plus its metadata, roughly
        left = max(n, (self.expected_rows or 0) - self.rows_written)
        free = shutil.disk_usage(self.root).free
        return (f"no space left on the device of store {self.root}: this shard needs about {_size(n * row_bytes)} and "
                f"the {left} rows still to write about {_size(left * row_bytes)} ({_size(free)} free); "
                "free some space and re-run the same command to resume (completed shards are kept)")

    def _write_shard(self, tmp: Path, created_ns: int, n: int, nf: int) -> None:
        """Build the shard in memory, then write its bytes to `tmp` and fsync.

        HDF5 never writes to the disk itself: when its own writes fail (a full disk), its close and
        flush fail again with other errors ("Can't destroy cache") and the process can end in a
        segmentation fault at exit. A plain write fails once, with errno ENOSPC. The shard's file
        image is held in memory while it is written (about one shard, besides the row buffer).
        """
        image = io.BytesIO()
        self._build_shard(image, created_ns, n, nf)
        data = image.getbuffer()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            data.release()

    def _build_shard(self, image: io.BytesIO, created_ns: int, n: int, nf: int) -> None:
        with h5py.File(image, "w") as f:
            f.attrs["format"] = fmt.FORMAT_VERSION
            f.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True, default=str)
            f.attrs["created_ns"] = created_ns
            f.attrs["rank"] = self.rank
            f.attrs["all_finite"] = True  # add() diverted non-finite rows to failures
            if self.import_id is not None:
                f.attrs["import_id"] = self.import_id
                f.attrs["import_shards"] = int(self.import_shards)
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
            for c, dt in fmt.FACE_SCHEMA.items():
                f.create_dataset(c, data=_column_array(self._meta[c], dt, n))
            self._write_records(f, fmt.INPUTS_GROUP, self._done, fmt.INPUT_DONE_SCHEMA)
            self._write_records(f, fmt.DETECTIONS_GROUP, self._detections, fmt.DETECTION_SCHEMA)
            g = f.create_group(fmt.FAILURES_GROUP)
            for c in fmt.FAILURE_STRING_COLUMNS:
                g.create_dataset(c, data=np.array(self._fail[c], dtype=object), dtype=_STR, shape=(nf,))
            for c in fmt.FILE_COLUMNS:
                g.create_dataset(c, data=np.array(self._fail[c], dtype=np.int64), shape=(nf,))

    @staticmethod
    def _write_records(f: h5py.File, name: str, records: dict[str, list], schema: dict) -> None:
        """A group of column datasets (strings as UTF-8, fixed-size arrays as 2-D); none when empty."""
        n = len(records["path"])
        if n == 0:
            return
        g = f.create_group(name)
        for c, dt in schema.items():
            if dt == pl.Utf8:
                g.create_dataset(c, data=np.array(records[c], dtype=object), dtype=_STR, shape=(n,))
            else:
                g.create_dataset(c, data=_column_array(records[c], dt, n))

    def remove_written(self) -> None:
        """Delete every shard (and its metadata cache) this writer committed, e.g. to undo an import."""
        for shard in self.written:
            _remove_shard(shard)
        self.written.clear()

    def abort(self) -> None:
        """Drop the buffer, delete every shard this writer committed and release the lock (undo an import)."""
        self._broken = True
        self.remove_written()
        self.close()

    def close(self) -> None:
        """Flush the buffer and release the lock (once; later calls do nothing)."""
        try:
            if not self._broken and self._lock is not None:
                self.flush()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _column_array(values: list, dtype: pl.DataType, n: int) -> np.ndarray:
    """A numeric column as numpy in its schema dtype; an Array(width) column as [n, width]."""
    if isinstance(dtype, pl.Array):
        return np.asarray(values, dtype=np.float32).reshape(n, dtype.size)
    return pl.Series(values, dtype=dtype).to_numpy()


def _size(n_bytes: float) -> str:
    for unit in ("KiB", "MiB", "GiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}"


def _remove_shard(shard: Path) -> None:
    shard.unlink(missing_ok=True)
    for cache in shard.parent.glob(f"{shard.name}.meta-*.parquet"):
        cache.unlink(missing_ok=True)


def _is_disk_full(e: BaseException | None) -> bool:
    """h5py and polars report ENOSPC in their own words, not always with errno set, and a later error
    (closing the file) may hide it: the whole chain of the exception is checked."""
    seen = 0
    while e is not None and seen < 10:
        text = str(e)
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "errno = 28" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


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
    path = root / f".lock-r{rank:03d}"
    try:
        if root.exists() and not root.is_dir():
            raise UserError(f"--out {root} is a file; pass a store directory (new or from an earlier run)")
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ReadOnlyStore(f"store {root} is read-only ({e.strerror}: {e.filename}); "
                                "give write permission, or use another --out") from None
        raise
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
