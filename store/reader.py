"""Reading a store: `open(dir)` checks the shards agree, then loads rows into one preallocated array."""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dfclip.store import format as fmt
from dfclip.errors import UserError

# The rows (with their frame and face columns), and where each lies.
META_SCHEMA = {**fmt.ROW_SCHEMA, **fmt.FACE_SCHEMA, "shard": pl.Int32, "row": pl.Int64}
# load() cost model: one read call costs about as much as reading READ_CALL_BYTES, so selected rows
# closer than that are fetched by one call (the gap is read and dropped) instead of one call per run
# (~0.1 ms each: a scattered half of 200k rows took 10 s that way). Spans are capped for memory.
READ_CALL_BYTES = 1 << 19
MAX_SPAN_BYTES = 64 << 20
# Whole runs of rows of uncompressed shards are read straight from the files with os.preadv, by a
# few threads at once (preadv releases the GIL; h5py holds one global lock, so its reads never
# overlap). Runs are cut into pieces of at most READ_TASK_BYTES to spread them over the threads.
READ_THREADS = min(4, os.cpu_count() or 1)
READ_TASK_BYTES = 16 << 20


@dataclass(frozen=True)
class Shard:
    path: Path
    rank: int
    seq: int
    created_ns: int
    n_rows: int
    provenance: dict
    all_finite: bool = False  # written by a dfclip writer that refuses NaN/inf rows
    import_id: str | None = None  # shards of one all-or-nothing import share it
    import_shards: int = 0  # how many shards that import writes


def _read_shard(p: Path, rank: int, seq: int) -> Shard:
    try:
        with h5py.File(p, "r") as f:
            if f.attrs["format"] != fmt.FORMAT_VERSION:  # never guess at a layout we don't know
                raise UserError(f"{p} is in format {f.attrs['format']!r} but this dfclip reads "
                                f"{fmt.FORMAT_VERSION!r}; upgrade dfclip or move the shard out of the store")
            prov = json.loads(f.attrs["provenance"])
            shape = f[fmt.EMBEDDINGS].shape
            a = f.attrs
            shard = Shard(p, rank, seq, int(a["created_ns"]), int(shape[0]), prov, bool(a.get("all_finite", False)),
                          str(a["import_id"]) if "import_id" in a else None, int(a.get("import_shards", 0)))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _unreadable(p, e) from None
    if len(shape) != 2 or shape[1] != prov.get("dim"):  # a shard from other tools: refuse it before anything reads it
        raise UserError(f"{p} holds embeddings of shape {shape} but its provenance says dim {prov.get('dim')}; "
                        "fix the shard's provenance (or its embeddings), or move it out of the store")
    return shard


def _all_shards(root: str | os.PathLike) -> tuple[list[Shard], list[Shard]]:
    """(committed shards oldest first, shards of imports that never finished)."""
    shards = []
    for p in Path(root).glob(fmt.SHARD_GLOB):
        if m := fmt.SHARD_RE.match(p.name):
            shards.append(_read_shard(p, int(m.group(1)), int(m.group(2))))
    # An import is all or nothing: its shards count once every one of them exists.
    landed: dict[str, int] = {}
    for s in shards:
        if s.import_id is not None:
            landed[s.import_id] = landed.get(s.import_id, 0) + 1
    done = [s for s in shards if s.import_id is None or landed[s.import_id] >= s.import_shards]
    unfinished = [s for s in shards if s.import_id is not None and landed[s.import_id] < s.import_shards]
    return sorted(done, key=lambda s: (s.created_ns, s.rank, s.seq)), unfinished


def list_shards(root: str | os.PathLike) -> list[Shard]:
    """Every committed shard, oldest first (temp files, other names and unfinished imports are ignored)."""
    return _all_shards(root)[0]


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not a readable dfclip shard ({e}); move it out of the store and re-run")


def _strings(ds) -> np.ndarray:
    return ds.asstr()[:] if len(ds) else np.array([], dtype=object)


