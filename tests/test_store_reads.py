"""Loading at scale (store/reader.py): the cached newest-wins index and the raw, threaded reads of
uncompressed shards, each checked against plain h5py and a fresh resolve of the shards."""

from __future__ import annotations

import h5py
import numpy as np
import polars as pl
import pytest

from dfclip import store
from dfclip.store import reader

PROV = {"model": "ViT-L-14", "feature": "proj"}


def write(root, emb, names, shard_size=40, dtype="float16"):
    n = len(names)
    with store.ShardWriter(root, PROV, dim=emb.shape[1], dtype=dtype, shard_size=shard_size) as w:
        w.add(emb, {"path": names, "label": [1, 0] * (n // 2) + [1] * (n % 2), "source": ["s"] * n,
                    "split": [""] * n, "group": [""] * n, "size": [1] * n, "mtime_ns": [1] * n})


def plain_h5py(root) -> np.ndarray:
    """Every live row's embedding, as store.meta orders them, read with h5py alone."""
    s = store.open(root)
    by_shard = {}
    for i, shard in enumerate(s.shards):
        with h5py.File(shard.path, "r") as f:
            by_shard[i] = f["embeddings"][:]
    return np.stack([by_shard[sh][r] for sh, r in s.meta.select("shard", "row").iter_rows()])


def relayout(root, **dataset_options) -> None:
    """Rewrite every shard's embeddings with another HDF5 layout (what other tools might write)."""
    for path in sorted(root.glob("shard-*.h5")):
        with h5py.File(path, "r+") as f:
            x = f["embeddings"][:]
            del f["embeddings"]
            f.create_dataset("embeddings", data=x, **dataset_options)


@pytest.fixture
def emb():
    return np.random.default_rng(0).standard_normal((230, 24)).astype(np.float16)


# --- the index -----------------------------------------------------------------------------------


def test_the_resolved_index_is_cached_for_exactly_its_shards(tmp_path, emb, monkeypatch):
    write(tmp_path, emb, [f"p{i:03d}" for i in range(230)])
    first = store.open(tmp_path).meta
    (index,) = tmp_path.glob("index-*.parquet")
    monkeypatch.setattr(reader.Store, "_scan", lambda self: pytest.fail("resolved again despite the cache"))
    assert store.open(tmp_path).meta.equals(first)
    monkeypatch.undo()

    # A new shard (here re-embedding 30 paths: newest wins) is a new set of shards: resolved anew.
    write(tmp_path, emb[:30] + 1, [f"p{i:03d}" for i in range(30)])
    s = store.open(tmp_path)
    assert s.meta.height == 230 and (s.meta.filter(pl.col("path") == "p000")["shard"] == len(s.shards) - 1).all()
    assert not index.exists() and len(list(tmp_path.glob("index-*.parquet"))) == 1  # the stale one is gone
    np.testing.assert_array_equal(s.load()[0], plain_h5py(tmp_path))

    # A damaged cache is ignored, and an unwritable one only costs time.
    (index,) = tmp_path.glob("index-*.parquet")
    index.write_bytes(b"not parquet")
    assert store.open(tmp_path).meta.equals(s.meta)
    index.unlink()
    monkeypatch.setattr(pl.DataFrame, "write_parquet", lambda *a, **k: (_ for _ in ()).throw(OSError("read-only")))
    assert store.open(tmp_path).meta.equals(s.meta)
    assert not list(tmp_path.glob("index-*")) and not list(tmp_path.glob(".index-*"))


# --- raw reads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [
    {},  # the writer's: uncompressed, chunked by whole rows
    {"chunks": None},  # contiguous
    {"chunks": (7, 24)},  # small chunks: a read crosses many
    {"chunks": (16, 8)},  # chunks that split rows: h5py reads them
    {"compression": "gzip", "chunks": (16, 24)},  # compressed: h5py reads them
])
def test_loads_equal_plain_h5py_in_any_layout(tmp_path, emb, layout, monkeypatch):
    write(tmp_path, emb, [f"p{i:03d}" for i in range(230)])
    if layout:
        relayout(tmp_path, **layout)
    monkeypatch.setattr(reader, "READ_TASK_BYTES", 480)  # 10 rows a piece: many tasks over the threads
    raw = []
    real = reader._pread_into
    monkeypatch.setattr(reader, "_pread_into", lambda *a: raw.append(1) or real(*a))
    s = store.open(tmp_path)
    expected = plain_h5py(tmp_path)
    np.testing.assert_array_equal(s.load()[0], expected)
    assert bool(raw) == (layout.get("compression") is None and layout.get("chunks") != (16, 8))
    pick = s.meta[np.r_[3, 5, 6, 40:90, 91, 150, 229]]  # scattered rows and a run, across shards
    x, rows = s.load(pick)
    np.testing.assert_array_equal(x, expected[np.r_[3, 5, 6, 40:90, 91, 150, 229]])
    x32, _ = s.load(dtype="float32")  # another dtype than stored: h5py converts
    np.testing.assert_array_equal(x32, expected.astype(np.float32))


def test_raw_pieces_cover_the_rows_exactly():
    extents = [(0, 10, 1000), (10, 10, 1100), (20, 5, 5000)]  # rows 0-19 continue in the file, 20-24 elsewhere
    pieces = reader._raw_pieces(extents, 3, 23, row_bytes=10)
    assert pieces == [(1030, 170, 0), (5000, 30, 17)]
    covered = [r for at, size, row in pieces for r in range(row, row + size // 10)]
    assert covered == list(range(20))
