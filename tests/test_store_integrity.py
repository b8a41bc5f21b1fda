"""The store side of robustness: nothing lost, nothing stale, nothing silent.

Two input roots, relabelling and pruning, read-only stores, disk full, NaN/inf rows, the writer's
own lock and identity check, shards and caches written by other tools, symlink loops.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
from PIL import Image

from dfclip import store
from dfclip.embed.sources import scan_folder
from dfclip.errors import UserError
from dfclip.store import format as fmt
from dfclip.store import reader
from dfclip.store import writer as store_writer
from dfclip.store.synthetic import SYNTHETIC_PROVENANCE, make_synthetic_store

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "dfclip-tiny"]
PROV = {"model": "ViT-L-14", "model_config": {}, "pretrained": "openai", "feature": "proj"}


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path)


def rows_of(paths, label=1):
    n = len(paths)
    return {"path": list(paths), "label": [label] * n, "source": [""] * n, "split": [""] * n, "group": [""] * n,
            "size": [10] * n, "mtime_ns": [1] * n}


def one_line(stderr: str) -> str:
    """The one error line (progress lines before it are fine), with no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr and stderr.strip().endswith(lines[0]), stderr
    return lines[0]


@pytest.fixture
def extract_args(tiny_checkpoint):
    def args(*inputs, out):
        return ("extract", *inputs, "--out", out, *TINY, "--pretrained", tiny_checkpoint, "--workers", 0, "--no-progress")
    return args


def embeddings_by_path(out: Path) -> dict[str, np.ndarray]:
    x, meta = store.open(out).load(dtype="float32")
    return dict(zip(meta["path"].to_list(), x))


# ---------------------------------------------------------------- item 1: two input roots


def test_a_second_input_root_is_refused_and_the_first_resumes(tmp_path, extract_args, dfembed):
    for name, seed in (("dsP", 0), ("dsQ", 1)):
        image(tmp_path / name / "real" / "a" / "x.png", seed)
        image(tmp_path / name / "fake" / "b" / f"only_{name}.png", seed + 10)
    out = tmp_path / "S"
    assert dfembed(*extract_args(tmp_path / "dsP", out=out))[0] == 0
    before = embeddings_by_path(out)
    code, _, stderr = dfembed(*extract_args(tmp_path / "dsQ", out=out))
    line = one_line(stderr)
    assert code == 2 and "dsP" in line and "dsQ" in line and "use another --out" in line
    after = embeddings_by_path(out)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[p], before[p]) for p in before)
    code, stdout, _ = dfembed(*extract_args(tmp_path / "dsP", out=out))  # the same root resumes
    assert code == 0 and "0 embedded" in stdout and "2 skipped" in stdout
    # The same folder through a symlink is the same root.
    (tmp_path / "link").symlink_to(tmp_path / "dsP")
    assert dfembed(*extract_args(tmp_path / "link", out=out))[0] == 0


# ---------------------------------------------------------------- item 2: labels follow the inputs