def _read_cache(cache: Path) -> pl.DataFrame:
    """A shard's metadata cache; a bad one is named as the cache (deleting it is safe), never as the shard."""
    try:
        cached = pl.read_parquet(cache)
        if cached.schema == pl.Schema(fmt.ROW_SCHEMA):  # written before frames and faces were stored
            return cached.with_columns(_face_defaults(cached.height))
        if cached.schema != pl.Schema({**fmt.ROW_SCHEMA, **fmt.FACE_SCHEMA}):
            raise ValueError(f"columns {dict(cached.schema)} are not {dict(fmt.ROW_SCHEMA)}")
        return cached
    except PermissionError:
        raise UserError(f"cannot read metadata cache {cache}: permission denied; fix its permissions or delete it "
                        "(safe: it is only a copy of its shard's metadata)") from None
    except (OSError, ValueError, pl.exceptions.PolarsError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"metadata cache {cache} is damaged ({first}); delete it "
                        "(safe: it is only a copy of its shard's metadata, which the shard still holds)") from None


def _face_defaults(n: int) -> list[pl.Series]:
    """The frame and face columns of n rows that have none (still images, shards without a face stage)."""
    return [pl.Series(c, [fmt.FACE_DEFAULTS[c]] * n, dtype=dt) for c, dt in fmt.FACE_SCHEMA.items()]


def _face_columns(f: h5py.File, n: int) -> dict[str, pl.Series]:
    if fmt.FACE_COLUMNS[0] not in f:
        return {s.name: s for s in _face_defaults(n)}
    return {c: pl.Series(c, f[c][:], dtype=dt) for c, dt in fmt.FACE_SCHEMA.items()}


def _records(f: h5py.File, name: str, schema: dict) -> pl.DataFrame | None:
    """A group of column datasets written by ShardWriter._write_records, or None when the shard has none."""
    if name not in f:
        return None
    g = f[name]
    return pl.DataFrame({c: _strings(g[c]) if dt == pl.Utf8 else pl.Series(c, g[c][:], dtype=dt)
                         for c, dt in schema.items()}, schema=schema)


def _check_labels(rows: list[pl.DataFrame], shards: list[Shard]) -> None:
    """Labels are 1, 0 or -1; a shard written by other tools may hold anything else."""
    for frame, s in zip(rows, shards):
        bad = frame.filter(~pl.col("label").is_in([1, 0, -1]))
        if bad.height:
            values = ", ".join(str(v) for v in bad["label"].unique().sort().head(5).to_list())
            raise UserError(f"{s.path} has {bad.height} rows with label {values} (labels are 1 fake, 0 real, "
                            "-1 unknown); fix the shard's label dataset or move it out of the store")


def _raw_extents(f: h5py.File, ds: h5py.Dataset) -> list[tuple[int, int, int]] | None:
    """(first row, rows, byte offset in the file) of each stored piece of an (N, D) dataset, when
    its bytes can be read straight from the file: no filters (the writer never compresses), whole-row
    chunks or a contiguous layout, every chunk allocated, no user block. None: read through h5py."""
    if f.userblock_size or ds.id.get_create_plist().get_nfilters() or not ds.dtype.isnative or ds.ndim != 2:
        return None
    n, row_bytes = ds.shape[0], ds.shape[1] * ds.dtype.itemsize
    if ds.chunks is None:
        offset = ds.id.get_offset()  # None while nothing was written
        return [(0, n, offset)] if offset is not None else None
    chunk_rows, chunk_cols = ds.chunks
    if chunk_cols != ds.shape[1]:
        return None
    extents = []
    for i in range(ds.id.get_num_chunks()):
        info = ds.id.get_chunk_info(i)
        if info.filter_mask or info.size != chunk_rows * row_bytes:
            return None
        first = info.chunk_offset[0]
        extents.append((first, min(chunk_rows, n - first), info.byte_offset))
    if sum(rows for _, rows, _ in extents) != n:  # unwritten chunks read as the fill value: h5py's job
        return None
    return sorted(extents)


