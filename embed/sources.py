"""Where the images come from: a labelled folder walk or a CSV/Parquet manifest.

Both give the same table of input rows, sorted by path with unique paths, in the store's row
schema (store.format.ROW_SCHEMA: path, label, source, split, group, size, mtime_ns); size and
mtime_ns come from the files, so a re-run can tell changed files apart.

Folder rules (`scan_folder`), all case-insensitive and applied to directory names only:
- label: a folder named like a label word (store.format.LABEL_WORDS): real / 0_real / authentic
  -> 0, fake / 1_fake / synthetic / generated -> 1; when several appear on one path the deepest
  wins; none -> -1.
- source: the first folder below the label folder that is not a split name
  (fake/stylegan2/x.png -> "stylegan2"); "" when the image sits directly in the label folder
  or the path has no label folder.
- split: a folder named train, val / valid / validation, test -> "train" / "val" / "test";
  deepest wins; none -> "".
- group: always "" (a folder does not say which frames belong together; manifests can).
- files: every extension Pillow opens here (ACCEPTED_EXTENSIONS, any case); other files are
  counted by extension in one line. Symlinks are followed, and a file reachable under several
  paths (a labelled view built from symlinks, hard links) is one row: a labelled path wins over
  an unlabelled one, a plain path over a linked one, then path order. A file under both labels
  is an error naming both paths.

Manifest splits: train, val / valid / validation, test in any case, or empty; other values are
refused in one line listing them, unless `split_map` maps them. Source names are kept as written:
names that differ only in case ("GAN", "gan") are two sources, with a warning line.
"""

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from rich.console import Console

from dfclip.embed.images import IMAGE_EXTENSIONS  # the one list of image types dfclip decodes
from dfclip.embed.video import VIDEO_EXTENSIONS
from dfclip.errors import UserError
from dfclip.store import format as fmt

# The one rule of which files the folder walk picks up (any case); others are counted as skipped.
# Another input kind joins the walk by extending this set.
ACCEPTED_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
LABEL_FOLDERS: dict[str, int] = {word: label for word, label in fmt.LABEL_WORDS.items() if label != -1}
SPLIT_FOLDERS: dict[str, str] = fmt.SPLIT_WORDS

MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")

log = Console(stderr=True, highlight=False, soft_wrap=True)


def _accepted_extensions() -> str:
    return ", ".join(sorted(ACCEPTED_EXTENSIONS))


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute, normalised path without resolving symlinks (keeps the user's spelling)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _classify_dirs(dir_parts: list[str]) -> tuple[int, str, str]:
    """(label, source, split) for a directory given its components below the root."""
    label, label_at = -1, -1
    split = ""
    for i, part in enumerate(dir_parts):
        name = part.lower()
        if name in LABEL_FOLDERS:
            label, label_at = LABEL_FOLDERS[name], i
        if name in SPLIT_FOLDERS:
            split = SPLIT_FOLDERS[name]
    source = ""
    if label_at >= 0:
        # Skip split folders so fake/train/stylegan2/x.png still names stylegan2.
        for part in dir_parts[label_at + 1:]:
            if part.lower() not in SPLIT_FOLDERS:
                source = part
                break
    return label, source, split


def _rows_frame(columns: dict[str, list]) -> pl.DataFrame:
    """Build the row table in the store's row schema, sorted by path."""
    try:
        frame = pl.DataFrame(columns, schema=fmt.ROW_SCHEMA)
    except UnicodeEncodeError:
        bad = next(p for p in columns["path"] if not _is_utf8(p))
        raise UserError(
            f"file name is not valid UTF-8: {bad!r}; rename the file (dfclip stores paths as UTF-8)"
        ) from None
    return frame.sort("path")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _skipped_line(skipped: dict[str, int]) -> str:
    """ "skipped 3 files with other extensions (.heic 2, .txt 1)": the most common first."""
    ranked = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in ranked[:8])
    return (f"skipped {sum(skipped.values())} files with other extensions "
            f"({shown}{', ...' if len(ranked) > 8 else ''})")


