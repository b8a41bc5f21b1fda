"""The on-disk contract of a dfclip store. docs/store-format.md is the prose version; keep both true.

A store is a directory:

    shard-r000-00000.h5     immutable HDF5 shards, written to a temp name then os.replace'd
    shard-r001-00000.h5     (r = torchrun rank of the writer, then a per-rank sequence number)
    failures.parquet        convenience view of unreadable inputs, rebuilt from the shards
    shard-r000-00000.h5.meta-<created_ns>.parquet   optional cache of that shard's row metadata
    .lock-r000              advisory lock of a running writer (fcntl; released if it dies)

Each shard is self-describing: rows, their metadata, the failures met while writing them,
and a provenance JSON attribute. Readers need only h5py.

Also the rules every producer of rows shares, so each exists once: the row schema
(ROW_SCHEMA), how labels are spelled in manifests and labels CSVs (parse_labels,
parse_column_map), which embeddings may meet (identity, compatible, require_compatible),
and how files are named in provenance (sha256_file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import polars as pl

from dfclip.errors import UserError

FORMAT_VERSION = "dfclip-store/1"

SHARD_GLOB = "shard-r*-*.h5"
SHARD_RE = re.compile(r"^shard-r(\d{3,})-(\d{5,})\.h5$")
FAILURES_FILE = "failures.parquet"

# The row schema: what describes one image, as HDF5 datasets of a shard (all of length N), as the
# columns of input rows (embed.sources) and as a store's metadata (reader.Store.meta).
ROW_SCHEMA: dict[str, pl.DataType] = {
    "path": pl.Utf8,  # POSIX path relative to the input root
    "label": pl.Int8,  # 1 fake, 0 real, -1 unknown
    "source": pl.Utf8,  # generator / dataset name, "" when unknown
    "split": pl.Utf8,  # "train", "val", "test", or ""
    "group": pl.Utf8,  # frames that belong together (e.g. one video), "" when none
    "size": pl.Int64,  # file size in bytes (-1: unknown)
    "mtime_ns": pl.Int64,  # modification time (-1: unknown); with path and size the resume key
}
ROW_COLUMNS = tuple(ROW_SCHEMA)
STRING_COLUMNS = tuple(c for c, t in ROW_SCHEMA.items() if t == pl.Utf8)  # UTF-8, variable length
LABEL = "label"  # int8
FILE_COLUMNS = ("size", "mtime_ns")  # int64: read from the image file, never given by a manifest
INPUT_COLUMNS = tuple(c for c in ROW_COLUMNS if c not in FILE_COLUMNS)  # what a manifest / labels CSV may give
# Frames and faces (`dfembed extract` on videos, `--faces`): optional per-row datasets of a shard, read
# with these defaults from shards that lack them (still images without a face stage, older stores).
FACE_SCHEMA: dict[str, pl.DataType] = {
    "frame": pl.Int32,  # frame number of a video row (0 = first frame shown); -1 for a still image
    "face_index": pl.Int16,  # rank of the face by box area in its frame (0 = largest); -1: no face stage
    "n_faces": pl.Int16,  # faces found in the frame; 0: none, the row is a centre crop (--face-fallback center)
    "face_score": pl.Float32,  # the detector's confidence; NaN without a detected face
    "face_box": pl.Array(pl.Float32, 4),  # x0, y0, x1, y1 in source pixels; NaN without a face stage
}
FACE_COLUMNS = tuple(FACE_SCHEMA)
FACE_DEFAULTS: dict[str, object] = {"frame": -1, "face_index": -1, "n_faces": -1, "face_score": float("nan"),
                                    "face_box": [float("nan")] * 4}
# Completed inputs: group "inputs" of a shard, one record per video (or image with a face stage) whose
# rows and failures all lie in this shard or an earlier one. A resumed extract skips exactly these.
INPUTS_GROUP = "inputs"
INPUT_DONE_SCHEMA: dict[str, pl.DataType] = {"path": pl.Utf8, "size": pl.Int64, "mtime_ns": pl.Int64,
                                             "n_frames": pl.Int32, "n_rows": pl.Int32}
# The face detector's raw output (before --min-face-score/--min-face-size and the choice of faces):
# group "detections", one record per face found, or one with face -1 for a frame without any.
# `dfembed extract --detections STORE` reuses them instead of detecting again.
DETECTIONS_GROUP = "detections"
DETECTIONS_FILE = "detections.parquet"  # view of every shard's detections, rebuilt by extract
DETECTION_SCHEMA: dict[str, pl.DataType] = {"path": pl.Utf8, "size": pl.Int64, "mtime_ns": pl.Int64,
                                            "frame": pl.Int32, "face": pl.Int16, "score": pl.Float32,
                                            "box": pl.Array(pl.Float32, 4), "landmarks": pl.Array(pl.Float32, 10)}
_SUFFIX_RE = re.compile(r"(#f\d+)?(@\d+)?$")
EMBEDDINGS = "embeddings"  # N x D, float16 (default) or float32
# Intermediate layers (`dfembed extract --layers`): dataset FEATURES_GROUP/block{i}, N x width, the class
# token of the residual stream after transformer block i (1-based). Heads name features as on the
# command line: "proj" is `embeddings`, "block16" is `features/block16`, "a+b" concatenates.
FEATURES_GROUP = "features"
DEFAULT_FEATURE = "proj"
BLOCK_RE = re.compile(r"^block([1-9]\d*)$")
# Failures met while writing this shard: group "failures" with these datasets.
FAILURES_GROUP = "failures"
FAILURE_SCHEMA: dict[str, pl.DataType] = {"path": pl.Utf8, "error": pl.Utf8, "message": pl.Utf8,
                                          "size": pl.Int64, "mtime_ns": pl.Int64}
FAILURE_STRING_COLUMNS = tuple(c for c, t in FAILURE_SCHEMA.items() if t == pl.Utf8)
NON_FINITE = "non_finite"  # failure error: the embedding had NaN or inf values (never stored)
# Failure error of a tombstone: the path was dropped on purpose (`dfembed extract --prune-missing`, its file
# left the input). Like any failure it hides earlier rows of the path; unlike one it is not listed as failed.
REMOVED = "removed"

# Label spellings besides the numbers; words say what they mean, so target_means never flips them.
LABEL_WORDS: dict[str, int] = {
    "real": 0, "0_real": 0, "authentic": 0,
    "fake": 1, "1_fake": 1, "synthetic": 1, "generated": 1,
    "unknown": -1,
}
TARGET_MEANINGS = ("fake", "real")

EMBEDDING_DTYPES = ("float16", "float32")

# Provenance keys that must agree for rows to be comparable (mixing them is refused).
MODEL_KEYS = ("model", "model_config", "pretrained", "feature", "dim", "preprocess")
# What a store holds beside the model's features: its block layers and the perturbation applied to
# its images. Every shard of one store agrees on them, but stores that differ in them may still meet
# (a head trained on a clean store is evaluated on a JPEG one; a run needs only its own blocks).
STORE_KEYS = ("layers", "tap", "perturb", "video", "faces")
IDENTITY_KEYS = MODEL_KEYS + STORE_KEYS
# A run trained on fused stores (`dfhead fit A --with B`) records them in its provenance under this key: a list
# of {"name", "provenance", "root"}, one per store, in order; the other keys are the first store's.
FUSION_KEY = "fusion"
# The value a key has in stores written before it existed.
# A store written before videos were read took no frames, so any frame setting matches it: the defaults.
_KEY_DEFAULTS = {"layers": [], "tap": "resid", "perturb": "", "video": {"frames": 32, "stride": None}, "faces": None}


def row_path(file: str, frame: int = -1, face: int = -1) -> str:
    """The row name of a frame and/or face of input `file`: "clip.mp4#f000012", "clip.mp4#f000012@1", "x.png@0".

    frame -1: a still image; face -1: the whole frame, or the one face kept (--faces largest).
    Six digits keep the frames of a video in order up to a million frames.
    """
    return file + (f"#f{frame:06d}" if frame >= 0 else "") + (f"@{face}" if face >= 0 else "")


def origin_expr(column: str = "path") -> pl.Expr:
    """polars: the input file a row came from (row_path's suffixes removed). A file's own name cannot
    end in a suffix, since it ends in an image or video extension."""
    return pl.col(column).str.replace(_SUFFIX_RE.pattern, "")


def check_layout(dtype: str, shard_size: int) -> None:
    """UserError unless `dtype` and `shard_size` are a valid stored dtype and rows per shard."""
    if dtype not in EMBEDDING_DTYPES:
        raise UserError(f"unsupported --dtype {dtype!r}; use one of {', '.join(EMBEDDING_DTYPES)}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")


def shard_name(rank: int, seq: int) -> str:
    return f"shard-r{rank:03d}-{seq:05d}.h5"


def meta_cache_name(shard: str, created_ns: int) -> str:
    """The optional Parquet copy of a shard's row metadata (not its embeddings or failures).

    Reading UTF-8 columns from HDF5 is slow (~2 s per million rows); polars reads this in a
    fraction of that. The shard's created_ns is in the name, so a cache can only ever match the
    exact shard it was written with; a shard without one is read from HDF5 as before.
    """
    return f"{shard}.meta-{created_ns}.parquet"


INDEX_CACHE_GLOB = "index-*.parquet"


def index_cache_name(shards: list[tuple[str, int, int]]) -> str:
    """The optional Parquet cache of a store's resolved rows (newest wins over every shard).

    shards: (file name, created_ns, rows) of every shard, in the readers' order (oldest first).
    The name is a digest of that list, so a cache only ever matches the exact set of shards it was
    resolved from; adding or removing a shard makes readers resolve again (and write a new cache).
    """
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:20]
    return f"index-{digest}.parquet"


def identity(provenance: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> str:
    """A canonical string of what makes two stores' embeddings comparable (over `keys`).

    Weights are identified by tag or content hash, never by where the file happened to lie.
    """
    ident = {k: provenance.get(k, _KEY_DEFAULTS.get(k)) for k in keys}
    if isinstance(ident.get("pretrained"), dict):
        ident["pretrained"] = {k: v for k, v in ident["pretrained"].items() if k in ("kind", "tag", "sha256")}
    return json.dumps(ident, sort_keys=True, default=str)


def describe_identity(provenance: dict) -> str:
    """Short human form for error messages."""
    if provenance.get(FUSION_KEY):
        return "fused stores " + " and ".join(f"{m['name']} ({describe_identity(m['provenance'])})"
                                              for m in provenance[FUSION_KEY])
    p = provenance.get("pretrained")
    if isinstance(p, dict):
        p = p.get("tag") or p.get("file") or (p.get("sha256") or "")[:12] or p.get("kind", "?")
    text = f"model={provenance.get('model')} pretrained={p} feature={provenance.get('feature')} dim={provenance.get('dim')}"
    layers = provenance.get("layers") or []
    text += f" layers={','.join(map(str, layers)) or 'none'} perturb={provenance.get('perturb') or 'none'}"
    video = provenance.get("video") or _KEY_DEFAULTS["video"]
    text += f" frames={video.get('stride') and 'every ' + str(video['stride']) or video.get('frames') or 'all'}"
    faces = provenance.get("faces")
    if faces:
        detector = faces.get("detector") or {}
        text += (f" faces={faces.get('mode')} ({detector.get('name')} {detector.get('version')}, scale {faces.get('scale')},"
                 f" min score {faces.get('min_score')}, min size {faces.get('min_size')}, fallback {faces.get('fallback')})")
    return text


def weights_name(provenance: dict) -> str | None:
    """The weights as a short name: tag, checkpoint hash, or 'none'."""
    p = provenance.get("pretrained")
    if isinstance(p, dict):
        return p.get("tag") or p.get("sha256") or p.get("kind")
    return p


def compatible(a: dict, b: dict) -> bool:
    """Whether embeddings described by provenances `a` and `b` may be compared (train vs val, run vs store).

    Extracted stores must match in the model's identity (MODEL_KEYS; layers and perturbation may differ). An imported store (`declared: true`) only
    knows what the user declared, so it matches on model name, weights tag, feature and dim.
    Fused stores (FUSION_KEY) match fused stores of as many compatible stores, in the same order.
    """
    fa, fb = a.get(FUSION_KEY), b.get(FUSION_KEY)
    if fa or fb:
        return bool(fa) and bool(fb) and len(fa) == len(fb) and all(
            compatible(x["provenance"], y["provenance"]) for x, y in zip(fa, fb))
    if a.get("declared") or b.get("declared"):
        keys = ("model", "feature", "dim")
        return all(a.get(k) == b.get(k) for k in keys) and weights_name(a) == weights_name(b)
    return identity(a, MODEL_KEYS) == identity(b, MODEL_KEYS)


def require_compatible(have: dict | None, want: dict, *, what: str, fix: str, exact: bool = False) -> None:
    """Raise UserError unless embeddings of provenance `want` may meet those of `have` (None: nothing yet).

    exact=True is the rule inside one store (identity; writers check it before adding shards),
    otherwise `compatible` (a run and the store it scores, a train and a validation store).
    The message reads "{what} holds <have>, not <want>; {fix}".
    """
    if have is None or (identity(have) == identity(want) if exact else compatible(have, want)):
        return
    raise UserError(f"{what} holds {describe_identity(have)}, not {describe_identity(want)}; {fix}")


def require_same_input_root(stored: list[dict], provenance: dict, store: os.PathLike) -> None:
    """UserError unless rows read from provenance["input_root"] may join shards of provenances `stored`.

    Paths are stored relative to their input root, so rows of two roots would collide on equal
    relative paths (newest wins would silently replace one image by another). One store therefore
    holds one input root. Shards without "input_root" (imports) and writers without one are not checked.
    """
    new = provenance.get("input_root")
    roots = {p["input_root"] for p in stored if p.get("input_root")}
    if new is None or not roots or any(os.path.realpath(r) == os.path.realpath(new) for r in roots):
        return
    raise UserError(f"store {store} holds images of {sorted(roots)[0]}, not {new}; paths are stored relative to "
                    "their folder, so two folders in one store could replace each other's rows: use another --out "
                    "for this folder (or extract a folder that holds both into a new --out)")


def parse_layers(spec: str | None, n_blocks: int) -> list[int]:
    """`--layers` SPEC -> sorted 1-based block numbers: "8,16,24", "all", "every:4" (4, 8, ...), "" = none."""
    text = (spec or "").strip().lower().replace(" ", "")
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(1, n_blocks + 1))
    try:
        if text.startswith("every:"):
            step = int(text[len("every:"):])
            if step < 1:
                raise ValueError
            blocks = list(range(step, n_blocks + 1, step))
        else:
            blocks = sorted({int(b) for b in text.split(",")})
    except ValueError:
        raise UserError(f"bad --layers {spec!r}; write block numbers like 8,16,24, or all, or every:4") from None
    bad = [b for b in blocks if not 1 <= b <= n_blocks]
    if bad or not blocks:
        raise UserError(f"--layers {spec!r} names blocks {bad or 'none'} but the model has blocks 1..{n_blocks}; "
                        f"pick blocks in that range")
    return blocks


def feature_parts(spec: str) -> list[str]:
    """A head's feature name -> the names it concatenates: "block8+proj" -> ["block8", "proj"] (UserError if bad).

    Over fused stores (`dfhead fit A --with B`) a part may name its store: "A:proj+B:block12"; then every
    part must (an unnamed spec applies to each store: fused_feature)."""
    parts = [p.strip() for p in str(spec).split("+")]
    bases = [split_part(p)[1] for p in parts]
    named = [split_part(p)[0] is not None for p in parts]
    bad = [p for p, b in zip(parts, bases) if b != DEFAULT_FEATURE and not BLOCK_RE.match(b)]
    if bad or len(set(parts)) != len(parts) or any(p.startswith(":") for p in parts):
        raise UserError(f"bad feature {spec!r}; use proj, blockN (a stored --layers block) or a + list of them "
                        "without repeats, e.g. block8+block16 (with --with: STORE:proj+STORE:block12)")
    if any(named) and not all(named):
        raise UserError(f"bad feature {spec!r}: name the store of every part (e.g. A:proj+B:block12) or of none "
                        "(then each part is read from every store)")
    return parts


def split_part(part: str) -> tuple[str | None, str]:
    """One feature part -> (store name or None, stored feature): "st_dino:block12" -> ("st_dino", "block12")."""
    name, sep, base = part.strip().rpartition(":")
    return (name, base) if sep else (None, base)


def fused_feature(spec: str, names: list[str]) -> list[tuple[int, str]]:
    """(store position, stored feature) of each part of `spec` over fused stores called `names`, in order.

    An unnamed spec ("proj", "block4+block8") is read from every store in turn (A:proj+B:proj); a named
    one names stores as they are called (their folder names in `dfhead fit`, the run's names later)."""
    parts = feature_parts(spec)
    if split_part(parts[0])[0] is None:
        return [(i, p) for i in range(len(names)) for p in parts]
    out = []
    for p in parts:
        name, base = split_part(p)
        if name not in names:
            raise UserError(f"feature {spec!r} names store {name!r}, but the fused stores are {', '.join(names)}; "
                            "name a part STORE:FEATURE after one of them")
        out.append((names.index(name), base))
    return out


def fused_spec(pairs: list[tuple[int, str]], names: list[str]) -> str:
    """fused_feature's inverse: the named spelling, "st_clip:proj+st_dino:proj"."""
    return "+".join(f"{names[i]}:{p}" for i, p in pairs)


def feature_dataset(part: str) -> str:
    """The HDF5 dataset of one feature name: "proj" -> "embeddings", "block16" -> "features/block16"."""
    return EMBEDDINGS if part == DEFAULT_FEATURE else f"{FEATURES_GROUP}/{part}"


def stored_features(provenance: dict) -> list[str]:
    """Feature names a store of `provenance` holds: "proj" and one "blockN" per stored layer."""
    return [DEFAULT_FEATURE] + [f"block{b}" for b in provenance.get("layers") or []]


def feature_width(provenance: dict, spec: str) -> int | None:
    """Columns of feature `spec` in a store of `provenance` (None when the provenance does not say).
    A fused provenance ("fusion": its stores' names and provenances) sums its stores' parts."""
    if provenance.get(FUSION_KEY):
        members = provenance[FUSION_KEY]
        parts = [feature_width(members[i]["provenance"], p)
                 for i, p in fused_feature(spec, [m["name"] for m in members])]
        return sum(parts) if all(isinstance(w, int) for w in parts) else None
    widths = {DEFAULT_FEATURE: provenance.get("dim"), **{f"block{b}": provenance.get("layer_width")
                                                         for b in provenance.get("layers") or []}}
    parts = [widths.get(p) for p in feature_parts(spec)]
    return sum(parts) if all(isinstance(w, int) for w in parts) else None


def feature_blocks(spec: str) -> list[int]:
    """The block numbers a feature needs: "block8+proj" -> [8] (a named part counts by its stored feature)."""
    bases = [split_part(p)[1] for p in feature_parts(spec)]
    return [int(BLOCK_RE.match(b).group(1)) for b in bases if b != DEFAULT_FEATURE]


def parse_column_map(items: list[str]) -> dict[str, str]:
    """Parse CLI column mappings like ["path=Image Path", "label=Target"] into {ours: theirs}.

    For manifests (`dfembed extract --manifest`) and labels CSVs (`dfembed import-h5`) alike.
    """
    mapping: dict[str, str] = {}
    for item in items:
        ours, sep, theirs = item.partition("=")
        ours, theirs = ours.strip().lower(), theirs.strip()
        if not sep or not ours or not theirs:
            raise UserError(
                f"bad column mapping {item!r}; write it as OURS=THEIRS, e.g. --column 'path=Image Path'"
            )
        if ours not in INPUT_COLUMNS:
            raise UserError(
                f"unknown column {ours!r} in mapping {item!r}; map one of: {', '.join(INPUT_COLUMNS)}"
            )
        if ours in mapping:
            raise UserError(f"column {ours!r} is mapped twice; give one --column {ours}=NAME")
        mapping[ours] = theirs
    return mapping


def check_target_means(target_means: str) -> None:
    if target_means not in TARGET_MEANINGS:
        raise UserError(f"target_means (--target-means) must be 'fake' or 'real', got {target_means!r}")


def parse_labels(raw: pl.Series, target_means: str = "fake", *, where: str = "manifest") -> pl.Series:
    """Labels as written in a manifest or labels CSV -> Int8 {1 fake, 0 real, -1 unknown}, named "label".

    Accepts the numbers 1, 0, -1 in any spelling ("1", "1.0", " 1 "), booleans (true = 1), the
    words of LABEL_WORDS in any case, and empty cells (unknown). With target_means="real" the
    numbers and booleans 0 and 1 swap; words are explicit and never swap. `where` names the
    file kind in the error.
    """
    check_target_means(target_means)
    text = raw.cast(pl.Utf8).str.strip_chars().fill_null("")
    lower = text.str.to_lowercase()
    word = lower.replace_strict({**LABEL_WORDS, "": -1}, default=None, return_dtype=pl.Int8)
    number = lower.replace({"true": "1", "false": "0"}).cast(pl.Float64, strict=False)
    number = pl.select(pl.when(number.is_in([1.0, 0.0, -1.0])).then(number)).to_series().cast(pl.Int8)
    if target_means == "real":
        number = pl.select(pl.when(number >= 0).then(1 - number).otherwise(number)).to_series()
    labels = word.fill_null(number)
    bad = text.filter(labels.is_null())
    if len(bad):
        examples = ", ".join(repr(v) for v in bad.unique(maintain_order=True).head(3).to_list())
        raise UserError(f"{len(bad)} {where} labels in column {raw.name!r} are not 0, 1 or -1 (nor real / fake / "
                        f"unknown) (e.g. {examples}); fix the {where} or map another column with --column label=NAME")
    return labels.cast(pl.Int8).alias("label")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: how provenance names a checkpoint or an imported file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Split spellings (any case) -> the stored split. Only these or "" are accepted: `dfhead fit` trains on
# "train" and "" and validates on "val", so a value it does not know would silently never be trained on.
SPLIT_WORDS: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def parse_split_map(items: list[str]) -> dict[str, str]:
    """Parse `--split-map THEIRS=OURS` items ("training=train") into {theirs (lower case): stored split}."""
    mapping: dict[str, str] = {}
    for item in items:
        theirs, sep, ours = item.partition("=")
        theirs, ours = theirs.strip().lower(), ours.strip().lower()
        if not sep or not theirs:
            raise UserError(f"bad split mapping {item!r}; write it as VALUE=SPLIT, e.g. --split-map training=train")
        if ours not in SPLIT_WORDS and ours != "":
            raise UserError(f"--split-map {item!r} maps to {ours!r}; map to one of train, val, test (or nothing)")
        if theirs in mapping:
            raise UserError(f"split value {theirs!r} is mapped twice (case is ignored); give one --split-map")
        mapping[theirs] = SPLIT_WORDS.get(ours, "")
    return mapping


def parse_splits(raw: list[str], split_map: dict[str, str] | None = None, *, where: str = "manifest") -> list[str]:
    """Split cells -> "train" / "val" / "test" / "" (SPLIT_WORDS, any case, or `split_map`, keys in lower
    case as parse_split_map gives them). Any other value is one UserError listing the values found."""
    given = {k.strip().lower(): v.strip().lower() for k, v in (split_map or {}).items()}
    bad = [f"{k}={v}" for k, v in given.items() if v not in SPLIT_WORDS and v != ""]
    if bad:
        raise UserError(f"--split-map {bad[0]} maps to {given[bad[0].split('=')[0]]!r}; "
                        "map to one of train, val, test (or nothing)")
    split_map = {k: SPLIT_WORDS.get(v, "") for k, v in given.items()}
    out, unknown = [], {}
    for cell in raw:
        text = (cell or "").strip()
        key = text.lower()
        value = split_map.get(key, SPLIT_WORDS.get(key, "" if key == "" else None))
        if value is None:
            unknown[text] = unknown.get(text, 0) + 1
        out.append(value)
    if unknown:
        found = ", ".join(f"{v!r} ({n})" for v, n in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
        example = next(iter(sorted(unknown, key=lambda v: -unknown[v])))
        raise UserError(f"{sum(unknown.values())} {where} rows have a split other than train, val (valid, validation), "
                        f"test or empty: {found}{' ...' if len(unknown) > 5 else ''}; `dfhead fit` would never train "
                        f"on them: fix the {where} or map them, e.g. --split-map {example.lower() or 'VALUE'}=train")
    return out


def case_clashes(names) -> list[list[str]]:
    """Groups of distinct names that differ only in case ("GAN", "gan"), each sorted, in name order.

    Sources are matched as written (`--holdout-source gan` does not hold out "GAN"), so such names are
    two sources; extract and `dfembed info` warn about them."""
    groups: dict[str, set[str]] = {}
    for name in names:
        if name:
            groups.setdefault(name.lower(), set()).add(name)
    return [sorted(g) for _, g in sorted(groups.items()) if len(g) > 1]
