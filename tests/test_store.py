"""The store contract: round trips, plain-h5py readability, atomic shards, newest-wins, mixing, lock, info."""

import fnmatch
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from dfclip import store
from dfclip.store import format as fmt
from dfclip.store import reader
from dfclip.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PROV = {"model": "ViT-L-14", "model_config": {"quick_gelu": True}, "pretrained": "openai", "feature": "proj"}


def rows_of(paths, labels=None, sources=None, splits=None, sizes=None):
    n = len(paths)
    return {
        "path": list(paths), "label": list(labels if labels is not None else [1] * n),
        "source": list(sources if sources is not None else [""] * n),
        "split": list(splits if splits is not None else [""] * n), "group": [""] * n,
        "size": list(sizes if sizes is not None else [100] * n), "mtime_ns": [7] * n,
    }


def write(root, emb, rows, *, prov=PROV, shard_size=16, dtype="float32", rank=0, failures=()):
    with store.ShardWriter(root, prov, dim=emb.shape[1], dtype=dtype, shard_size=shard_size, rank=rank) as w:
        if len(emb):
            w.add(emb, rows)
        for f in failures:
            w.add_failure(*f)
    return w


@pytest.fixture
def sample():
    """50 rows of varied metadata, written with shard_size 7 (8 shards, the last one partial)."""
    rng = np.random.default_rng(0)
    n = 50
    meta = rows_of(
        [f"img/{i:03d}.png" for i in range(n)],
        labels=rng.choice([1, 0, -1], n).tolist(),
        sources=rng.choice(["sd15", "stylegan2", "ffhq"], n).tolist(),
        splits=rng.choice(["train", "val", ""], n).tolist(),
    )
    return rng.standard_normal((n, 16)).astype(np.float32), meta


# ---------------------------------------------------------------- round trip


def test_round_trip_float32_exact_across_shards(tmp_path, sample):
    emb, meta = sample
    w = write(tmp_path, emb, meta, shard_size=7)
    assert len(w.written) == 8 and len(store.list_shards(tmp_path)) == 8
    s = store.open(tmp_path)
    X, m = s.load()
    assert X.dtype == np.float32 and X.shape == emb.shape
    np.testing.assert_array_equal(X, emb)  # storage order is write order
    for c in ("path", "label", "source", "split", "group", "size", "mtime_ns"):
        assert m[c].to_list() == meta[c], c
    assert len(s) == 50 and s.dim == 16


def test_float16_within_rounding(tmp_path):
    rng = np.random.default_rng(1)
    # CLIP-like: a shared direction plus noise, so rows are far from orthogonal.
    emb = (rng.standard_normal((40, 768)) * 0.4 + rng.standard_normal(768)).astype(np.float32)
    write(tmp_path, emb, rows_of([f"p{i}" for i in range(40)]), shard_size=9, dtype="float16")
    s = store.open(tmp_path)
    X, _ = s.load()
    assert X.dtype == np.float16
    np.testing.assert_array_equal(X, emb.astype(np.float16))  # exactly one rounding, nothing else
    x = X.astype(np.float64)
    cos = (x * emb).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(emb.astype(np.float64), axis=1)
    assert (1 - cos).max() < 1e-4
    X32, _ = s.load(dtype="float32")  # upcast on read gives the same values
    assert X32.dtype == np.float32
    np.testing.assert_array_equal(X32, X.astype(np.float32))


@pytest.mark.parametrize("filters, keep", [
    ({"label": 1}, lambda r: r["label"] == 1),
    ({"label": [0, -1]}, lambda r: r["label"] in (0, -1)),
    ({"source": "sd15"}, lambda r: r["source"] == "sd15"),
    ({"source": ["sd15", "ffhq"], "split": "train"}, lambda r: r["source"] in ("sd15", "ffhq") and r["split"] == "train"),
    ({"split": ("val", "")}, lambda r: r["split"] in ("val", "")),
    ({"label": 0, "where": pl.col("path").str.contains("[13579].png$")},
     lambda r: r["label"] == 0 and int(r["path"][-5]) % 2 == 1),
])
def test_filtered_loads(tmp_path, sample, filters, keep):
    emb, meta = sample
    write(tmp_path, emb, meta, shard_size=7)
    want = [i for i in range(len(emb)) if keep({c: meta[c][i] for c in meta})]
    assert 0 < len(want) < len(emb)  # the filter really selects something and drops something
    X, m = store.open(tmp_path).load(**filters)
    assert m["path"].to_list() == [meta["path"][i] for i in want]  # storage order
    np.testing.assert_array_equal(X, emb[want])


