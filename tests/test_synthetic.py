"""store.synthetic: stores drawn in float32 blocks, so memory stays at one block whatever the rows."""

from __future__ import annotations

import tracemalloc

import numpy as np

from dfclip import store
from dfclip.store import synthetic


def _load(path) -> tuple[np.ndarray, list]:
    s = store.open(path)
    x, meta = s.load()
    return x, meta.select("path", "label", "source", "group").rows()


def test_the_rows_do_not_depend_on_the_block_size(tmp_path, monkeypatch):
    whole = synthetic.make_synthetic_store(tmp_path / "whole", n=3000, dim=8, seed=4)
    monkeypatch.setattr(synthetic, "BLOCK_ROWS", 700)
    blocks = synthetic.make_synthetic_store(tmp_path / "blocks", n=3000, dim=8, seed=4)
    (xa, ma), (xb, mb) = _load(whole), _load(blocks)
    assert np.array_equal(xa, xb) and ma == mb


def test_memory_peaks_at_a_block_not_at_the_whole_array(tmp_path, monkeypatch):
    n, dim = 40_000, 64
    monkeypatch.setattr(synthetic, "BLOCK_ROWS", 2048)
    tracemalloc.start()
    synthetic.make_synthetic_store(tmp_path / "s", n=n, dim=dim, shard_size=4096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * dim * 4, f"peak {peak / 2**20:.1f} MiB: as much as the whole float32 array"


def test_fakes_carry_the_planted_signal(tmp_path):
    x, meta = _load(synthetic.make_synthetic_store(tmp_path / "s", n=4000, dim=16, signal=3.0, seed=1))
    labels = np.array([row[1] for row in meta])
    # fakes are shifted by 3 along a unit direction per source: their mean is far from the reals' (~0)
    gap = np.linalg.norm(x[labels == 1].astype(np.float64).mean(0) - x[labels == 0].astype(np.float64).mean(0))
    assert 2.0 < gap < 3.2
    assert 0.75 < labels.mean() < 0.85
