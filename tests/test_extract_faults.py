"""`dfembed extract` as real processes: SIGKILL and resume (with the lock across processes), two torchrun ranks.

Each test compares against an uninterrupted one-process run of the same images, computed
in-process, so "same rows, same embeddings" is checked row by row.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from dfclip import store
from dfclip.embed import EmbedConfig, extract
from dfclip.errors import UserError

BIN = Path(sys.executable).parent
DFEMBED = shutil.which("dfembed", path=str(BIN)) or shutil.which("dfembed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n small labelled PNGs under folder/{real,fake}/src; returns their relative paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rel = f"{'fake' if i % 3 else 'real'}/src{i % 2}/img{i:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / rel)
        paths.append(rel)
    return sorted(paths)


def raw_rows(out: Path) -> list[tuple[str, np.ndarray]]:
    """Every (path, embedding) row in every committed shard, read with plain h5py (duplicates included)."""
    rows = []
    for shard in sorted(out.glob("shard-r*-*.h5")):
        with h5py.File(shard, "r") as f:
            rows += list(zip(f["path"].asstr()[:], f["embeddings"][:].astype(np.float32)))
    return rows


def live(out: Path) -> dict[str, np.ndarray]:
    x, meta = store.open(out).load(dtype="float32")
    return dict(zip(meta["path"].to_list(), x))


def assert_same_rows(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for p in want:  # fp16 storage; batch composition may move the last bit
        np.testing.assert_allclose(got[p], want[p], rtol=1e-3, atol=1e-3)


def test_resume_after_sigkill_then_noop_then_changed_file(tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    paths = make_images(images, 240)
    model = ["--model", "dfclip-tiny", "--pretrained", tiny_checkpoint]
    ref = tmp_path / "reference"
    extract(images, ref, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0), progress=False)
    want = live(ref)

    # One image per batch and two per shard: every shard is an fsync'd file, so the run is slow
    # enough to be killed in the middle, while a decode worker is alive.
    out = tmp_path / "store"
    cmd = [DFEMBED, "extract", images, "--out", out, *model, "--batch-size", 1, "--shard-size", 2,
           "--workers", 1, "--no-progress"]
    # No pipes: waiting on a pipe would also wait for the killed run's orphaned worker to exit.
    proc = subprocess.Popen(list(map(str, cmd)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len(list(out.glob("shard-r000-*.h5"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # A second writer (this test process) is refused while the run holds the store.
    with pytest.raises(UserError, match=f"another dfembed process \\(pid {proc.pid}\\)"):
        with store.writer_lock(out, 0):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = raw_rows(out)
    assert 0 < len(before) < len(paths)

    # The killed run's decode worker lives on for seconds; it must not keep the store locked.
    with store.writer_lock(out, 0):
        pass
    rep = extract(images, out, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=1), progress=False)
    assert (rep["embedded"], rep["skipped"]) == (len(paths) - len(before), len(before))
    rows = raw_rows(out)
    assert len(rows) == len(paths) and len({p for p, _ in rows}) == len(paths)  # none missing, none twice
    assert_same_rows(dict(rows), want)
    assert_same_rows(live(out), want)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # the killed run's half-written shard is gone

    # A re-run with nothing new embeds nothing and writes no shard.
    shards = sorted(out.glob("shard-*.h5"))
    rep = extract(images, out, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0), progress=False)
    assert (rep["embedded"], rep["failed"], rep["skipped"]) == (0, 0, len(paths))
    assert sorted(out.glob("shard-*.h5")) == shards

    # A file that changed (size and mtime) is embedded again; its new row replaces the old one.
    changed = images / paths[5]
    Image.fromarray(np.full((50, 30, 3), 200, np.uint8)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    rep = extract(images, out, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0), progress=False)
    assert (rep["embedded"], rep["skipped"]) == (1, len(paths) - 1)
    extract(images, ref, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0), progress=False)
    want = live(ref)
    assert not np.allclose(want[paths[5]], dict(rows)[paths[5]], atol=1e-2)  # the change is visible
    assert_same_rows(live(out), want)
    assert store.open(out).meta.height == len(paths)


def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    paths = make_images(images, 30, seed=1)
    one = tmp_path / "one"
    extract(images, one, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0), progress=False)

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", DFEMBED,
           "extract", images, "--out", two, "--model", "dfclip-tiny", "--pretrained", tiny_checkpoint,
           "--workers", 0, "--shard-size", 4, "--no-progress"]
    res = subprocess.run(list(map(str, cmd)), env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 0/2] done: 15 embedded" in res.stdout and "[rank 1/2] done: 15 embedded" in res.stdout

    by_rank = {0: [], 1: []}
    for shard in two.glob("shard-r*-*.h5"):
        with h5py.File(shard, "r") as f:
            by_rank[int(f.attrs["rank"])] += list(f["path"].asstr()[:])
    assert sorted(by_rank[0]) == paths[0::2] and sorted(by_rank[1]) == paths[1::2]  # disjoint, deterministic
    assert_same_rows(live(two), live(one))
    assert store.open(two).meta.sort("path")["label"].to_list() == store.open(one).meta.sort("path")["label"].to_list()



# ---------------------------------------------------------------- a full disk, for real


@pytest.fixture
def small_disk(tmp_path):
    """A 120 kB tmpfs mounted at tmp_path/disk; skipped where mounting is not allowed (needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def run_dfembed(*args) -> subprocess.CompletedProcess:
    return subprocess.run([DFEMBED, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)


def test_full_disk_during_extract_is_one_line_and_resumes(tmp_path, tiny_checkpoint, small_disk):
    images = tmp_path / "images"
    paths = make_images(images, 60)
    out = small_disk / "store"
    res = run_dfembed("extract", images, "--out", out, "--model", "dfclip-tiny", "--pretrained", tiny_checkpoint,
                      "--workers", 0, "--no-progress", "--shard-size", 16, "--layers=all")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "no space left" in errors[0] and "re-run" in errors[0]
    # No partial shard and no temp file; every shard left is complete.
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    for shard in out.glob("shard-*.h5"):
        with h5py.File(shard, "r") as f:
            assert f["embeddings"].shape[0] == f["path"].shape[0] > 0
    # Reading the store on the full disk works (the index cache is skipped).
    assert store.open(out).info()["rows"] == len(store.open(out).meta) > 0
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    config = EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0, shard_size=16, layers="all")
    rep = extract(images, out, config, progress=False)
    assert rep["skipped"] > 0 and sorted(store.open(out).meta["path"].to_list()) == paths
    assert (out / "failures.parquet").is_file()


def test_read_only_mount_without_index_cache_is_read(tmp_path, tiny_checkpoint, small_disk):
    images = tmp_path / "images"
    make_images(images, 6)
    out = small_disk / "store"
    extract(images, out, EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=0), progress=False)
    for cache in out.glob("index-*.parquet"):
        cache.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = sorted(p.name for p in out.iterdir())
    res = run_dfembed("info", out, "--json")
    assert res.returncode == 0 and '"rows": 6' in res.stdout, res.stderr[-3000:]
    s = store.open(out)
    assert s.load()[0].shape[0] == 6
    assert sorted(p.name for p in out.iterdir()) == before