def test_empty_selection_loads_empty(tmp_path, sample):
    emb, meta = sample
    write(tmp_path, emb, meta, shard_size=7)
    X, m = store.open(tmp_path).load(source="no-such-source")
    assert X.shape == (0, 16) and m.height == 0


def test_shuffled_rows_keep_embeddings_aligned(tmp_path, sample):
    emb, meta = sample
    write(tmp_path, emb, meta, shard_size=7)
    s = store.open(tmp_path)
    rows = s.meta.sample(n=30, shuffle=True, seed=3)
    X, m = s.load(rows)
    assert sorted(m["path"].to_list()) == sorted(rows["path"].to_list())
    assert m.select("shard", "row").rows() == sorted(m.select("shard", "row").rows())
    index = {p: i for i, p in enumerate(meta["path"])}
    np.testing.assert_array_equal(X, emb[[index[p] for p in m["path"]]])


@pytest.mark.parametrize("call_bytes, span_bytes", [
    (1 << 19, 64 << 20),  # defaults: every shard's scattered rows in one read
    (64, 64 << 20),       # gap_rows = 1: only adjacent rows share a read
    (1 << 19, 640),       # max_span = 10 rows: long spans split
])
def test_scattered_rows_are_exact_and_read_with_few_calls(tmp_path, monkeypatch, call_bytes, span_bytes):
    from dfclip.store import reader as reader

    monkeypatch.setattr(reader, "READ_CALL_BYTES", call_bytes)
    monkeypatch.setattr(reader, "MAX_SPAN_BYTES", span_bytes)
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((300, 16)).astype(np.float32)  # 64 bytes a row
    write(tmp_path, emb, rows_of([f"p{i:03d}" for i in range(300)]), shard_size=100)
    s = store.open(tmp_path)
    pick = np.r_[rng.choice(300, 120, replace=False), np.arange(40, 60)]  # scattered rows and a run
    rows = pl.concat([s.meta[np.unique(pick)], s.meta[[7, 7]]])  # a row asked for twice comes twice
    calls, real, raw = [], h5py.Dataset.read_direct, reader._pread_into  # h5py reads and raw file reads
    monkeypatch.setattr(h5py.Dataset, "read_direct", lambda ds, *a: (calls.append(1), real(ds, *a))[1])
    monkeypatch.setattr(reader, "_pread_into", lambda *a: (calls.append(1), raw(*a))[1])
    X, m = s.load(rows)
    assert m.height == rows.height and m["path"].to_list().count("p007") == 2 + (7 in pick)
    np.testing.assert_array_equal(X, emb[[int(p[1:]) for p in m["path"]]])
    if call_bytes == 1 << 19 and span_bytes == 64 << 20:
        assert len(calls) == 3  # one per shard, not one per run of rows


# ---------------------------------------------------------------- plain h5py contract


