"""Synthetic stores with a learnable fake/real signal, for tests and benchmarks (no images needed).

The embeddings are random: a figure measured on them says nothing about real detection quality.
"""

from __future__ import annotations

import os

import numpy as np

from dfclip.store import format as fmt
from dfclip.store.writer import ShardWriter

SYNTHETIC_PROVENANCE = {"model": "synthetic", "model_config": {}, "pretrained": "none", "feature": "proj",
                        "preprocess": {}, "note": "random embeddings with a planted signal"}


def make_synthetic_store(root: str | os.PathLike, *, n: int = 4000, dim: int = 64, fake_rate: float = 0.8,
                         signal: float = 1.5, fake_sources: tuple[str, ...] = ("gan", "diffusion", "faceswap"),
                         real_sources: tuple[str, ...] = ("ffhq",), frames_per_group: int = 4,
                         shard_size: int = 16384, dtype: str = "float16", seed: int = 0) -> str:
    """Write n rows: label ~ Bernoulli(fake_rate); fakes are shifted by `signal` along a random
    direction per source (so each source is learnable, and held-out sources partly transfer).

    The embeddings are drawn and written in float32 blocks of BLOCK_ROWS rows (the same values
    whatever the block size): a 1M x 768 store then peaks at one block, not at a 1M x 768 array.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < fake_rate).astype(np.int8)
    src = np.where(y == 1, rng.choice(fake_sources, n), rng.choice(real_sources, n))
    shift = _source_shifts(rng, dim, fake_sources, signal)
    # Videos never mix labels or sources: frames of one group share them, like real video datasets.
    order = np.lexsort((np.arange(n), src))
    group = np.empty(n, dtype=object)
    group[order] = [f"vid{i // frames_per_group:07d}" for i in range(n)]
    with ShardWriter(root, SYNTHETIC_PROVENANCE, dim=dim, dtype=dtype, shard_size=shard_size) as w:
        for a in range(0, n, BLOCK_ROWS):
            b = min(n, a + BLOCK_ROWS)
            m = b - a
            x = rng.standard_normal((m, dim), dtype=np.float32)
            for s, direction in shift.items():
                x[src[a:b] == s] += direction
            w.add(x, {"path": [f"img/{i:08d}.jpg" for i in range(a, b)], "label": y[a:b], "source": src[a:b],
                      "split": [""] * m, "group": group[a:b],
                      "size": np.zeros(m, np.int64), "mtime_ns": np.zeros(m, np.int64)})
    return str(root)


BLOCK_ROWS = 65536  # rows drawn at once: 192 MiB of float32 at dim 768


def _source_shifts(rng: np.random.Generator, dim: int, fake_sources: tuple[str, ...], signal: float
                   ) -> dict[str, np.ndarray]:
    """signal x a unit direction per fake source (float32), half shared by all sources, half its own."""
    shared = rng.normal(size=dim)
    shared /= np.linalg.norm(shared)
    out = {}
    for s in fake_sources:
        own = rng.normal(size=dim)
        own /= np.linalg.norm(own)
        out[s] = (signal * (shared + own) / np.linalg.norm(shared + own)).astype(np.float32)
    return out


def rewrite_store(src: str | os.PathLike, dst: str | os.PathLike, *, keep: np.ndarray | None = None,
                  provenance: dict | None = None, **columns) -> str:
    """A copy of store `src` as a new store `dst`: only the rows `keep` (bool mask in storage
    order), optionally with other provenance or replaced metadata columns (e.g. label=...).
    Used to cut validation stores by video and to build bad inputs for tests."""
    from dfclip.store.reader import Store

    s = Store(src)
    x, meta = s.load()
    keep = np.ones(meta.height, bool) if keep is None else keep
    cols = {c: (np.asarray(columns[c]) if c in columns else meta[c].to_numpy())[keep]
            for c in fmt.ROW_COLUMNS}
    prov = {k: v for k, v in (provenance or s.provenance).items() if k not in ("dim", "dtype")}
    blocks = None
    if prov.get("layers"):  # the stored blocks travel with their rows
        blocks = np.stack([s.load(meta, feature=f"block{b}")[0] for b in prov["layers"]], axis=1)[keep]
    with ShardWriter(dst, prov, dim=s.dim, dtype=str(x.dtype)) as w:
        w.add(x[keep], cols, blocks)
    return str(dst)