def _raw_pieces(extents: list[tuple[int, int, int]], lo: int, hi: int, row_bytes: int
                ) -> list[tuple[int, int, int]]:
    """(file offset, bytes, first row relative to lo) of rows lo..hi-1, one piece per stored extent,
    neighbours that continue each other in the file and in memory merged up to READ_TASK_BYTES."""
    pieces: list[list[int]] = []
    for first, rows, offset in extents:
        a, b = max(lo, first), min(hi, first + rows)
        if a >= b:
            continue
        at, size = offset + (a - first) * row_bytes, (b - a) * row_bytes
        last = pieces[-1] if pieces else None
        if last and last[0] + last[1] == at and last[2] * row_bytes + last[1] == (a - lo) * row_bytes \
                and last[1] + size <= READ_TASK_BYTES:
            last[1] += size
        else:
            pieces.append([at, size, a - lo])
    # Split large pieces so the threads share the work evenly.
    out = []
    for at, size, row in pieces:
        step = max(row_bytes, READ_TASK_BYTES // row_bytes * row_bytes)
        out.extend((at + k, min(step, size - k), row + k // row_bytes) for k in range(0, size, step))
    return out


def _pread_into(fd: int, dest: memoryview, offset: int) -> None:
    """Fill dest with the file's bytes from offset (preadv may return fewer bytes than asked)."""
    while len(dest):
        n = os.preadv(fd, [dest], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        dest, offset = dest[n:], offset + n


class Store:
    """A read-only view of a store directory. Build it with `store.open(dir)`.

    `meta` has one row per live embedding: if a path was embedded more than once (its file
    changed, or a failure was retried), the newest shard wins, so no path appears twice.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if self.root.is_file():
            raise UserError(f"{self.root} is a file, not a store folder; pass the folder that holds the shard-*.h5 files")
        if not self.root.is_dir():
            raise UserError(f"store {self.root} does not exist; create it with `dfembed extract IMAGES --out {self.root}`")
        self.shards, unfinished = _all_shards(self.root)
        self.unfinished_imports = [s.path for s in unfinished]
        if not self.shards:
            raise UserError(f"store {self.root} has no shards; run `dfembed extract IMAGES --out {self.root}` first")
        self.provenance = self.shards[0].provenance
        ident = fmt.identity(self.provenance)
        for s in self.shards[1:]:
            if fmt.identity(s.provenance) != ident:
                # Name the differing keys: model_config / preprocess differences don't show in the short form.
                differ = [k for k in fmt.IDENTITY_KEYS
                          if fmt.identity(s.provenance, (k,)) != fmt.identity(self.provenance, (k,))]
                raise UserError(
                    f"store {self.root} mixes embeddings: {s.path.name} has {fmt.describe_identity(s.provenance)} but "
                    f"{self.shards[0].path.name} has {fmt.describe_identity(self.provenance)} "
                    f"(differs in {', '.join(differ)}); keep one model per store"
                )
        self.dim = int(self.provenance["dim"])
        self._meta: pl.DataFrame | None = None
        self._failures: pl.DataFrame | None = None
        self._done: pl.DataFrame | None = None

    def _scan(self) -> None:
        rows, fails = [], []
        for i, s in enumerate(self.shards):
            cache = s.path.with_name(fmt.meta_cache_name(s.path.name, s.created_ns))
            cached = _read_cache(cache) if cache.is_file() else None
            try:  # a file named like a shard but missing datasets is the user's to move, not a crash
                with h5py.File(s.path, "r") as f:
                    if cached is not None and cached.height == s.n_rows:
                        cols = {c: cached[c] for c in fmt.ROW_COLUMNS + fmt.FACE_COLUMNS}
                    else:  # no cache (e.g. a shard written by other tools): the shard itself is the truth
                        cols = {c: _strings(f[c]) for c in fmt.STRING_COLUMNS}
                        cols.update({fmt.LABEL: f[fmt.LABEL][:], **{c: f[c][:] for c in fmt.FILE_COLUMNS}})
                        cols.update(_face_columns(f, s.n_rows))
                    rows.append(pl.DataFrame({**cols, "shard": np.full(s.n_rows, i, np.int32),
                                              "row": np.arange(s.n_rows, dtype=np.int64)}, schema=META_SCHEMA))
                    g = f[fmt.FAILURES_GROUP]
                    fcols = {c: _strings(g[c]) for c in fmt.FAILURE_STRING_COLUMNS}
                    fcols.update({c: g[c][:] for c in fmt.FILE_COLUMNS})
                    fails.append(pl.DataFrame(fcols, schema=fmt.FAILURE_SCHEMA).with_columns(shard=pl.lit(i, pl.Int32)))
            except (OSError, KeyError, ValueError, pl.exceptions.PolarsError) as e:
                raise _unreadable(s.path, e) from None
        _check_labels(rows, self.shards)
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
                          .unique(["path", "shard"], keep="last").sort("path").drop("shard")
                          .filter(pl.col("error") != fmt.REMOVED))  # tombstones drop a path, they are no failure

    def _index_path(self) -> Path:
        return self.root / fmt.index_cache_name([(s.path.name, s.created_ns, s.n_rows) for s in self.shards])

    def _read_index(self) -> pl.DataFrame | None:
        """The resolved rows cached for exactly this set of shards, or None (no usable cache).

        Only what the shards say is cached; anything applied on top of the shards' rows must be
        applied after this, to cached and freshly scanned rows alike.
        """
        path = self._index_path()
        try:
            index = pl.read_parquet(path) if path.is_file() else None
        except (OSError, pl.exceptions.PolarsError):
            return None
        return index if index is not None and dict(index.schema) == META_SCHEMA else None

    def _write_index(self) -> None:
        """Cache the resolved rows. Best effort: on a read-only or full disk nothing is written (or the
        partial temp file is removed) and the next open resolves the rows again."""
        if not os.access(self.root, os.W_OK):  # a read-only store is read, never written
            return
        dest = self._index_path()
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            self._meta.write_parquet(tmp)
            os.replace(tmp, dest)
        except Exception:  # noqa: BLE001 - polars words a full disk as ComputeError, the OS as OSError: a cache may fail
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        for old in self.root.glob(fmt.INDEX_CACHE_GLOB):  # caches of earlier sets of shards
            if old != dest:
                with contextlib.suppress(OSError):
                    old.unlink(missing_ok=True)

    @property
    def meta(self) -> pl.DataFrame:
        """path, label, source, split, group, size, mtime_ns, shard, row — one row per live embedding.

        Resolving newest-wins over a million paths takes longer than reading the embeddings, so
        the result is cached in the store (fmt.index_cache_name) for the next open of the same shards.
        """
        if self._meta is None:
            self._meta = self._read_index()
        if self._meta is None:
            self._scan()
            self._write_index()
        return self._meta

    def _read_records(self, name: str, schema: dict) -> pl.DataFrame:
        parts = []
        for s in self.shards:
            try:
                with h5py.File(s.path, "r") as f:
                    part = _records(f, name, schema)
            except (OSError, KeyError, ValueError) as e:
                raise _unreadable(s.path, e) from None
            if part is not None:
                parts.append(part)
        return pl.concat(parts) if parts else pl.DataFrame(schema=schema)

    @property
    def done_inputs(self) -> pl.DataFrame:
        """Input files whose rows are all stored (videos, images with a face stage): path, size, mtime_ns,
        n_frames (of a video; -1 for an image) and n_rows, one record per (path, size, mtime_ns)."""
        if self._done is None:
            self._done = self._read_records(fmt.INPUTS_GROUP, fmt.INPUT_DONE_SCHEMA).unique(
                ["path", "size", "mtime_ns"], keep="last", maintain_order=True)
        return self._done

    @property
    def detections(self) -> pl.DataFrame:
        """The face detector's output over every shard (fmt.DETECTION_SCHEMA), one record per file, frame and face."""
        return self._read_records(fmt.DETECTIONS_GROUP, fmt.DETECTION_SCHEMA).unique(
            ["path", "size", "mtime_ns", "frame", "face"], keep="last", maintain_order=True)

    def write_detections_view(self) -> Path | None:
        """Rebuild detections.parquet (atomically) from the shards; None when the store has no detections."""
        table = self.detections
        if table.height == 0:
            return None
        dest = self.root / fmt.DETECTIONS_FILE
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        table.write_parquet(tmp)
        os.replace(tmp, dest)
        return dest

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

    # Set by a fused view (store.fused.FusedStore) to its one line on rows left out; a store leaves none out.
    join_note: str | None = None

    def expand_feature(self, spec: str) -> str:
        """The spelling of `spec` a run records: as given for one store (a FusedStore names each part's store)."""
        return spec

    def part_widths(self, feature: str = fmt.DEFAULT_FEATURE) -> list[int]:
        """The width of each part of `feature`, in order (a layer mix needs them equal)."""
        return [self.feature_dim(p) for p in self._check_feature(feature)]

    def feature_dim(self, feature: str = fmt.DEFAULT_FEATURE) -> int:
        """Columns of `feature` ("proj", "block16", "block8+block16": the sum of its parts)."""
        self._check_feature(feature)
        return fmt.feature_width(self.provenance, feature)

    def _check_feature(self, feature: str) -> list[str]:
        parts = fmt.feature_parts(feature)
        missing = [p for p in parts if p not in self.features]
        if missing and fmt.split_part(parts[0])[0] is not None:
            raise UserError(f"feature {feature!r} names stores, but {self.root} is one store; give the others with "
                            "--with, or use an unnamed feature such as proj")
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
        dataset, width = fmt.feature_dataset(parts[0]), fmt.feature_width(self.provenance, parts[0])
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
        out_bytes = memoryview(out.reshape(-1).view(np.uint8))
        tasks: list[tuple[int, memoryview, int]] = []  # (fd, destination, file offset): whole runs, read last
        f, open_shard, buf, extents, fds = None, -1, None, None, []
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
                        extents = _raw_extents(f, f[dataset]) if f[dataset].dtype == dtype else None
                        if extents is not None:
                            fds.append(os.open(self.shards[open_shard].path, os.O_RDONLY))
                    ds, lo, hi = f[dataset], row_col[a], row_col[b - 1] + 1
                    if next_row[a:b - 1].all():  # one contiguous run: straight into out
                        if extents is None:
                            ds.read_direct(out, np.s_[lo:hi], np.s_[a:b])
                        for at, size, row in _raw_pieces(extents or [], lo, hi, row_bytes):
                            start = (a + row) * row_bytes
                            tasks.append((fds[-1], out_bytes[start:start + size], at))
                        continue
                    if buf is None or len(buf) < hi - lo:
                        buf = np.empty((hi - lo, width), ds.dtype)
                    if extents is None:
                        ds.read_direct(buf, np.s_[lo:hi], np.s_[0:hi - lo])
                    else:
                        span = memoryview(buf.reshape(-1).view(np.uint8))
                        for at, size, row in _raw_pieces(extents, lo, hi, row_bytes):
                            _pread_into(fds[-1], span[row * row_bytes:row * row_bytes + size], at)
                    out[a:b] = buf[row_col[a:b] - lo]
            if f is not None:
                f.close()
                f = None
            if len(tasks) > 1 and READ_THREADS > 1:
                with ThreadPoolExecutor(READ_THREADS) as pool:
                    list(pool.map(lambda t: _pread_into(*t), tasks))
            else:
                for t in tasks:
                    _pread_into(*t)
        finally:
            if f is not None:
                f.close()
            for fd in fds:
                os.close(fd)
        return out, rows

    def info(self) -> dict:
        """Summary for `dfembed info`: counts, model, failures and size on disk."""
        m = self.meta
        by = lambda c: {str(k): int(v) for k, v in m.group_by(c).len().sort(c).iter_rows()}
        by_error = lambda f: {str(k): int(v) for k, v in f.group_by("error").len().sort("error").iter_rows()}
        p = self.provenance
        return {
            "store": str(self.root), "rows": m.height, "dim": self.dim, "dtype": p.get("dtype"),
            "model": p.get("model"), "pretrained": fmt.weights_name(p), "feature": p.get("feature"),
            "layers": p.get("layers") or [], "perturb": p.get("perturb") or "none",
            "shards": len(self.shards), "labels": by("label"), "sources": by("source"), "splits": by("split"),
            "failures": self.failures.height, "failure_kinds": by_error(self.failures),
            "videos": int((self.done_inputs["n_frames"] >= 0).sum()), "frames": int((m["frame"] >= 0).sum()),
            "video_settings": p.get("video"), "faces": p.get("faces"), "non_finite": self.non_finite_rows(),
            "missing_inputs": self.missing_inputs().height, "missing_failures": self.missing_failures().height,
            "input_root": p.get("input_root"), "source_case_clashes": fmt.case_clashes(m["source"].unique().to_list()),
            "unfinished_import_shards": len(self.unfinished_imports),
            "bytes_on_disk": sum(f.stat().st_size for f in self.root.iterdir() if f.is_file()),
        }

    def non_finite_rows(self) -> int:
        """Live rows whose embedding has NaN or inf. Shards of a dfclip writer are finite by construction
        (attribute all_finite); others (written by other tools, or by dfclip before it checked) are read."""
        bad = []
        for i, s in enumerate(self.shards):
            if s.all_finite or s.n_rows == 0:
                continue
            with h5py.File(s.path, "r") as f:
                ds = f[fmt.EMBEDDINGS]
                for a in range(0, s.n_rows, 65536):  # bounded memory on any shard size
                    block = ds[a:a + 65536]
                    rows = a + np.flatnonzero(~np.isfinite(block).all(axis=1))
                    bad.append(pl.DataFrame({"shard": np.full(len(rows), i, np.int32), "row": rows.astype(np.int64)}))
        if not bad:
            return 0
        return self.meta.join(pl.concat(bad), on=["shard", "row"], how="semi").height

    def missing_inputs(self) -> pl.DataFrame:
        """Live rows whose image file is gone from the store's input folder (provenance input_root);
        empty for imported stores, which read no image files. `dfembed extract --prune-missing` drops them."""
        root = self.provenance.get("input_root")
        if not root:
            return self.meta.clear()
        # One stat per input file: the frames and faces of a video or image share theirs.
        origin = self.meta.select(fmt.origin_expr().alias("origin"))["origin"]
        files = origin.unique()
        gone = files.filter(pl.Series([not os.path.isfile(os.path.join(root, p)) for p in files.to_list()],
                                      dtype=pl.Boolean))
        return self.meta.filter(origin.is_in(gone.implode()))

    def write_failures_view(self) -> Path:
        """Rebuild failures.parquet (atomically) from the shards, the source of truth. A full or read-only
        disk is one UserError and leaves no temp file (the shards are complete; a re-run writes the view)."""
        dest = self.root / fmt.FAILURES_FILE
        tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
        try:
            self.failures.write_parquet(tmp)
            os.replace(tmp, dest)
        except (OSError, pl.exceptions.PolarsError) as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot write {dest} ({reason}); every shard is complete: free some space (or give "
                            "write permission) and re-run the same command to write it") from None
        return dest

    def missing_failures(self) -> pl.DataFrame:
        """Logged failures whose file is gone from the input folder. Like rows of deleted files they stay
        listed (and counted) until `dfembed extract --prune-missing` drops them."""
        root = self.provenance.get("input_root")
        if not root:
            return self.failures.clear()
        origin = self.failures.select(fmt.origin_expr().alias("origin"))["origin"]  # a frame's: its video
        gone = [not os.path.isfile(os.path.join(root, p)) for p in origin.to_list()]
        return self.failures.filter(pl.Series(gone, dtype=pl.Boolean))


def open(root: str | os.PathLike) -> Store:  # noqa: A001 - the natural name: store.open(dir)
    """Open a store directory for reading; refuses stores that mix models, features or dims."""
    return Store(root)