def test_shards_are_readable_with_plain_h5py(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((1500, 32)).astype(np.float32)
    paths = [f"fälschung/画像-{i}.png" for i in range(1500)]
    labels = rng.choice([1, 0, -1], 1500).tolist()
    write(tmp_path, emb, rows_of(paths, labels=labels, sources=["sd"] * 1500), shard_size=1000,
          dtype="float16", failures=[("broken.png", 3, 9, "UnidentifiedImageError", "cannot identify")])
    files = sorted(tmp_path.glob("shard-r*-*.h5"))
    assert [f.name for f in files] == ["shard-r000-00000.h5", "shard-r000-00001.h5"]
    got_emb, got_paths, got_labels = [], [], []
    for file in files:
        with h5py.File(file, "r") as f:
            assert f.attrs["format"] == "dfclip-store/1"
            prov = json.loads(f.attrs["provenance"])
            assert {k: prov[k] for k in PROV} == PROV and prov["dim"] == 32 and prov["dtype"] == "float16"
            e = f["embeddings"]
            assert e.dtype == np.float16 and e.compression is None and e.chunks[1] == 32 and e.chunks[0] <= len(e)
            assert f["label"].dtype == np.int8
            for c in ("path", "source", "split", "group"):
                assert h5py.check_string_dtype(f[c].dtype).encoding == "utf-8", c
            assert f["size"].dtype == np.int64 and f["mtime_ns"].dtype == np.int64
            assert len({len(f[c]) for c in ("embeddings", "path", "label", "size")}) == 1
            g = f["failures"]
            assert set(g) == {"path", "error", "message", "size", "mtime_ns"}
            got_emb.append(e[:])
            got_paths += list(f["path"].asstr()[:])
            got_labels += f["label"][:].tolist()
    np.testing.assert_array_equal(np.concatenate(got_emb), emb.astype(np.float16))
    assert got_paths == paths and got_labels == labels
    with h5py.File(files[-1], "r") as f:  # failures travel with the shard flushed after them
        assert list(f["failures/path"].asstr()[:]) == ["broken.png"]
        assert list(f["failures/error"].asstr()[:]) == ["UnidentifiedImageError"]
        assert f["failures/size"][:].tolist() == [3]


# ---------------------------------------------------------------- atomicity


def test_temp_files_never_match_the_shard_glob(tmp_path, sample, monkeypatch):
    emb, meta = sample
    real_replace, seen = os.replace, []

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        if dst.parent == tmp_path and dst.name.startswith("shard"):
            assert src.exists() and src.parent == tmp_path
            assert not fnmatch.fnmatch(src.name, fmt.SHARD_GLOB) and not fmt.SHARD_RE.match(src.name)
            assert src not in [s.path for s in store.list_shards(tmp_path)]
            seen.append(dst.name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write(tmp_path, emb, meta, shard_size=20)
    shards = ["shard-r000-00000.h5", "shard-r000-00001.h5", "shard-r000-00002.h5"]
    assert [n for n in seen if n.endswith(".h5")] == shards
    # each shard's metadata cache is committed just before the shard itself
    assert [n.split(".meta-")[0] for n in seen if n.endswith(".parquet")] == shards
    assert all(seen.index(n) + 1 == seen.index(n.split(".meta-")[0]) for n in seen if n.endswith(".parquet"))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock-r000")  # the writer's own lock file
    assert left == sorted(seen)  # no temp left behind


DIE_BEFORE_RENAME = """
import os, sys, numpy as np, store
os.replace = lambda *a: os._exit(3)  # die after the temp is fully written, before it is committed
w = store.ShardWriter(sys.argv[1], {"model": "ViT-L-14", "feature": "proj"}, dim=4, dtype="float32")
n = 5
w.add(np.ones((n, 4), np.float32), {"path": [f"dead{i}" for i in range(n)], "label": [1] * n, "source": [""] * n,
      "split": [""] * n, "group": [""] * n, "size": [1] * n, "mtime_ns": [1] * n})
w.flush()
"""


def test_stale_temp_of_dead_writer_is_never_read_and_removed_by_same_rank(tmp_path):
    prov = {"model": "ViT-L-14", "feature": "proj"}
    write(tmp_path, np.zeros((2, 4), np.float32), rows_of(["a", "b"]), prov=prov)
    r = subprocess.run([sys.executable, "-c", DIE_BEFORE_RENAME, str(tmp_path)], cwd=REPO, capture_output=True)
    assert r.returncode == 3, r.stderr.decode()
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".shard-r000") and ".h5.tmp" in p.name]
    assert len(temps) == 1 and h5py.is_hdf5(temps[0])  # a complete HDF5 file, just never committed
    assert store.open(tmp_path).meta["path"].to_list() == ["a", "b"]
    write(tmp_path, np.zeros((1, 4), np.float32), rows_of(["c"]), prov=prov, rank=1)
    assert temps[0].exists()  # another rank's writer leaves it alone (it may be live)
    write(tmp_path, np.zeros((1, 4), np.float32), rows_of(["d"]), prov=prov, rank=0)
    assert not temps[0].exists()
    assert store.open(tmp_path).meta["path"].to_list() == ["a", "b", "c", "d"]


def _one_line_user_error(root, *must_contain):
    with pytest.raises(UserError) as e:
        store.open(root).meta
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in must_contain), msg


