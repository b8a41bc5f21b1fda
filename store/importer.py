"""Import features someone already extracted (SP_CUP-style HDF5 + labels CSV) into a store.

The SP_CUP reference code (Purdue-M2/SP_CUP) saves `model.encode_image` outputs of OpenAI's
ViT-L/14 as one N x 768 dataset (`train_features` in cup_train.h5, `test_features` in
cup_val.h5) whose rows follow a CSV with columns `Image Path` and `Target` (1 = fake, as in
the lab's AI-Face CSVs; its training code treats Target 1 as the positive class). This turns
such a pair into ordinary shards, so those features are not paid for twice.

Nothing here can check which model made the features: model, pretrained and feature are
recorded as the user declared them, with `declared: true` and the source file's sha256.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import h5py
import numpy as np
import polars as pl

from dfclip.store import format as fmt
from dfclip.errors import UserError
from dfclip.store.writer import ShardWriter

# Our column -> the SP_CUP CSV's column; --column path=NAME etc. override.
DEFAULT_COLUMNS = {"path": "Image Path", "label": "Target"}
OPTIONAL_COLUMNS = tuple(c for c in fmt.INPUT_COLUMNS if c not in DEFAULT_COLUMNS)  # source, split, group


def _datasets(f: h5py.File) -> list[str]:
    found = []
    f.visititems(lambda name, obj: found.append(f"{name} {obj.shape}") if isinstance(obj, h5py.Dataset) else None)
    return found


def _read_csv(csv: Path, columns: dict[str, str]) -> pl.DataFrame:
    try:
        table = pl.read_csv(csv, infer_schema=False)  # all strings: paths and labels are not guessed at
    except (pl.exceptions.PolarsError, OSError) as e:
        raise UserError(f"cannot read CSV {csv}: {str(e).strip().splitlines()[0]}; check the file") from None
    wanted = {**DEFAULT_COLUMNS, **columns}
    missing = [f"{theirs!r} (for {ours})" for ours, theirs in wanted.items() if theirs not in table.columns]
    if missing:
        raise UserError(f"CSV {csv.name} has no column {', '.join(missing)}; available: {', '.join(table.columns)}; "
                        f"map them with --column OURS=NAME, e.g. --column 'path=Image Path'")
    return table


def import_h5(
    h5_file: str | os.PathLike,
    csv_file: str | os.PathLike,
    *,
    dataset: str = "train_features",
    out: str | os.PathLike = "embeddings",
    columns: dict[str, str] | None = None,
    target_means: str = "fake",
    split: str = "",
    split_map: dict[str, str] | None = None,
    model: str = "ViT-L-14",
    pretrained: str = "openai",
    feature: str = "proj",
    dtype: str = "float16",
    shard_size: int = 16384,
) -> dict:
    """Write the rows of `dataset` in `h5_file`, labelled by `csv_file` (same order), as shards in `out`.

    columns: our name -> CSV column, for path, label and optionally source, split, group
        (default {"path": "Image Path", "label": "Target"}).
    target_means: "fake" (Target 1 = fake, SP_CUP's convention) or "real" (1 = real).
    split: split of every row when no split column is mapped (e.g. "train" for cup_train.h5).
    split_map: other split values -> train / val / test ({"training": "train"}); any split besides those,
        valid / validation or empty is refused (store.format.parse_splits).
    Features are streamed in blocks of `shard_size` rows. Returns a summary dict: "rows" counts the
    rows now live (a path given twice is one row, its last), "file_rows" the rows of the file.
    """
    h5_path, csv_path, columns = Path(h5_file), Path(csv_file), dict(columns or {})
    unknown = sorted(set(columns) - {*DEFAULT_COLUMNS, *OPTIONAL_COLUMNS})
    if unknown:
        raise UserError(f"cannot map column {', '.join(unknown)}; map one of path, label, source, split, group")
    for p, what in ((h5_path, "features file"), (csv_path, "labels CSV")):
        if not p.is_file():
            raise UserError(f"{what} {p} does not exist; check the path")
    fmt.check_target_means(target_means)
    if feature not in ("proj", "pre"):
        raise UserError(f"--feature must be 'proj' (CLIP embedding) or 'pre' (before the projection), got {feature!r}")
    table = _read_csv(csv_path, columns)
    names = {**DEFAULT_COLUMNS, **columns}
    paths = table[names["path"]].fill_null("")
    if (paths.str.strip_chars() == "").any():
        raise UserError(f"{int((paths.str.strip_chars() == '').sum())} rows of {csv_path.name} have an empty path; "
                        "fill them in (the rows must stay in the features' order)")
    labels = fmt.parse_labels(table[names["label"]], target_means, where="CSV").to_numpy()
    n = table.height
    meta = {
        "path": paths.to_list(), "label": labels,
        **{c: table[names[c]].fill_null("").to_list() if c in names else [split if c == "split" else ""] * n
           for c in OPTIONAL_COLUMNS},
        # No image files were read: size and mtime are unknown (-1), so a later `dfembed extract`
        # of the same images re-embeds them and its rows win.
        "size": np.full(n, -1, np.int64), "mtime_ns": np.full(n, -1, np.int64),
    }

    if "split" in names:
        meta["split"] = fmt.parse_splits(meta["split"], split_map, where="CSV")
    else:
        try:
            meta["split"] = fmt.parse_splits([split], split_map) * n
        except UserError:
            raise UserError(f"--split {split!r} is not train, val (valid, validation), test or empty; "
                            "`dfhead fit` would never train on such rows: pass one of those") from None

    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise UserError(f"{h5_path} is not a readable HDF5 file ({e}); pass the features .h5") from None
    with f:
        ds = f.get(dataset)
        if not isinstance(ds, h5py.Dataset):
            raise UserError(f"{h5_path.name} has no dataset {dataset!r}; available: {', '.join(_datasets(f)) or 'none'}; "
                            "pass one with --dataset")
        if ds.ndim != 2 or ds.dtype.kind != "f":
            raise UserError(f"dataset {dataset!r} is {ds.dtype} {ds.shape}, not an N x D float matrix; pass the features")
        if ds.shape[0] != n:
            raise UserError(f"dataset {dataset!r} has {ds.shape[0]} rows but {csv_path.name} has {n}; "
                            "pass the CSV the features were extracted from (same rows, same order)")
        dim = int(ds.shape[1])
        provenance = {
            "model": model, "pretrained": pretrained, "feature": feature, "model_config": None, "preprocess": None,
            "declared": True,
            "imported_from": {"file": h5_path.name, "sha256": fmt.sha256_file(h5_path), "dataset": dataset,
                              "source_dtype": str(ds.dtype), "csv": csv_path.name},
        }
        # All or nothing: every shard carries the import's id and shard count, and readers ignore the
        # import until its last shard has landed, so a killed import never looks complete.
        blocks = -(-n // shard_size)
        w = ShardWriter(out, provenance, dim=dim, dtype=dtype, shard_size=shard_size, import_id=uuid.uuid4().hex,
                        import_shards=blocks, expected_rows=n)  # refuses a store of another model
        non_finite: list[int] = []
        try:
            for a in range(0, n, shard_size):
                b = min(a + shard_size, n)
                block = ds[a:b]  # one block in memory at a time, not the whole matrix
                bad = w.add(block, {c: v[a:b] for c, v in meta.items()})  # NaN/inf rows become failures
                non_finite.extend((a + np.flatnonzero(bad)).tolist())
                w.flush()  # one shard per block, so the shard count is known up front
            w.close()
        except BaseException:
            w.abort()  # a failed import leaves nothing behind
            raise
    unique_paths = pl.Series(meta["path"]).n_unique()
    live = _live_rows(out, w.written)
    return {"store": str(out), "rows": live.height, "file_rows": n, "dim": dim, "dtype": dtype, "shards": len(w.written),
            "duplicate_paths": n - unique_paths,
            "labels": {str(k): int((live["label"] == k).sum()) for k in (1, 0, -1)},
            "sha256": provenance["imported_from"]["sha256"], "non_finite_rows": non_finite,
            "non_finite_message": _non_finite_message(non_finite, dataset, dtype, w)}


def _live_rows(out: str | os.PathLike, written: list[Path]) -> pl.DataFrame:
    """The rows of the shards `written` that are live now (newest wins: a path given twice is its last row)."""
    from dfclip.store.reader import open as open_store

    s = open_store(out)
    mine = [i for i, shard in enumerate(s.shards) if shard.path in set(written)]
    return s.meta.filter(pl.col("shard").is_in(mine))


def _non_finite_message(rows: list[int], dataset: str, dtype: str, writer: ShardWriter) -> str:
    """One line naming the rows that were logged as failures instead of stored, and the fix that applies."""
    if not rows:
        return ""
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    text = f"{len(rows)} rows of dataset {dataset!r} have NaN or inf values (rows {shown}) and were logged as failures"
    if dtype == "float16" and writer.non_finite_overflow == len(rows):
        return text + ": they only overflow float16; re-import with --dtype float32 to keep them"
    return text + ": fix those rows in the features file to keep them"

