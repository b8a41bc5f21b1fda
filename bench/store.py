"""Loading a multi-shard store into memory vs reading the same bytes from one contiguous dataset.

    python bench/store.py                       # 200k and 1M x 768 float16 in 16k-row shards (13 and 62)
    python bench/store.py --rows 50000 --json out.json --compression

Each size is written under --dir (default: a temporary folder; 1M rows need ~3.1 GB there: the store
and the contiguous copy), measured and deleted before the next. "store.open().load()" is what a
training run does: open (list the shards, read the cached newest-wins index) and load every row.
The first open of a new set of shards resolves newest-wins itself and writes that index; it is
timed apart ("first open"). The baseline is one h5py read_direct of the same array from one
contiguous dataset (the array alone, no metadata).

Each reader runs once as a warm-up, then they take turns --repeats times and each keeps its best
time (taking turns spreads noise from other processes over all of them). The page cache cannot be
dropped without root, so these are warm-cache numbers: they measure the reading code
(shard opens, metadata scan, read_direct), not the disk. --compression also measures what
gzip / lzf would save on the same float16 data and what they cost in read speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from dfclip import store

PROVENANCE = {"model": "bench", "feature": "proj"}


def clip_like(rows: int, dim: int, seed: int = 0, block: int = 16384):
    """Blocks of float16 rows shaped like raw CLIP image embeddings: a shared offset per dim,
    per-dim scales spread over a decade and a few large outlier dims, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(0, 0.3, dim)
    scale = np.exp(rng.normal(-1.0, 0.6, dim))
    scale[rng.choice(dim, 4, replace=False)] *= 10  # CLIP towers have a few high-magnitude dims
    for a in range(0, rows, block):
        n = min(block, rows - a)
        yield (offset + scale * rng.standard_normal((n, dim))).astype(np.float16)


def build(root: Path, rows: int, dim: int, shard_size: int) -> Path:
    """The store (shards of shard_size rows) and one contiguous dataset holding the same bytes."""
    baseline = root / "contiguous.h5"
    with store.ShardWriter(root / "store", PROVENANCE, dim=dim, dtype="float16", shard_size=shard_size) as w, \
            h5py.File(baseline, "w") as f:
        ds = f.create_dataset("embeddings", shape=(rows, dim), dtype=np.float16)  # contiguous layout
        a = 0
        for x in clip_like(rows, dim):
            n = len(x)
            w.add(x, {"path": [f"img/{i:07d}.png" for i in range(a, a + n)], "label": np.tile([0, 1], n)[:n],
                      "source": ["gen"] * n, "split": ["train"] * n, "group": [""] * n,
                      "size": np.full(n, 1000), "mtime_ns": np.full(n, 1)})
            ds[a:a + n] = x
            a += n
    return baseline


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function; they run in turns after one warm-up call each."""
    for fn in fns.values():
        fn()  # warm-up: fills the page cache
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def read_contiguous(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        ds = f["embeddings"]
        out = np.empty(ds.shape, ds.dtype)
        ds.read_direct(out)
    return out


def compression_table(x: np.ndarray, root: Path, repeats: int) -> list[dict]:
    """Size and read time of x stored chunked as the writer does, with each filter."""
    chunks = (max(1, (1 << 20) // (x.shape[1] * 2)), x.shape[1])
    filters = {"none": {}, "gzip-4": {"compression": "gzip", "compression_opts": 4},
               "gzip-4+shuffle": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
               "lzf": {"compression": "lzf"}, "lzf+shuffle": {"compression": "lzf", "shuffle": True}}
    rows = []
    for name, kw in filters.items():
        path = root / f"c-{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x, chunks=chunks, **kw)
        with h5py.File(path, "r") as f:
            ds = f["x"]
            stored = ds.id.get_storage_size()
            out = np.empty(x.shape, x.dtype)
            t = best_of({name: lambda: ds.read_direct(out)}, repeats)[name]
        rows.append({"filter": name, "bytes": stored, "seconds": t})
    base = rows[0]
    for r in rows:
        r["saved"] = 1 - r["bytes"] / base["bytes"]
        r["slowdown"] = r["seconds"] / base["seconds"]
    return rows


def drop_index(root: Path) -> None:
    for p in root.glob("index-*.parquet"):
        p.unlink()


def measure(rows: int, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        baseline = build(root, rows, args.dim, args.shard_size)
        print(f"built {rows} x {args.dim} in {time.perf_counter() - t:.0f}s")
        nbytes = rows * args.dim * 2
        s = store.open(root / "store")
        s.meta  # noqa: B018 - resolved (and its index cached) here, so "load" times the embeddings alone
        t = best_of({"base": lambda: read_contiguous(baseline), "load": lambda: s.load(),
                     "open_load": lambda: store.open(root / "store").load(),
                     "first_open": lambda: (drop_index(root / "store"), store.open(root / "store").meta)},
                    args.repeats)
        X, _ = s.load()
        assert np.array_equal(X, read_contiguous(baseline))  # same bytes, or the comparison is meaningless
        del X
        result = {
            "rows": rows, "dim": args.dim, "shard_size": args.shard_size, "shards": len(s.shards),
            "bytes": nbytes, "cache": "warm", "repeats": args.repeats, "read_threads": store.reader.READ_THREADS,
            "contiguous_s": t["base"], "store_load_s": t["load"], "store_open_load_s": t["open_load"],
            "first_open_meta_s": t["first_open"],
            "ratio_load": t["base"] / t["load"], "ratio_open_load": t["base"] / t["open_load"],
        }
        print(f"\n{rows} x {args.dim} float16 = {nbytes / 1e6:.0f} MB, {len(s.shards)} shards of "
              f"{args.shard_size} rows; warm page cache, best of {args.repeats}, {result['read_threads']} read threads")
        print(f"{'reader':<40}{'seconds':>9}{'GB/s':>8}{'vs contiguous':>15}")
        for name, sec in (("one contiguous dataset (h5py)", t["base"]), ("store.load() (meta resolved)", t["load"]),
                          ("store.open().load()", t["open_load"])):
            print(f"{name:<40}{sec:>9.3f}{nbytes / sec / 1e9:>8.2f}{t['base'] / sec:>15.2f}")
        print(f"{'first open of new shards: resolve + index':<40}{t['first_open']:>9.3f}")
        print(f"ratio store.open().load() / contiguous: {result['ratio_open_load']:.2f} (target >= 0.8); "
              f"store.load() alone: {result['ratio_load']:.2f}")
        if args.compression:
            x = next(clip_like(min(rows, 32768), args.dim, block=32768))
            result["compression"] = compression_table(x, root, args.repeats)
            print(f"\ncompression of {len(x)} x {args.dim} CLIP-like float16 rows, 1 MiB chunks")
            print(f"{'filter':<16}{'MB':>8}{'saved':>8}{'read s':>9}{'slowdown':>10}")
            for r in result["compression"]:
                print(f"{r['filter']:<16}{r['bytes'] / 1e6:>8.2f}{r['saved']:>8.1%}{r['seconds']:>9.4f}{r['slowdown']:>9.1f}x")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="200000,1000000", help="comma list of sizes, measured in turn")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--shard-size", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    p.add_argument("--compression", action="store_true", help="also measure gzip / lzf on the first 32k rows")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()

    results = [measure(int(n), args) for n in str(args.rows).split(",")]
    if args.json:
        args.json.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))


if __name__ == "__main__":
    main()