def test_garbage_and_half_written_shards_give_user_error(tmp_path, sample):
    emb, meta = sample
    good = tmp_path / "good"
    write(good, emb, meta, shard_size=100)
    data = (good / "shard-r000-00000.h5").read_bytes()

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "shard-r000-00000.h5").write_bytes(b"not hdf5 at all" * 50)
    _one_line_user_error(garbage, "shard-r000-00000.h5", "not a readable dfclip shard")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "shard-r000-00000.h5").write_bytes(data[: len(data) * 2 // 3])
    _one_line_user_error(truncated, "shard-r000-00000.h5", "not a readable dfclip shard")

    incomplete = tmp_path / "incomplete"  # valid HDF5 with the header of a shard but missing datasets
    incomplete.mkdir()
    (incomplete / "shard-r000-00000.h5").write_bytes(data)
    with h5py.File(incomplete / "shard-r000-00000.h5", "a") as f:
        del f["label"]
    _one_line_user_error(incomplete, "shard-r000-00000.h5", "not a readable dfclip shard")


def test_unknown_format_version_is_refused(tmp_path):
    write(tmp_path, np.zeros((2, 4), np.float32), rows_of(["a", "b"]))
    with h5py.File(tmp_path / "shard-r000-00000.h5", "a") as f:
        f.attrs["format"] = "dfclip-store/2"
    _one_line_user_error(tmp_path, "shard-r000-00000.h5", "dfclip-store/2", "dfclip-store/1", "upgrade")


def test_bad_rows_are_refused_before_buffering(tmp_path):
    w = store.ShardWriter(tmp_path, PROV, dim=4, dtype="float32", shard_size=10)
    w.add(np.ones((2, 4), np.float32), rows_of(["a", "b"]))
    bad = rows_of(["c", "d"])
    del bad["group"]
    with pytest.raises(ValueError, match="group"):
        w.add(np.ones((2, 4), np.float32), bad)
    short = rows_of(["e"])
    with pytest.raises(ValueError, match="path"):
        w.add(np.ones((2, 4), np.float32), short)
    w.close()  # the earlier, good rows are still written, aligned
    assert store.open(tmp_path).meta["path"].to_list() == ["a", "b"]


# ---------------------------------------------------------------- newest wins


def test_changed_file_rewritten_later_appears_once_with_new_embedding(tmp_path):
    write(tmp_path, np.zeros((3, 4), np.float32), rows_of(["a", "b", "c"]))
    write(tmp_path, np.full((1, 4), 5, np.float32), rows_of(["b"], sizes=[999]))
    assert sorted(p.name for p in tmp_path.glob(fmt.SHARD_GLOB)) == ["shard-r000-00000.h5", "shard-r000-00001.h5"]
    s = store.open(tmp_path)
    X, m = s.load()
    assert m["path"].to_list() == ["a", "c", "b"] and len(s) == 3
    np.testing.assert_array_equal(X[2], np.full(4, 5, np.float32))
    assert m.filter(pl.col("path") == "b")["size"].to_list() == [999]


def test_path_added_twice_in_one_shard_keeps_last(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    write(tmp_path, emb, rows_of(["a", "b", "a"]))
    X, m = store.open(tmp_path).load()
    assert m["path"].to_list() == ["b", "a"]
    np.testing.assert_array_equal(X, emb[[1, 2]])


def test_later_failure_hides_row_and_later_success_clears_failure(tmp_path):
    write(tmp_path, np.zeros((3, 4), np.float32), rows_of(["a", "b", "c"]),
          failures=[("x", 1, 1, "OSError", "unreadable")])
    # A later attempt: b now fails (failure-only shard, no rows), x now succeeds.
    write(tmp_path, np.zeros((0, 4), np.float32), rows_of([]), failures=[("b", 2, 3, "DecompressionBombError", "too big")])
    write(tmp_path, np.ones((1, 4), np.float32), rows_of(["x"]))
    s = store.open(tmp_path)
    assert s.meta["path"].to_list() == ["a", "c", "x"]
    assert s.failures.to_dicts() == [
        {"path": "b", "error": "DecompressionBombError", "message": "too big", "size": 2, "mtime_ns": 3}]
    X, m = s.load()
    assert "b" not in m["path"].to_list() and X.shape == (3, 4)


def test_failures_view_is_written_atomically_and_equals_failures(tmp_path, monkeypatch):
    write(tmp_path, np.zeros((2, 4), np.float32), rows_of(["a", "b"]),
          failures=[("z", 1, 1, "OSError", "gone"), ("y", 1, 1, "ValueError", "bad")])
    s = store.open(tmp_path)
    real_replace, moves = os.replace, []
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((Path(a), Path(b))), real_replace(a, b)))
    dest = s.write_failures_view()
    assert dest == tmp_path / "failures.parquet"
    [(src, dst)] = moves
    assert dst == dest and src.parent == tmp_path and src.name != dest.name and not src.exists()
    view = pl.read_parquet(dest)
    assert view.equals(s.failures) and view["path"].to_list() == ["y", "z"]
    assert store.open(tmp_path).meta.height == 2  # the view is not mistaken for a shard


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize("key, other, shown", [
    ("model", "ViT-B-16", ["ViT-L-14", "ViT-B-16"]),
    ("feature", "pre_proj", ["feature=proj", "feature=pre_proj"]),
    ("dim", 8, ["dim=4", "dim=8"]),
    ("model_config", {"quick_gelu": False}, ["model_config"]),  # invisible in the short form: named by key
])
def test_mixing_models_features_or_dims_is_refused(tmp_path, key, other, shown):
    write(tmp_path, np.zeros((1, 4), np.float32), rows_of(["a"]))
    dim = other if key == "dim" else 4
    prov = {**PROV, key: other} if key != "dim" else PROV
    with pytest.raises(UserError, match="use another --out"):  # the writer itself refuses to mix
        write(tmp_path, np.zeros((1, dim), np.float32), rows_of(["b"]), prov=prov)
    # A shard of another model put there by hand (or another tool) is refused by every reader.
    write(tmp_path / "other", np.zeros((1, dim), np.float32), rows_of(["b"]), prov=prov)
    os.replace(tmp_path / "other" / "shard-r000-00000.h5", tmp_path / "shard-r000-00001.h5")
    with pytest.raises(UserError) as e:
        store.open(tmp_path)
    msg = str(e.value)
    assert "shard-r000-00000.h5" in msg and "shard-r000-00001.h5" in msg and "mixes" in msg
    assert all(s in msg for s in shown), msg


# ---------------------------------------------------------------- lock

TRY_LOCK = """
import sys, store
try:
    with store.writer_lock(sys.argv[1], 0):
        print("acquired")
except store.UserError as e:
    print("refused:", e)
"""

HOLD_LOCK = """
import sys, time, store
with store.writer_lock(sys.argv[1], 0):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_held_here_refuses_a_second_process(tmp_path):
    with store.writer_lock(tmp_path, 0):
        r = subprocess.run([sys.executable, "-c", TRY_LOCK, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
        assert r.stdout.startswith("refused:") and f"pid {os.getpid()}" in r.stdout, r.stdout + r.stderr
    with store.writer_lock(tmp_path, 0):  # released on exit, so it can be taken again
        pass


def test_lock_of_a_killed_holder_is_free_and_ranks_do_not_conflict(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with store.writer_lock(tmp_path, 0):
                pass
        with store.writer_lock(tmp_path, 1):  # another torchrun rank writes alongside
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock-r000").exists()  # the file stays; the fcntl lock died with its process
    with store.writer_lock(tmp_path, 0):
        pass


# ---------------------------------------------------------------- info and empty stores


def test_info_counts_and_sizes(tmp_path, sample):
    emb, meta = sample
    write(tmp_path, emb, meta, shard_size=7, dtype="float16", failures=[("bad.png", 1, 1, "OSError", "x")])
    rep = store.open(tmp_path).info()
    count = lambda c: {str(v): meta[c].count(v) for v in set(meta[c])}
    assert rep["rows"] == 50 and rep["dim"] == 16 and rep["dtype"] == "float16" and rep["shards"] == 8
    assert rep["labels"] == count("label") and rep["sources"] == count("source") and rep["splits"] == count("split")
    assert rep["failures"] == 1 and rep["model"] == "ViT-L-14" and rep["feature"] == "proj"
    assert rep["bytes_on_disk"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert rep["bytes_on_disk"] > emb.size * 2  # at least the float16 embeddings themselves
    json.dumps(rep)  # `dfembed info --json` must be able to print it


def test_missing_or_empty_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        store.open(tmp_path / "nope")
    (tmp_path / ".shard-r000-00000.h5.tmp123").write_bytes(b"half")  # only a temp: still empty
    with pytest.raises(UserError, match="has no shards"):
        store.open(tmp_path)


def test_compatible_is_exact_for_extracted_and_declared_fields_for_imported():
    from dfclip.store.format import compatible

    extracted = {"model": "ViT-L-14", "model_config": {"embed_dim": 768, "quick_gelu": True},
                 "pretrained": {"kind": "tag", "tag": "openai"}, "feature": "proj", "dim": 768,
                 "preprocess": {"size": 224}}
    assert compatible(extracted, dict(extracted))
    gelu = {**extracted, "model_config": {"embed_dim": 768, "quick_gelu": False}}
    assert not compatible(extracted, gelu)  # same name, different activation: not comparable
    imported = {"model": "ViT-L-14", "model_config": None, "pretrained": "openai", "feature": "proj", "dim": 768,
                "preprocess": None, "declared": True}
    assert compatible(imported, extracted) and compatible(extracted, imported)
    assert not compatible({**imported, "feature": "pre"}, extracted)
    assert not compatible({**imported, "pretrained": "laion2b_s32b_b82k"}, extracted)
    assert not compatible({**imported, "dim": 1024}, extracted)


def test_metadata_cache_is_used_only_for_its_exact_shard(tmp_path, sample, monkeypatch):
    """Each shard gets a Parquet copy of its row metadata, named with the shard's created_ns. Reading
    with or without the caches gives the same store; a cache that does not match is ignored."""
    emb, meta = sample
    write(tmp_path, emb, meta, shard_size=7)
    caches = sorted(tmp_path.glob("shard-*.h5.meta-*.parquet"))
    assert len(caches) == len(store.list_shards(tmp_path)) == 8
    with_cache = store.open(tmp_path).meta

    h5_reads = []
    real = reader._strings
    monkeypatch.setattr(reader.Store, "_read_index", lambda self: None)  # resolve the shards every time
    monkeypatch.setattr(reader, "_strings", lambda ds: h5_reads.append(ds.name) or real(ds))
    assert store.open(tmp_path).meta.equals(with_cache)
    assert not [n for n in h5_reads if "failures" not in n]  # row metadata came from the caches

    # A cache claiming another shard version (other created_ns) is not trusted: the shard is read.
    victim = caches[3]
    shard_name, ns = victim.name.split(".meta-")
    bogus = pl.read_parquet(victim).with_columns(pl.lit("WRONG").alias("path"))
    victim.unlink()
    bogus.write_parquet(tmp_path / f"{shard_name}.meta-{int(ns.split('.')[0]) + 1}.parquet")
    h5_reads.clear()
    assert store.open(tmp_path).meta.equals(with_cache)
    assert any(shard_name in n or n.endswith("/path") for n in h5_reads)

    # Without any cache (e.g. shards written by other tools) the store reads the same.
    for c in tmp_path.glob("shard-*.h5.meta-*.parquet"):
        c.unlink()
    assert store.open(tmp_path).meta.equals(with_cache)


def test_cache_of_a_shard_that_never_landed_is_removed_by_the_next_writer(tmp_path):
    prov = {"model": "ViT-L-14", "feature": "proj"}
    orphan = tmp_path / "shard-r000-00005.h5.meta-123.parquet"
    tmp_path.mkdir(exist_ok=True)
    pl.DataFrame({"path": ["x"]}).write_parquet(orphan)
    other_rank = tmp_path / "shard-r001-00000.h5.meta-123.parquet"
    pl.DataFrame({"path": ["y"]}).write_parquet(other_rank)
    write(tmp_path, np.zeros((1, 4), np.float32), rows_of(["a"]), prov=prov)
    assert not orphan.exists() and other_rank.exists()  # only this rank's leftovers are this writer's
    assert store.open(tmp_path).meta["path"].to_list() == ["a"]