def test_relabelled_manifest_updates_labels_without_re_embedding(tmp_path, extract_args, dfembed, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        image(data / f"img{i}.png", i)
    manifest = data / "m.csv"
    pl.DataFrame({"path": ["img0.png", "img1.png", "img2.png"], "label": [0, 1, 1], "source": ["a", "b", "b"],
                  "split": ["train", "train", "val"], "group": ["", "", ""]}).write_csv(manifest)
    out = tmp_path / "S"
    assert dfembed(*extract_args("--manifest", manifest, out=out))[0] == 0
    before = embeddings_by_path(out)

    pl.DataFrame({"path": ["img0.png", "img1.png", "img2.png"], "label": [1, 1, 0], "source": ["a", "c", "b"],
                  "split": ["train", "train", "test"], "group": ["", "v", ""]}).write_csv(manifest)
    from dfclip.embed import backbone as bb
    monkeypatch.setattr(bb.Backbone, "encode", lambda *a: pytest.fail("an unchanged file was embedded again"))
    code, stdout, stderr = dfembed(*extract_args("--manifest", manifest, out=out))
    assert code == 0, stderr
    assert "0 embedded" in stdout and "3 relabelled" in " ".join(stdout.split())
    meta = store.open(out).meta.sort("path")
    assert meta["label"].to_list() == [1, 1, 0] and meta["source"].to_list() == ["a", "c", "b"]
    assert meta["split"].to_list() == ["train", "train", "test"] and meta["group"].to_list() == ["", "v", ""]
    after = embeddings_by_path(out)
    assert all(np.array_equal(after[p], before[p]) for p in before)  # the stored embeddings, copied
    code, stdout, _ = dfembed(*extract_args("--manifest", manifest, out=out))
    assert code == 0 and "relabelled to match" not in stdout  # settled: nothing more to do


def test_moved_file_is_reported_missing_and_pruned_on_request(tmp_path, extract_args, dfembed):
    images = tmp_path / "images"
    image(images / "real" / "s" / "x.png", 0)
    image(images / "fake" / "s" / "y.png", 1)
    out = tmp_path / "S"
    assert dfembed(*extract_args(images, out=out))[0] == 0
    (images / "fake" / "s" / "x.png").write_bytes((images / "real" / "s" / "x.png").read_bytes())
    os.remove(images / "real" / "s" / "x.png")

    code, stdout, stderr = dfembed(*extract_args(images, out=out))
    assert code == 0 and "1 embedded" in stdout
    assert "1 stored images are gone from the input" in " ".join(stderr.split()) and "real/s/x.png" in stderr
    assert store.open(out).info()["missing_inputs"] == 1
    code, stdout, _ = dfembed("info", out)
    assert code == 0 and "missing" in stdout and "--prune-missing" in " ".join(stdout.split())

    code, stdout, stderr = dfembed(*extract_args(images, out=out), "--prune-missing")
    assert code == 0 and "1 gone from the input pruned" in " ".join(stdout.split()), stdout + stderr
    s = store.open(out)
    assert dict(s.meta.select("path", "label").iter_rows()) == {"fake/s/x.png": 1, "fake/s/y.png": 1}
    assert s.failures.height == 0 and s.info()["missing_inputs"] == 0  # a tombstone is no failure
    assert pl.read_parquet(out / "failures.parquet").height == 0

    # The file coming back is embedded again, not skipped as a logged failure.
    image(images / "real" / "s" / "x.png", 0)
    code, stdout, _ = dfembed(*extract_args(images, out=out))
    assert code == 0 and "1 embedded" in stdout and len(store.open(out)) == 3


# ---------------------------------------------------------------- item 10: read-only stores


def test_read_only_store_with_nothing_to_do_succeeds_and_with_work_says_read_only(tmp_path, extract_args, dfembed,
                                                                                   monkeypatch):
    images = tmp_path / "images"
    image(images / "real" / "s" / "x.png", 0)
    out = tmp_path / "S"
    assert dfembed(*extract_args(images, out=out))[0] == 0
    # Simulate a read-only folder (tests run as root, for whom chmod changes nothing).
    real_open, real_replace = os.open, os.replace

    def no_write_open(path, flags, *a, **k):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    def no_replace(src, dst):
        if str(dst).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", no_write_open)
    monkeypatch.setattr(os, "replace", no_replace)
    code, stdout, stderr = dfembed(*extract_args(images, out=out))
    assert code == 0 and "0 embedded" in stdout, stderr
    image(images / "fake" / "s" / "y.png", 1)
    code, _, stderr = dfembed(*extract_args(images, out=out))
    line = one_line(stderr)
    assert code == 2 and "read-only" in line and "1 images to embed" in line


# ---------------------------------------------------------------- item 13: disk full


@pytest.mark.parametrize("where", ["fsync", "h5py"])
def test_disk_full_is_one_line_and_leaves_no_partial_shard(tmp_path, extract_args, dfembed, monkeypatch, where):
    images = tmp_path / "images"
    for i in range(3):
        image(images / "real" / "s" / f"{i}.png", i)
    out = tmp_path / "S"
    if where == "fsync":
        def full(*a):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(store_writer.os, "fsync", full)
    else:  # how h5py words it: no errno attribute, the errno inside the text
        real = h5py.Group.create_dataset

        def full(self, name, *a, **k):
            if name == "path":
                raise OSError("Can't synchronously write data (file write failed: errno = 28, "
                              "error message = 'No space left on device')")
            return real(self, name, *a, **k)
        monkeypatch.setattr(h5py.Group, "create_dataset", full)
    code, _, stderr = dfembed(*extract_args(images, out=out))
    line = one_line(stderr)
    assert code == 2 and "no space left" in line and str(out) in line and "iB" in line and "re-run" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock-r000"]  # no shard, no temp, no cache
    monkeypatch.undo()
    code, stdout, _ = dfembed(*extract_args(images, out=out))
    assert code == 0 and "3 embedded" in stdout


# ---------------------------------------------------------------- item 5: NaN / inf never stored


def test_writer_logs_non_finite_rows_as_failures(tmp_path):
    x = np.ones((4, 3), np.float32)
    x[1, 0], x[3, 2] = np.nan, 1e6  # 1e6 is finite in float32, inf in float16
    with store.ShardWriter(tmp_path, PROV, dim=3) as w:
        bad = w.add(x, rows_of(["a", "b", "c", "d"]))
    assert bad.tolist() == [False, True, False, True] and w.non_finite == 2
    s = store.open(tmp_path)
    assert s.meta["path"].to_list() == ["a", "c"] and np.isfinite(s.load()[0]).all()
    f = dict(zip(s.failures["path"], s.failures["message"]))
    assert set(s.failures["error"]) == {"non_finite"} and "NaN" in f["b"] and "float32" in f["d"]
    assert s.info()["non_finite"] == 0


def test_extract_never_stores_a_non_finite_embedding(tmp_path, extract_args, dfembed, monkeypatch):
    images = tmp_path / "images"
    for i in range(3):
        image(images / "fake" / "s" / f"{i}.png", i)
    from dfclip.embed import backbone as bb
    real = bb.Backbone.encode

    def nan_first(self, pixels):
        out = real(self, pixels).clone()
        out[0, 0] = float("nan")
        return out
    monkeypatch.setattr(bb.Backbone, "encode", nan_first)
    code, stdout, stderr = dfembed(*extract_args(images, out=tmp_path / "S"))
    assert code == 0 and "2 embedded, 1 failed" in stdout and "NaN or inf" in stderr
    s = store.open(tmp_path / "S")
    assert len(s) == 2 and s.failures["error"].to_list() == ["non_finite"]


def _foreign_shard(root: Path, x: np.ndarray, labels, *, dim=None, name="shard-r000-00000.h5"):
    """A shard written by another tool with plain h5py: no all_finite attribute, no metadata cache."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(x)
    s = h5py.string_dtype()
    with h5py.File(root / name, "w") as f:
        f.attrs["format"], f.attrs["created_ns"], f.attrs["rank"] = fmt.FORMAT_VERSION, 1, 0
        f.attrs["provenance"] = json.dumps({**PROV, "dim": dim or x.shape[1], "dtype": str(x.dtype)})
        f["embeddings"] = x
        for c in ("path", "source", "split", "group"):
            f.create_dataset(c, data=[f"p{i}" if c == "path" else "" for i in range(n)], dtype=s)
        f["label"] = np.asarray(labels, np.int8)
        f["size"] = f["mtime_ns"] = np.zeros(n, np.int64)
        g = f.create_group("failures")
        for c in ("path", "error", "message"):
            g.create_dataset(c, shape=(0,), dtype=s)
        g["size"] = g["mtime_ns"] = np.zeros(0, np.int64)


def test_info_reports_non_finite_rows_of_other_tools(tmp_path, dfembed):
    x = np.ones((5, 4), np.float32)
    x[2, 1], x[4, 0] = np.inf, np.nan
    _foreign_shard(tmp_path, x, [1, 0, 1, 0, 1])
    assert store.open(tmp_path).info()["non_finite"] == 2
    code, stdout, _ = dfembed("info", tmp_path)
    assert code == 0 and "2 rows have NaN or inf" in " ".join(stdout.split())


# ---------------------------------------------------------------- item 15: shards from other tools


def test_bad_label_and_wide_embeddings_are_one_line_everywhere(tmp_path, dfembed, dfhead):
    _foreign_shard(tmp_path / "seven", np.ones((3, 4), np.float32), [1, 7, 0])
    _foreign_shard(tmp_path / "wide", np.ones((3, 6), np.float32), [1, 0, 0], dim=4)
    for folder, words in (("seven", "label 7"), ("wide", "dim 4")):
        for run, args in ((dfembed, ("info", tmp_path / folder)),
                          (dfhead, ("fit", tmp_path / folder, "--runs-dir", tmp_path / "runs"))):
            code, _, stderr = run(*args)
            line = one_line(stderr)
            assert code == 2 and words in line and "shard-r000-00000.h5" in line, (folder, args, line)


# ---------------------------------------------------------------- item 16: the metadata cache


def test_damaged_or_unreadable_cache_is_named_and_safe_to_delete(tmp_path, monkeypatch):
    with store.ShardWriter(tmp_path, PROV, dim=3) as w:
        w.add(np.ones((2, 3), np.float32), rows_of(["a", "b"]))
    [cache] = tmp_path.glob("*.meta-*.parquet")
    cache.write_bytes(b"not parquet")
    with pytest.raises(UserError) as e:
        store.open(tmp_path).meta
    assert cache.name in str(e.value) and "delete it (safe" in str(e.value) and "move it out" not in str(e.value)
    cache.unlink()
    assert store.open(tmp_path).meta["path"].to_list() == ["a", "b"]  # deleting it was indeed safe

    with store.ShardWriter(tmp_path / "p", PROV, dim=3) as w:
        w.add(np.ones((2, 3), np.float32), rows_of(["a", "b"]))

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(pl, "read_parquet", denied)
    with pytest.raises(UserError, match="meta-.*permission denied"):
        store.open(tmp_path / "p").meta


# ---------------------------------------------------------------- item 18: messages of store/


def test_info_on_a_file_and_on_a_store_of_zero_rows(tmp_path, dfembed):
    (tmp_path / "f.h5").write_bytes(b"x")
    code, _, stderr = dfembed("info", tmp_path / "f.h5")
    assert code == 2 and "is a file, not a store folder" in one_line(stderr)
    with store.ShardWriter(tmp_path / "s", PROV, dim=3) as w:
        w.add_failure("a.png", 1, 1, "truncated", "cut")
    code, stdout, _ = dfembed("info", tmp_path / "s")
    assert code == 0 and "0 rows" in " ".join(stdout.split())


# ---------------------------------------------------------------- item 4: the writer locks and checks itself


HOLD_LOCK = """
import sys, time
from dfclip import store
with store.writer_lock(sys.argv[1], 0):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_writer_takes_the_lock_and_checks_the_model_itself(tmp_path):
    root = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            make_synthetic_store(root, n=10, dim=4)  # synthetic stores used to write unlocked
    finally:
        holder.kill()
        holder.wait()
    assert not list(root.glob("shard-*"))
    make_synthetic_store(root, n=10, dim=4)
    with store.ShardWriter(root, SYNTHETIC_PROVENANCE, dim=4):  # a writer in this process ...
        with pytest.raises(UserError, match="another dfembed process"):  # ... excludes a second one
            store.ShardWriter(root, SYNTHETIC_PROVENANCE, dim=4)
    with pytest.raises(UserError, match="use another --out"):  # another model, refused before writing
        store.ShardWriter(root, PROV, dim=4)
    assert len(store.open(root)) == 10


# ---------------------------------------------------------------- item 12: symlink loops


def test_symlink_loops_are_skipped_and_logged(tmp_path, capsys):
    image(tmp_path / "real" / "a.png", 0)
    (tmp_path / "real" / "self.png").symlink_to(tmp_path / "real" / "self.png")
    (tmp_path / "real" / "loop").symlink_to(tmp_path / "real" / "loop")
    (tmp_path / "p").symlink_to(tmp_path / "q")
    (tmp_path / "q").symlink_to(tmp_path / "p")
    rows = scan_folder(tmp_path)
    assert rows["path"].to_list() == ["real/a.png"]
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped 4 symlink loops" in err and "real/loop" in err


# ---------------------------------------------------------------- item 19: killed predicts


def test_temp_store_of_a_killed_predict_is_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    from dfclip import pipeline

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f"{pipeline.TEMP_PREFIX}{dead.pid}-abc"
    (killed / "store").mkdir(parents=True)
    running = tmp_path / f"{pipeline.TEMP_PREFIX}{os.getpid()}-def"
    running.mkdir()
    other = tmp_path / "something-else"
    other.mkdir()
    assert pipeline.remove_dead_temps() == [killed]
    assert not killed.exists() and running.exists() and other.exists()


# ---------------------------------------------------------------- the documented plain-h5py reading


def test_the_documented_plain_h5py_reading_matches_the_reader(tmp_path, monkeypatch):
    """docs/store-format.md's recipe, run as written, on a store with every rule in play."""
    root = tmp_path / "embeddings"
    rng = np.random.default_rng(0)
    x = lambda n: rng.standard_normal((n, 4)).astype(np.float32)
    with store.ShardWriter(root, PROV, dim=4, shard_size=3) as w:
        w.add(x(5), rows_of(["a", "b", "c", "d", "e"]))
        w.add_failure("f", 1, 1, "truncated", "cut")
    with store.ShardWriter(root, PROV, dim=4, rank=1) as w:
        w.add(x(2), rows_of(["b", "g"], label=0))  # b re-embedded (and relabelled) by rank 1
        w.add_failure("c", -1, -1, fmt.REMOVED, "pruned")  # c dropped
    with store.ShardWriter(root, PROV, dim=4, import_id="killed", import_shards=3) as w:
        w.add(x(2), rows_of(["a", "h"], label=-1))  # one of three shards: an unfinished import
    doc = (REPO / "docs" / "store-format.md").read_text()
    recipe = doc.split("## Reading a store with plain h5py")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(recipe, scope)
    want_x, meta = store.open(root).load()
    np.testing.assert_array_equal(scope["X"], want_x)
    np.testing.assert_array_equal(scope["y"], meta["label"].to_numpy())
    assert sorted(meta["path"]) == ["a", "b", "d", "e", "g"] and store.open(root).failures["path"].to_list() == ["f"]


# ---------------------------------------------------------------- splits, failures of deleted files, case


def test_unknown_split_values_are_refused_at_extract_or_mapped(tmp_path, extract_args, dfembed):
    data = tmp_path / "data"
    for i in range(4):
        image(data / f"img{i}.png", i)
    manifest = data / "m.csv"
    pl.DataFrame({"path": [f"img{i}.png" for i in range(4)], "label": [0, 1, 0, 1],
                  "split": ["training", "training", "val", "Validation"]}).write_csv(manifest)
    out = tmp_path / "S"
    code, _, stderr = dfembed(*extract_args("--manifest", manifest, out=out))
    line = one_line(stderr)
    assert code == 2 and "'training' (2)" in line and "--split-map training=train" in line and not out.exists()
    code, _, stderr = dfembed(*extract_args("--manifest", manifest, out=out), "--split-map", "Training=train")
    assert code == 0, stderr
    assert store.open(out).meta.sort("path")["split"].to_list() == ["train", "train", "val", "val"]


def test_failures_of_deleted_files_count_as_gone_and_go_with_prune_missing(tmp_path, extract_args, dfembed):
    images = tmp_path / "images"
    image(images / "real" / "s" / "x.png", 0)
    (images / "fake" / "s").mkdir(parents=True)
    (images / "fake" / "s" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "S"
    assert dfembed(*extract_args(images, out=out))[0] == 0
    assert store.open(out).failures["path"].to_list() == ["fake/s/broken.png"]
    os.remove(images / "fake" / "s" / "broken.png")

    code, _, stderr = dfembed(*extract_args(images, out=out))
    assert code == 0 and "1 stored images are gone from the input" in " ".join(stderr.split())
    assert "fake/s/broken.png" in stderr
    assert store.open(out).info()["failures"] == 1  # still listed until pruned, like a row

    code, stdout, stderr = dfembed(*extract_args(images, out=out), "--prune-missing")
    assert code == 0 and "1 gone from the input pruned" in " ".join(stdout.split()), stdout + stderr
    s = store.open(out)
    assert s.failures.height == 0 and s.info()["failures"] == 0 and len(s) == 1
    assert pl.read_parquet(out / "failures.parquet").height == 0
    code, stdout, _ = dfembed("info", out, "--json")
    assert code == 0 and json.loads(stdout)["failures"] == 0


def test_info_warns_about_sources_differing_only_in_case(tmp_path, dfembed):
    rows = rows_of(["a", "b", "c"])
    rows["source"] = ["GAN", "gan", "sd"]
    with store.ShardWriter(tmp_path, PROV, dim=3) as w:
        w.add(np.ones((3, 3), np.float32), rows)
    assert store.open(tmp_path).info()["source_case_clashes"] == [["GAN", "gan"]]
    code, stdout, _ = dfembed("info", tmp_path)
    text = " ".join(stdout.split())
    assert code == 0 and "differ only in case" in text and "GAN / gan" in text


# ---------------------------------------------------------------- the index cache is best effort


def test_index_cache_that_cannot_be_written_is_skipped_and_its_temp_removed(tmp_path, monkeypatch):
    with store.ShardWriter(tmp_path, PROV, dim=3) as w:
        w.add(np.ones((2, 3), np.float32), rows_of(["a", "b"]))
    real = pl.DataFrame.write_parquet

    def full(self, file, *a, **k):
        if Path(file).name.startswith(".index-"):
            Path(file).write_bytes(b"PAR1 half")  # what a full disk leaves: a partial temp
            raise pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")
        return real(self, file, *a, **k)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    s = store.open(tmp_path)
    assert s.meta["path"].to_list() == ["a", "b"] and s.info()["rows"] == 2
    assert not list(tmp_path.glob(".index-*")) and not list(tmp_path.glob("index-*"))


def test_read_only_store_without_index_cache_is_read_without_writing(tmp_path, monkeypatch, dfembed):
    with store.ShardWriter(tmp_path, PROV, dim=3) as w:
        w.add(np.ones((2, 3), np.float32), rows_of(["a", "b"]))
    for cache in tmp_path.glob("index-*.parquet"):
        cache.unlink()
    real_open, real_unlink = os.open, Path.unlink

    def read_only(path, flags, *a, **k):  # every write under the store fails, as on a read-only mount
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)

    def no_unlink(self, *a, **k):
        if str(self).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, *a, **k)

    def no_parquet(self, file, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(file))
    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(Path, "unlink", no_unlink)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", no_parquet)
    s = store.open(tmp_path)
    assert s.meta["path"].to_list() == ["a", "b"] and s.load()[0].shape == (2, 3)
    code, stdout, stderr = dfembed("info", tmp_path)
    assert code == 0 and "Traceback" not in stderr, stderr


def test_failures_view_on_a_full_disk_is_one_line_and_written_by_the_next_run(tmp_path, extract_args, dfembed,
                                                                               monkeypatch):
    images = tmp_path / "images"
    image(images / "real" / "s" / "x.png", 0)
    out = tmp_path / "S"
    real = pl.DataFrame.write_parquet

    def full(self, file, *a, **k):
        if Path(file).name.startswith(".failures"):
            Path(file).write_bytes(b"PAR1 half")
            raise pl.exceptions.ComputeError("parquet: underlying IO error: No space left on device (os error 28)")
        return real(self, file, *a, **k)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    code, _, stderr = dfembed(*extract_args(images, out=out))
    line = one_line(stderr)
    assert code == 2 and "failures.parquet" in line and "No space left" in line and "re-run" in line
    assert not list(out.glob(".failures*")) and len(store.open(out)) == 1  # the shard is complete
    monkeypatch.undo()
    code, stdout, _ = dfembed(*extract_args(images, out=out))
    assert code == 0 and "0 embedded" in stdout and (out / "failures.parquet").is_file()