@dataclass
class _Walk:
    """What the walk found: one candidate row per (folder visit, file), and what it passed over."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)  # st_dev << 64 | st_ino of the file itself
    linked: list[bool] = field(default_factory=list)  # reached through a symlinked folder
    loops: list[str] = field(default_factory=list)  # symlinks that point at themselves or at each other (ELOOP)
    skipped: dict[str, int] = field(default_factory=dict)  # extension -> files not picked up


def _walk(root_path: Path) -> _Walk:
    """Every (path, file) the tree reaches, following symlinks.

    A folder is walked once per (folder, label, source, split) it is reached under, so a folder that
    is both plain (raw/sd15) and linked from a label folder (fake/sd15 -> ../raw/sd15) yields its
    files under both paths; `_one_path_per_file` then picks one. Symlinked folders wait until the
    plain tree is done, so plain paths come first.
    """
    found = _Walk()
    seen: set[tuple] = set()
    # Stack of (absolute dir, relative prefix ending in "/" or "", dir components below root, via a link).
    stack: list[tuple[str, str, list[str], bool]] = [(str(root_path), "", [], False)]
    linked: list[tuple[str, str, list[str], bool]] = []
    add_path, add_label, add_source, add_split = (found.paths.append, found.labels.append, found.sources.append,
                                                  found.splits.append)
    add_size, add_mtime, add_file, add_linked = (found.sizes.append, found.mtimes.append, found.files.append,
                                                 found.linked.append)
    while stack or linked:
        if not stack:
            stack.append(linked.pop(0))
        dir_abs, prefix, dir_parts, via_link = stack.pop()
        # Label/source/split depend only on the folder, so work them out once per folder.
        label, source, split = _classify_dirs(dir_parts)
        dir_stat = os.stat(dir_abs)
        visit = (dir_stat.st_dev, dir_stat.st_ino, label, source, split)
        if visit in seen:  # a symlink loop, or a second link to a folder under the same labels
            continue
        seen.add(visit)
        try:
            entries = sorted(os.scandir(dir_abs), key=lambda e: e.name)  # deterministic walk
        except PermissionError:
            raise UserError(
                f"cannot read folder {dir_abs}: permission denied; fix its permissions"
            ) from None
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    is_link = entry.is_symlink()
                    (linked if is_link else stack).append(
                        (entry.path, prefix + name + "/", dir_parts + [name], via_link or is_link))
                    continue
                extension = os.path.splitext(name)[1].lower()
                if extension not in ACCEPTED_EXTENSIONS:
                    if entry.is_file():  # dangling links and sockets are no files to count
                        found.skipped[extension] = found.skipped.get(extension, 0) + 1
                    continue
                file_stat = entry.stat()  # follows symlinks: size/mtime of the target image
            except FileNotFoundError:  # dangling symlink
                continue
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                found.loops.append(prefix + name)
                continue
            # Plain lists of strings and ints: no per-file tuple for the garbage collector to scan.
            add_path(prefix + name)
            add_label(label)
            add_source(source)
            add_split(split)
            add_size(file_stat.st_size)
            add_mtime(file_stat.st_mtime_ns)
            add_file(file_stat.st_dev << 64 | file_stat.st_ino)
            add_linked(via_link)
    return found


def _one_path_per_file(found: _Walk) -> list[int]:
    """Indices of the candidates to keep: one per file (symlinks and hard links are one file).

    The labelled path wins over unlabelled ones; among paths of one label, a plain path wins over
    a linked one, then the first in path order. A file under both labels is a UserError naming a
    path of each. Inode 0 (some network file systems) says nothing about identity: kept as is.
    """
    n = len(found.paths)
    if n == 0:
        return []
    mask = (1 << 64) - 1
    ids = pl.DataFrame({"dev": [f >> 64 for f in found.files], "ino": [f & mask for f in found.files]},
                       schema={"dev": pl.UInt64, "ino": pl.UInt64})
    dup = (ids.is_duplicated() & (ids["ino"] != 0)).to_numpy()
    if not dup.any():
        return list(range(n))
    groups: dict[int, list[int]] = {}
    for i in dup.nonzero()[0].tolist():
        groups.setdefault(found.files[i], []).append(i)
    drop: set[int] = set()
    examples: list[str] = []
    for members in groups.values():
        rank = sorted(members, key=lambda i: (found.labels[i] == -1, found.linked[i], found.paths[i]))
        by_label = {found.labels[i]: found.paths[i] for i in reversed(rank) if found.labels[i] != -1}
        if len(by_label) > 1:
            raise UserError(
                f"one file is reachable under two labels: {by_label[0]} (real) and {by_label[1]} (fake) are the "
                "same file (a symlink or hard link); keep it in one label folder"
            )
        drop.update(rank[1:])
        if len(examples) < 2 and found.paths[rank[1]] != found.paths[rank[0]]:
            examples.append(f"{found.paths[rank[1]]} -> {found.paths[rank[0]]}")
    log.print(f"{len(groups)} files are reachable under several paths (symlinks or hard links); each is stored "
              f"once, the labelled path first (e.g. {'; '.join(examples)})", markup=False)
    return [i for i in range(n) if i not in drop]


def scan_folder(root: str | os.PathLike) -> pl.DataFrame:
    """Walk `root` recursively and return one row per image file (see module docstring).

    Uses os.scandir with an explicit stack (fast on 1M files). Symlinked files and folders are
    followed; a file reached under several paths (symlinked folders or files, hard links) gives
    one row, its labelled path winning (`_one_path_per_file`), and a file under two labels is an
    error. Folders and files whose name starts with "." are skipped (hidden folders, macOS
    "._x.jpg" resource forks); files of other extensions are counted in one line.
    Paths in the result are relative to the absolute `root`.
    """
    root_path = _absolute(root)
    if not root_path.exists():
        raise UserError(f"image folder does not exist: {root_path}; check the path")
    if not root_path.is_dir():
        raise UserError(
            f"not a folder: {root_path}; pass the folder holding the images, or read it as a manifest"
        )
    found = _walk(root_path)
    if found.loops:
        log.print(f"skipped {len(found.loops)} symlink loops under {root_path} "
                  f"(first: {', '.join(found.loops[:3])})", markup=False)
    if not found.paths:
        skipped = f"; {_skipped_line(found.skipped)}" if found.skipped else ""
        raise UserError(
            f"no images found under {root_path} (accepted extensions: {_accepted_extensions()}){skipped}; "
            "point it at the folder that holds the images"
        )
    if found.skipped:
        log.print(f"{_skipped_line(found.skipped)} under {root_path}", markup=False)
    keep = _one_path_per_file(found)
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return _rows_frame({
        "path": pick(found.paths), "label": pick(found.labels), "source": pick(found.sources),
        "split": pick(found.splits), "group": [""] * len(keep), "size": pick(found.sizes),
        "mtime_ns": pick(found.mtimes),
    })


def _read_table(file: Path) -> pl.DataFrame:
    """Load a manifest as a table; CSV cells stay strings so paths and labels are not guessed at."""
    suffix = file.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            return pl.read_csv(
                file, separator="\t" if suffix == ".tsv" else ",", infer_schema=False
            )
        return pl.read_parquet(file)
    except (pl.exceptions.PolarsError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read manifest {file}: {first_line}; check the file format") from None


def _relative_path(path: str, root: Path) -> str | None:
    """`path` (absolute or relative to root) as a normalised POSIX path under root, else None."""
    if os.path.isabs(path):
        rel = os.path.relpath(os.path.normpath(path), root)
        if _escapes(rel):  # maybe the same folder spelled through a symlink (/tmp vs /private/tmp)
            rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    else:
        rel = os.path.normpath(path)
    if _escapes(rel):
        return None
    return Path(rel).as_posix()


def _escapes(rel: str) -> bool:
    """True when a normalised relative path is the root itself or leaves it."""
    return rel in (".", "..") or rel.startswith("../")


def read_manifest(
    file: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    columns: dict[str, str] | None = None,
    target_means: str = "fake",
    split_map: dict[str, str] | None = None,
) -> pl.DataFrame:
    """Read a CSV/TSV/Parquet manifest into input rows (see module docstring for the schema).

    Required columns: path, label; optional: source, split, group. `columns` maps our names to
    the file's, e.g. {"path": "Image Path", "label": "Target"}. `target_means="real"` is for
    files where 1 means real. Paths are relative to `root` (default: the manifest's folder) or
    absolute under it; they are stored relative to root. size/mtime_ns come from the files.
    Split values are train, val (valid, validation), test in any case, or empty, stored as "train" /
    "val" / "test" / ""; `split_map` maps other values ({"training": "train"}), and any value left
    over is a UserError listing them (fit would never train on such rows).
    """
    file_path = _absolute(file)
    if not file_path.is_file():
        raise UserError(f"manifest file does not exist: {file_path}; check the path")
    if file_path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise UserError(
            f"unsupported manifest type {file_path.suffix or '(no suffix)'!r} for {file_path.name}; "
            f"use one of {', '.join(MANIFEST_SUFFIXES)}"
        )
    fmt.check_target_means(target_means)
    root_path = _absolute(root) if root is not None else file_path.parent
    if not root_path.is_dir():
        raise UserError(f"manifest root folder does not exist: {root_path}; check --root")

    table = _read_table(file_path)
    names = {ours: (columns or {}).get(ours, ours) for ours in fmt.INPUT_COLUMNS}
    for ours in ("path", "label"):
        if names[ours] not in table.columns:
            hint = " (use -1 in every row for unlabelled images)" if ours == "label" else ""
            raise UserError(
                f"manifest {file_path.name} has no {names[ours]!r} column for {ours}{hint}; "
                f"available columns: {', '.join(table.columns)}; map it with --column {ours}=NAME"
            )
    for ours in ("source", "split", "group"):
        if ours in (columns or {}) and names[ours] not in table.columns:
            raise UserError(
                f"manifest {file_path.name} has no {names[ours]!r} column for {ours}; "
                f"available columns: {', '.join(table.columns)}; fix --column {ours}=NAME"
            )
    if table.height == 0:
        raise UserError(f"manifest {file_path} has no rows; add one row per image")

    def text_column(ours: str) -> list[str]:
        if names[ours] not in table.columns:
            return [""] * table.height
        return table[names[ours]].cast(pl.Utf8).fill_null("").to_list()

    raw_paths = table[names["path"]].cast(pl.Utf8).to_list()
    empty = sum(1 for p in raw_paths if p is None or p.strip() == "")
    if empty:
        raise UserError(f"{empty} manifest rows have an empty path; fill or drop them")
    paths = [_relative_path(p, root_path) for p in raw_paths]
    outside = [raw for raw, rel in zip(raw_paths, paths) if rel is None]
    if outside:
        raise UserError(
            f"{len(outside)} manifest paths are outside the root {root_path} "
            f"(first: {', '.join(outside[:3])}); relative paths are read from the root and may not climb "
            "out of it with '..': pass --root with a folder that contains every image and write the paths "
            "relative to it (or absolute)"
        )

    counts: dict[str, int] = {}
    for p in paths:
        counts[p] = counts.get(p, 0) + 1
    duplicates = [p for p, n in counts.items() if n > 1]
    if duplicates:
        raise UserError(
            f"{len(duplicates)} paths appear more than once in manifest {file_path.name} "
            f"(first: {', '.join(duplicates[:3])}); keep one row per image"
        )

    labels = fmt.parse_labels(table[names["label"]], target_means, where="manifest")

    sizes: list[int] = []
    mtimes: list[int] = []
    missing: list[str] = []
    root_text = str(root_path)
    for p in paths:
        try:
            file_stat = os.stat(os.path.join(root_text, p))
        except OSError:
            file_stat = None
        if file_stat is None or not stat.S_ISREG(file_stat.st_mode):
            missing.append(p)
            continue
        sizes.append(file_stat.st_size)
        mtimes.append(file_stat.st_mtime_ns)
    if missing:
        raise UserError(
            f"{len(missing)} of {len(paths)} manifest files not found under {root_path} "
            f"(first: {', '.join(missing[:3])}); fix the paths or pass --root"
        )

    splits = fmt.parse_splits(text_column("split"), split_map, where="manifest")
    return _rows_frame({
        "path": paths, "label": labels.to_list(), "source": text_column("source"),
        "split": splits, "group": text_column("group"), "size": sizes, "mtime_ns": mtimes,
    })


def load_inputs(
    source: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    columns: dict[str, str] | None = None,
    target_means: str = "fake",
    split_map: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, Path]:
    """Rows and their absolute root from a folder (walked) or a manifest file (read).

    For a folder the root is the folder itself; `root`, `columns`, `target_means` and `split_map`
    only apply to manifests. For a manifest the root is `root`, or the manifest's folder.
    Source names that differ only in case ("GAN", "gan") stay two sources, with a warning line.
    """
    source_path = _absolute(source)
    if source_path.is_dir():
        if root is not None or columns or target_means != "fake" or split_map:
            raise UserError(
                f"{source_path} is a folder, but root / column mapping / target_means / split map only apply "
                "to manifests; drop those options or pass a manifest file"
            )
        rows, root_path = scan_folder(source_path), source_path
    elif not source_path.exists():
        raise UserError(f"input does not exist: {source_path}; pass an image folder or a manifest file")
    else:
        rows = read_manifest(source_path, root=root, columns=columns, target_means=target_means,
                             split_map=split_map)
        root_path = _absolute(root) if root is not None else source_path.parent
    warn_case_clashes(rows["source"].unique().to_list())
    return rows, root_path


def warn_case_clashes(sources: list[str]) -> None:
    """One line when source names differ only in case: they are separate sources, matched as written."""
    clashes = fmt.case_clashes(sources)
    if clashes:
        shown = "; ".join(" / ".join(group) for group in clashes[:3]) + ("; ..." if len(clashes) > 3 else "")
        log.print(f"warning: source names differ only in case ({shown}): they stay separate sources and "
                  "--holdout-source matches names exactly; rename the folders (or the manifest's sources) to merge "
                  "them", markup=False)