# ---------------------------------------------------------------- a decode worker killed


def test_a_killed_decode_worker_is_one_line_and_the_run_resumes(tmp_path, tiny_checkpoint, monkeypatch):
    import importlib

    extract_module = importlib.import_module("dfclip.embed.extract")
    images = tmp_path / "images"
    paths = make_images(images, 12)
    real_getitem = extract_module.ImageFiles.__getitem__

    def oom_killed(self, i):
        if self.path(i) == paths[9]:
            os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does to a worker
        return real_getitem(self, i)
    monkeypatch.setattr(extract_module.ImageFiles, "__getitem__", oom_killed)
    config = EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=1, batch_size=4, shard_size=4)
    out = tmp_path / "S"
    with pytest.raises(UserError) as err:
        extract(images, out, config, progress=False)
    message = str(err.value)
    assert "\n" not in message and "decode worker" in message and "out-of-memory" in message
    assert "re-run the same command" in message and "--workers" in message
    kept = len(store.open(out)) if store.list_shards(out) else 0  # batches that reached the writer stay

    monkeypatch.undo()
    rep = extract(images, out, config, progress=False)
    assert (rep["skipped"], rep["embedded"]) == (kept, len(paths) - kept)
    assert sorted(store.open(out).meta["path"].to_list()) == paths
