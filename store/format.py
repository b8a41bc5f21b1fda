"""The on-disk contract of a dfclip store. docs/store-format.md is the prose version; keep both true.

A store is a directory:

    shard-r000-00000.h5     immutable HDF5 shards, written to a temp name then os.replace'd
    shard-r001-00000.h5     (r = torchrun rank of the writer, then a per-rank sequence number)
    failures.parquet        convenience view of unreadable inputs, rebuilt from the shards
    shard-r000-00000.h5.meta-<created_ns>.parquet   optional cache of that shard's row metadata
    .lock-r000              advisory lock of a running writer (fcntl; released if it dies)

Each shard is self-describing: rows, their metadata, the failures met while writing them,
and a provenance JSON attribute. Readers need only h5py.
"""

from __future__ import annotations

import json
import re

FORMAT_VERSION = "dfclip-store/1"

SHARD_GLOB = "shard-r*-*.h5"
SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{5,})\.h5$")
FAILURES_FILE = "failures.parquet"

# Row datasets, all of length N.
EMBEDDINGS = "embeddings"  # N x D, float16 (default) or float32
STRING_COLUMNS = ("path", "source", "split", "group")  # UTF-8, variable length
LABEL = "label"  # int8: 1 fake, 0 real, -1 unknown
FILE_COLUMNS = ("size", "mtime_ns")  # int64: the resume key, with path
# Failures met while writing this shard: group "failures" with these datasets.
FAILURES_GROUP = "failures"
FAILURE_STRING_COLUMNS = ("path", "error", "message")

EMBEDDING_DTYPES = ("float16", "float32")

# Provenance keys that must agree for rows to be comparable (mixing them is refused).
IDENTITY_KEYS = ("model", "model_config", "pretrained", "feature", "dim", "preprocess")


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank:03d}-{seq:05d}.h5"


def meta_cache_name(shard: str, created_ns: int) -> str:
    """The optional Parquet copy of a shard's row metadata (not its embeddings or failures).

    Reading UTF-8 columns from HDF5 is slow (~2 s per million rows); polars reads this in a
    fraction of that. The shard's created_ns is in the name, so a cache can only ever match the
    exact shard it was written with; a shard without one is read from HDF5 as before.
    """
    return f"{shard}.meta-{created_ns}.parquet"


def identity(provenance: dict) -> str:
    """A canonical string of what makes two stores' embeddings comparable.

    Weights are identified by tag or content hash, never by where the file happened to lie.
    """
    ident = {k: provenance.get(k) for k in IDENTITY_KEYS}
    if isinstance(ident["pretrained"], dict):
        ident["pretrained"] = {k: v for k, v in ident["pretrained"].items() if k in ("kind", "tag", "sha256")}
    return json.dumps(ident, sort_keys=True, default=str)


def describe_identity(provenance: dict) -> str:
    """Short human form for error messages."""
    p = provenance.get("pretrained")
    if isinstance(p, dict):
        p = p.get("tag") or p.get("file") or (p.get("sha256") or "")[:12] or p.get("kind", "?")
    return f"model={provenance.get('model')} pretrained={p} feature={provenance.get('feature')} dim={provenance.get('dim')}"


def weights_name(provenance: dict) -> str | None:
    """The weights as a short name: tag, checkpoint hash, or 'none'."""
    p = provenance.get("pretrained")
    if isinstance(p, dict):
        return p.get("tag") or p.get("sha256") or p.get("kind")
    return p


def compatible(a: dict, b: dict) -> bool:
    """Whether embeddings described by provenances `a` and `b` may be compared (train vs val, run vs store).

    Extracted stores must match exactly (identity). An imported store (`declared: true`) only
    knows what the user declared, so it matches on model name, weights tag, feature and dim.
    """
    if a.get("declared") or b.get("declared"):
        keys = ("model", "feature", "dim")
        return all(a.get(k) == b.get(k) for k in keys) and weights_name(a) == weights_name(b)
    return identity(a) == identity(b)
