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

