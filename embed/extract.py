"""The extraction job behind `dfembed extract`: images in, HDF5 shards out.

    summary = extract("images", "embeddings", EmbedConfig(model="ViT-L-14", pretrained="openai"))

One call is one rank. Under torchrun every process runs the same call: it reads RANK,
WORLD_SIZE and LOCAL_RANK, takes every WORLD_SIZE-th image of the full path-sorted input
list (so ranks never overlap, whatever is already stored), locks and writes its own shards
(`shard-r{rank}-*.h5`) and needs no process group.

Resume: rows whose (path, size, mtime_ns) is already live in the store, as an embedding or as
a logged failure, are skipped; a changed file is embedded again and its newer row wins (the
store's newest-shard rule). A killed run loses at most the rows of its unwritten shard.

Pipeline: DataLoader worker processes decode (embed/images.py) and preprocess (open_clip's
own eval transform); the main process only moves pinned batches to the device, runs the
tower under autocast and buffers results in a ShardWriter. An image that cannot be decoded
becomes a failure marker in its batch, never an exception, so one bad file neither stops the
run nor shifts rows.

Workers start the platform's default way (fork on Linux). Where that is spawn (macOS), a
script that calls extract() needs the usual `if __name__ == "__main__":` guard; the dfembed
command has it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from PIL import Image
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from dfclip import store
from dfclip.embed.backbone import Backbone, load_backbone, split_preprocess
from dfclip.embed.config import EmbedConfig, config_from_provenance
from dfclip.embed.frames import FaceStage, MediaFiles, embed_media
from dfclip.embed.images import ImageError, load_rgb
from dfclip.embed.perturb import Perturb
from dfclip.embed.sources import load_inputs
from dfclip.embed.video import is_video
from dfclip.errors import UserError
from dfclip.runtime import Rank, rank_from_env, resolve_device
from dfclip.store import format as fmt

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Large batches keep a GPU busy; on CPU a smaller batch shows progress sooner at the same speed.
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 64}
MAX_DEFAULT_WORKERS = 16
RESUME_KEY = ["path", "size", "mtime_ns"]

log = Console(stderr=True, highlight=False)


# ---------------------------------------------------------------- run settings

def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is fp16 autocast on CUDA and fp32 elsewhere.

    fp16 keeps 10 mantissa bits to bf16's 7: against fp32 with the same weights its features
    err about 8x less (bench/precision.py measures it), at the same speed, and CLIP's activations stay well
    inside fp16's range. The reference extracts in fp16 too, and the store keeps float16.
    `precision` is one of embed.config.PRECISIONS (EmbedConfig checks it)."""
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def default_workers(rank: Rank) -> int:
    """Decode workers per rank: the node's cores shared among its ranks, one left for the main process."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // rank.local_world - 1))


# ---------------------------------------------------------------- decoding in workers

class ImageFiles(Dataset):
    """Image i of `paths` (relative to `root`), decoded and preprocessed, or why it failed.

    Returns (i, pixels, "", "") or (i, None, error_kind, message). Paths are kept as one
    bytes blob plus offsets: cheap to send to worker processes and free of the per-string
    reference counts that make forked workers copy a big Python list page by page.
    """

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], transform: Callable,
                 perturb: Callable | None = None) -> None:
        self.root = str(root)
        self.perturb = perturb or None  # (image, path) -> image, before the transform (embed.perturb)
        encoded = [p.encode("utf-8") for p in paths]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start:int(self._ends[i])].decode("utf-8")

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str, str]:
        try:
            image = load_rgb(os.path.join(self.root, self.path(i)))
            if self.perturb is not None:
                image = self.perturb(image, self.path(i))
            return i, self.transform(image), "", ""
        except ImageError as e:
            return i, None, e.kind, e.message
        except Exception as e:  # noqa: BLE001 - one odd file must not end a million-image run
            return i, None, "preprocess_error", f"{self.path(i)}: {type(e).__name__}: {e}"


@dataclass
class Batch:
    """A collated batch: the decoded rows (dataset positions + pixels) and the failed ones."""

    index: torch.Tensor  # int64 [n_ok]
    pixels: torch.Tensor | None  # [n_ok, 3, H, W]; None when every image failed
    failures: list[tuple[int, str, str]]  # (dataset position, error kind, message)

    def __len__(self) -> int:
        return len(self.index) + len(self.failures)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.index, None if self.pixels is None else self.pixels.pin_memory(), self.failures)


def collate(items: list[tuple[int, torch.Tensor | None, str, str]]) -> Batch:
    """Separate decoded images from failures, keeping each image's dataset position."""
    ok = [(i, x) for i, x, _, _ in items if x is not None]
    return Batch(
        index=torch.tensor([i for i, _ in ok], dtype=torch.int64),
        pixels=torch.stack([x for _, x in ok]) if ok else None,
        failures=[(i, kind, msg) for i, x, kind, msg in items if x is None],
    )


def make_loader(dataset: ImageFiles, *, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """The DataLoader of the job (also used by bench/extract.py for the decode-only rate)."""
    # Workers start the platform's default way (fork on Linux: instant, and they touch no CUDA).
    # store.writer_lock makes forked children drop their copy of the lock descriptor.
    # Two batches in flight per worker: a 256-image uint8 batch at 224 px is 38 MB of shared memory.
    extra = dict(persistent_workers=True, prefetch_factor=2) if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, **extra)


@contextlib.contextmanager
def worker_deaths(loader: DataLoader) -> Iterator[None]:
    """Turn the death of a decode worker (the OOM killer's SIGKILL, a crash in a decoder) into one UserError.

    torch reports it as a RuntimeError, raised from its SIGCHLD handler wherever the main process is
    (so this wraps the whole loop, not only the loader's iteration), or as a broken pipe when the
    worker died mid-send. The other workers are stopped first, so the handler cannot raise again later.
    Rows that reached the writer stay: its context flushes them.
    """
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as e:
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        cause = (str(e).strip().splitlines() or [""])[0] if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
        _stop_workers(loader)
        raise UserError(f"a decode worker died ({cause.rstrip('. ')}): most likely the out-of-memory killer; lower "
                        "--workers or --batch-size (or free memory), then re-run the same command: it resumes, "
                        "completed shards are kept") from None


def _stop_workers(loader: DataLoader) -> None:
    # Persistent workers belong to the loader's iterator; shutting it down also unregisters their pids
    # from torch's SIGCHLD handler. (No public API does this; a failure here only means torch does it later.)
    iterator = getattr(loader, "_iterator", None)
    with contextlib.suppress(Exception):
        if iterator is not None:
            iterator._shutdown_workers()


# ---------------------------------------------------------------- the job

def _load_rows(inputs, manifest, root, columns, target_means, split_map=None) -> tuple[pl.DataFrame, Path]:
    if (inputs is None) == (manifest is None):
        raise UserError("give either an IMAGES_DIR or --manifest FILE (exactly one); "
                        "e.g. `dfembed extract ./images` or `dfembed extract --manifest labels.csv`")
    if manifest is None and not Path(inputs).is_dir():
        raise UserError(f"{inputs} is not a folder of images; pass a folder, or a CSV/Parquet with --manifest")
    return load_inputs(inputs if manifest is None else manifest, root=root, columns=columns,
                       target_means=target_means, split_map=split_map)


def partition(rows: pl.DataFrame, rank: int, world: int) -> pl.DataFrame:
    """Rows i with i % world == rank of the path-sorted table: disjoint, covering, deterministic."""
    return rows.sort("path").gather_every(world, offset=rank)


@dataclass
class Plan:
    """What one extract does to a store, worked out from the current inputs and the stored rows."""

    todo: pl.DataFrame  # input files to read (new or changed files, retried failures, files cut short)
    skipped: int  # input files already done (as rows or logged failures)
    skipped_failures: int  # of which logged failures
    relabel: pl.DataFrame  # stored rows of unchanged files whose label/source/split/group changed: new metadata + shard, row
    missing: pl.DataFrame  # live row paths of the store whose file is gone from the input (all ranks' inputs)
    stored: "store.Store | None"
    skip: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # media files cut short: rows already stored

    def work(self, prune: bool) -> int:
        return self.todo.height + self.relabel.height + (self.missing.height if prune else 0)


def _plan(mine: pl.DataFrame, rows: pl.DataFrame, out: Path, retry_failed: bool, media: pl.Series) -> Plan:
    """media: per row of `mine`, whether the file goes through embed.frames (a video, or any file with
    a face stage): such a file is done once its completion record is stored, not at its first row."""
    if not (out.is_dir() and store.list_shards(out)):
        return Plan(mine, 0, 0, mine.clear().with_columns(shard=pl.lit(0, pl.Int32), row=pl.lit(0, pl.Int64)),
                    pl.DataFrame(schema={"path": pl.Utf8}), None)
    s = store.open(out)
    failed = s.failures.select(RESUME_KEY)
    stored_rows = s.meta.with_columns(fmt.origin_expr().alias("origin"))
    failed_rows = s.failures.with_columns(fmt.origin_expr().alias("origin"))
    # A media file is done when its completion record is stored and it still has rows or failures there
    # (`--prune-missing` tombstones all of its rows: it is embedded again if it comes back).
    present = pl.concat([stored_rows.select(pl.col("origin").alias("path"), "size", "mtime_ns"),
                         failed_rows.select(pl.col("origin").alias("path"), "size", "mtime_ns")]).unique()
    done_media = s.done_inputs.select(RESUME_KEY).join(present, on=RESUME_KEY, how="semi")
    if retry_failed:  # a file with a failed frame or face is read again (its stored rows are kept)
        done_media = done_media.join(failed_rows.select(pl.col("origin").alias("path"), "size", "mtime_ns"),
                                     on=RESUME_KEY, how="anti")
    done = s.meta.select(RESUME_KEY)
    if not retry_failed:
        done = pl.concat([done, failed])
    plain, media_rows = mine.filter(~media), mine.filter(media)
    todo = pl.concat([plain.join(done, on=RESUME_KEY, how="anti"),
                      media_rows.join(pl.concat([done_media, failed if not retry_failed else failed.clear()]),
                                      on=RESUME_KEY, how="anti")]).sort("path")
    skipped_failures = 0 if retry_failed else mine.join(failed, on=RESUME_KEY, how="semi").height
    # Files cut short (no completion record): their stored rows (and failures, unless retried) are not redone.
    partial = stored_rows.select("path", "origin", "size", "mtime_ns")
    if not retry_failed:
        partial = pl.concat([partial, failed_rows.select("path", "origin", "size", "mtime_ns")])
    todo_media = todo.join(media_rows.select("path"), on="path", how="semi")
    partial = partial.join(todo_media.select(pl.col("path").alias("origin"), "size", "mtime_ns"),
                           on=["origin", "size", "mtime_ns"], how="semi")
    skip: dict[str, set[str]] = {}
    for origin, path in partial.select("origin", "path").iter_rows():
        skip.setdefault(origin, set()).add(path)
    # An unchanged file (same resume key) whose labels changed in the inputs: its stored rows are copied
    # into new rows with the current labels (no re-embedding), which win by the newest-shard rule.
    labels = [c for c in fmt.INPUT_COLUMNS if c != "path"]
    stored = stored_rows.select(pl.col("path").alias("row_path"), pl.col("origin").alias("path"), "size", "mtime_ns",
                                *[pl.col(c).alias(f"{c}_stored") for c in labels], *fmt.FACE_COLUMNS, "shard", "row")
    relabel = (mine.join(stored, on=RESUME_KEY, how="inner")
               .filter(pl.any_horizontal([pl.col(c) != pl.col(f"{c}_stored") for c in labels]))
               .with_columns(pl.col("row_path").alias("path"))
               .select(*fmt.ROW_COLUMNS, *fmt.FACE_COLUMNS, "shard", "row"))
    # Rows and failures of files gone from the input (a video's frames: the video file); like rows,
    # failures stay listed until pruned.
    stored_paths = pl.concat([stored_rows.select("path", "origin"), failed_rows.select("path", "origin")]
                             ).unique(maintain_order=True)
    missing = stored_paths.join(rows.select(pl.col("path").alias("origin")), on="origin", how="anti").select("path")
    return Plan(todo, mine.height - todo.height, skipped_failures, relabel, missing, s, skip)


def _copy_relabelled(plan: Plan, writer: store.ShardWriter, block: int) -> None:
    """Write the stored embeddings of plan.relabel again with their current metadata (no re-embedding)."""
    for a in range(0, plan.relabel.height, block):
        rows = plan.relabel.slice(a, block)
        x, part = plan.stored.load(rows=rows)  # part in storage order, aligned with x
        layers = plan.stored.provenance.get("layers") or []
        blocks = np.stack([plan.stored.load(rows=rows, feature=f"block{b}")[0] for b in layers], axis=1) \
            if layers else None  # the stored blocks travel with their rows
        writer.add(x, {c: part[c].to_list() if part[c].dtype in (pl.Utf8, pl.Array(pl.Float32, 4))
                       else part[c].to_numpy() for c in fmt.ROW_COLUMNS + fmt.FACE_COLUMNS}, blocks)


def _prune(missing: pl.DataFrame, writer: store.ShardWriter) -> None:
    # A tombstone: a failure of the path newer than its rows hides them (newest wins); size and mtime -1
    # never match a file, so the image is embedded again if it comes back.
    for path in missing["path"].to_list():
        writer.add_failure(path, -1, -1, fmt.REMOVED, "gone from the input; dropped by --prune-missing")


class _ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "- img/s", style="progress.data.speed")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _ImagesPerSecond(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=log, disable=not enabled)


def _embed_all(loader: DataLoader, backbone: Backbone, precision: str, writer: store.ShardWriter,
               todo: pl.DataFrame, on_batch: Callable[[int], None], *,
               on_device: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Run every batch through the tower and hand rows and failures to the writer.

    on_device finishes preprocessing on the device (uint8 -> normalised float) when the workers
    stopped at uint8 (embed.backbone.split_preprocess)."""
    cols = {c: (np.asarray(todo[c].to_list(), dtype=object) if todo[c].dtype == pl.Utf8 else todo[c].to_numpy())
            for c in fmt.ROW_COLUMNS}
    device = backbone.device
    amp = (torch.autocast(device.type, dtype=AMP_DTYPES[precision]) if precision in AMP_DTYPES
           else contextlib.nullcontext())

    def write(features: torch.Tensor, blocks: torch.Tensor | None, done: torch.cuda.Event | None,
              index: np.ndarray) -> None:
        if done is not None:
            done.synchronize()
        writer.add(features.numpy(), {c: v[index] for c, v in cols.items()},
                   None if blocks is None else blocks.numpy())

    # The previous batch's features travel to the host while the GPU runs the next batch:
    # waiting for them right away would idle the GPU during every HDF5 buffer copy.
    pending = None
    with torch.inference_mode(), amp:
        for batch in loader:
            for i, kind, message in batch.failures:
                writer.add_failure(cols["path"][i], int(cols["size"][i]), int(cols["mtime_ns"][i]), kind, message)
            if batch.pixels is not None:
                pixels = batch.pixels.to(device, non_blocking=True)
                features, blocks = backbone.encode_with_layers(on_device(pixels) if on_device is not None else pixels)
                done = None
                if device.type == "cuda":
                    features = features.to("cpu", non_blocking=True)
                    blocks = None if blocks is None else blocks.to("cpu", non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                if pending is not None:
                    write(*pending)
                pending = (features, blocks, done, batch.index.numpy())
            on_batch(len(batch))
        if pending is not None:
            write(*pending)


def extract(
    inputs: str | os.PathLike | None = None,
    out: str | os.PathLike = "embeddings",
    config: EmbedConfig | None = None,
    *,
    manifest: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    columns: dict[str, str] | None = None,
    target_means: str = "fake",
    split_map: dict[str, str] | None = None,
    retry_failed: bool = False,
    prune_missing: bool = False,
    progress: bool = True,
) -> dict:
    """Embed the images of a folder (`inputs`) or of a `manifest` into the store `out`, as `config` says.

    config: the embedding settings (EmbedConfig(); default ViT-L-14 with OpenAI's weights),
        recorded in the store's provenance. Resumable and torchrun-aware (module docstring).
    manifest, root, columns, target_means, split_map: the inputs (embed.sources.load_inputs).
    retry_failed: embed inputs logged as failures again; progress: show the progress bar.
    Labels follow the inputs: an unchanged file whose label, source, split or group changed gets
    its stored embedding copied into a new row with the current values (no re-embedding).
    Stored paths gone from the inputs are counted ("missing"); prune_missing drops them.
    A store already holding another input folder is refused (paths are relative to their folder).
    Returns this rank's summary: counts (inputs, embedded, failed, skipped, relabelled, missing, pruned), wall time,
    images/s, device, precision and the store path. Raises UserError on bad input.
    """
    t_start = time.perf_counter()
    config = EmbedConfig() if config is None else config
    rank = rank_from_env()
    dev = resolve_device(config.device, rank)
    precision = resolve_precision(config.precision, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE.get(dev.type, DEFAULT_BATCH_SIZE["cpu"])
    workers = default_workers(rank) if config.workers is None else config.workers
    feature = config.feature
    out = Path(os.path.abspath(os.path.expanduser(out)))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a store directory (new or from an earlier run)")

    rows, input_root = _load_rows(inputs, manifest, root, columns, target_means, split_map)
    videos = pl.Series("video", [is_video(p) for p in rows["path"].to_list()], dtype=pl.Boolean)
    # The frames of a video belong together: its path is their group unless a manifest gave one.
    rows = rows.with_columns(group=pl.when(videos & (pl.col("group") == "")).then(pl.col("path"))
                             .otherwise(pl.col("group")))
    mine = partition(rows, rank.rank, rank.world)
    # Files that give any number of rows (embed.frames): videos, and every file when faces are cropped.
    media = pl.Series("media", [config.faces != "none" or is_video(p) for p in mine["path"].to_list()],
                      dtype=pl.Boolean)
    # Seeded so that random init (--pretrained none) is one model on every rank and every resume.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = load_backbone(config.model, config.pretrained, feature=feature, device=dev,
                                 quick_gelu=config.quick_gelu, cache_dir=config.cache_dir, layers=config.layers,
                                 tap=config.tap)
    faces = _face_stage(config, backbone, dev) if config.faces != "none" else None
    provenance = {**backbone.provenance, "dim": backbone.dim, "precision": precision, "input_root": str(input_root),
                  "perturb": config.perturb, "embed_config": config.to_dict(), "video": config.video_settings(),
                  "faces": faces.provenance() if faces is not None else None}

    where = f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
    prune = prune_missing and rank.rank == 0  # tombstones once, not once per rank

    media_counts = {"frames": 0, "no_face": 0, "detector_frames": 0}

    def summary(plan: Plan, writer: store.ShardWriter | None, loop_s: float, failures_file: str | None) -> dict:
        copied = plan.relabel.height if writer else 0
        pruned = plan.missing.height if writer and prune else 0
        embedded = writer.rows_written - copied if writer else 0
        failed = writer.failures_written - pruned if writer else 0
        return {
            "store": str(out), "rank": rank.rank, "world_size": rank.world,
            "device": where, "precision": precision, "model": backbone.provenance["model"],
            "feature": feature, "dim": backbone.dim, "inputs": mine.height, "embedded": embedded,
            "failed": failed, "non_finite": writer.non_finite if writer else 0, "skipped": plan.skipped,
            "skipped_failures": plan.skipped_failures, "relabelled": copied, "pruned": pruned,
            # with --prune-missing, rank 0 prunes for every rank: none is left to report
            "missing": 0 if prune_missing and writer else plan.missing.height,
            "missing_examples": plan.missing["path"].head(3).to_list(),
            "wall_s": round(time.perf_counter() - t_start, 3),
            "images_per_s": round((embedded + failed) / loop_s, 2) if embedded + failed and loop_s else 0.0,
            "batch_size": batch_size, "workers": workers, "shards_written": len(writer.written) if writer else 0,
            "failures_file": failures_file, "videos": int(videos.sum()) if rank.world == 1 else None,
            **media_counts,
        }

    try:  # takes the rank's lock; refuses another model or another input folder
        writer = store.ShardWriter(out, provenance, dim=backbone.dim, dtype=config.dtype,
                                   shard_size=config.shard_size, rank=rank.rank)
    except store.ReadOnlyStore as e:
        plan = _plan(mine, rows, out, retry_failed, media)  # reading needs no lock: shards appear atomically
        if plan.work(prune):
            raise UserError(f"{e} ({plan.todo.height} images to embed, {plan.relabel.height} to relabel"
                            f"{f', {plan.missing.height} to prune' if prune else ''})") from None
        return summary(plan, None, 0.0, None)  # nothing to do: a read-only store is fine

    with writer:
        plan = _plan(mine, rows, out, retry_failed, media)
        todo = plan.todo
        writer.expected_rows = plan.work(prune)
        if dev.type == "cpu" and todo.height:
            log.print(f"{escape(rank.tag)}[bold yellow]device: CPU[/] - no GPU in use, so a CLIP model runs slowly "
                      "(fine for the tiny model; use a CUDA machine for real runs)")
        log.print(escape(rank.tag) + escape(
            f"extracting {todo.height} of {mine.height} {_what(mine, videos)} ({plan.skipped} already in the store"
            f"{f', {plan.relabel.height} of them relabelled' if plan.relabel.height else ''}) -> {out} | "
            f"device {where}, {precision}, model {backbone.provenance['model']} feature {feature} dim {backbone.dim}"
            f"{' layers ' + ','.join(map(str, backbone.layers)) if backbone.layers else ''}"
            f"{' perturb ' + config.perturb if config.perturb else ''}"
            f"{_media_note(config) if videos.any() or faces is not None else ''} | "
            f"batch {batch_size}, {workers} workers"))
        _copy_relabelled(plan, writer, config.shard_size)
        if prune:
            _prune(plan.missing, writer)
        t_loop = time.perf_counter()
        todo_media = todo.join(mine.filter(media).select("path"), on="path", how="semi")
        todo_plain = todo.join(todo_media.select("path"), on="path", how="anti")
        if todo.height:
            # Workers decode and resize to uint8; ToTensor + Normalize run on the device.
            split = split_preprocess(backbone.preprocess)
            host, on_device = split if split else (backbone.preprocess, None)
            with _progress_bar(progress and rank.rank == 0) as bar:
                task = bar.add_task(f"{escape(rank.tag)}embedding", total=todo.height)
                if todo_plain.height:
                    dataset = ImageFiles(input_root, todo_plain["path"].to_list(), host, Perturb(config.perturb))
                    loader = make_loader(dataset, batch_size=batch_size, workers=workers,
                                         pin_memory=dev.type == "cuda")
                    with worker_deaths(loader):
                        _embed_all(loader, backbone, precision, writer, todo_plain, lambda n: bar.advance(task, n),
                                   on_device=on_device)
                    del loader  # stop the workers now, not at garbage collection
                if todo_media.height:
                    media_counts.update(_embed_media(todo_media, plan, input_root, config, backbone, precision, writer,
                                                     faces, split, batch_size, workers, lambda: bar.advance(task, 1)))
        writer.flush()
        loop_s = time.perf_counter() - t_loop
        failures_file = None
        view_lost = not (out / fmt.FAILURES_FILE).is_file() and store.list_shards(out)  # e.g. a full disk
        if writer.written or view_lost:  # the views change only when shards were added
            written = store.open(out)
            failures_file = str(written.write_failures_view())
            if faces is not None:
                written.write_detections_view()
        elif (out / fmt.FAILURES_FILE).is_file():
            failures_file = str(out / fmt.FAILURES_FILE)
        return summary(plan, writer, loop_s, failures_file)


def _what(rows: pl.DataFrame, videos: pl.Series) -> str:
    n_videos = int(videos.sum())
    if n_videos == 0:
        return "images"
    return "videos" if n_videos == videos.len() else f"files ({n_videos} of {videos.len()} are videos)"


def _media_note(config: EmbedConfig) -> str:
    frames = f"every {config.frame_stride}th frame" if config.frame_stride else \
        f"{config.frames or 'all'} frames per video"
    faces = "" if config.faces == "none" else f", faces {config.faces} ({config.face_detector}, scale {config.face_scale:g})"
    return f" | {frames}{faces}"


def _face_stage(config: EmbedConfig, backbone: Backbone, dev: torch.device) -> FaceStage:
    """The face stage on the model's device, with another store's detections when --detections names one."""
    size = backbone.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    cache = None
    if config.detections:
        source = store.open(config.detections)
        cache = source.detections
        if cache.height == 0:
            raise UserError(f"--detections {config.detections} holds no face detections; extract it with --faces "
                            "largest or --faces all first, or drop --detections")
    stage = FaceStage(config, dev, size, cache)
    if config.detections:
        theirs = (source.provenance.get("faces") or {}).get("detector")
        if fmt.identity({"d": theirs}, ("d",)) != fmt.identity({"d": stage.detector.provenance}, ("d",)):
            raise UserError(f"--detections {config.detections} was detected with {theirs}, not with "
                            f"{stage.detector.provenance}; use --face-detector as it was, or drop --detections")
    return stage


def _embed_media(todo: pl.DataFrame, plan: Plan, input_root: Path, config: EmbedConfig, backbone: Backbone,
                 precision: str, writer: store.ShardWriter, faces: FaceStage | None, split, batch_size: int,
                 workers: int, on_file: Callable[[], None]) -> dict[str, int]:
    """Videos and face crops (embed.frames): decode in workers, face stage and tower on the device."""
    dev = backbone.device
    host, on_device = split if split else (backbone.preprocess, None)
    if on_device is None:  # a transform that cannot be split: run it whole on each uint8 frame on the host
        def on_device(pixels: torch.Tensor) -> torch.Tensor:
            return torch.stack([backbone.preprocess(Image.fromarray(p.cpu().numpy())) for p in pixels]).to(dev)
        host = None if faces is not None else (lambda image: torch.from_numpy(
            np.asarray(image.convert("RGB"), dtype=np.uint8).copy()))
    dataset = MediaFiles(input_root, todo["path"].to_list(), frames=config.frames, stride=config.frame_stride,
                         host=None if faces is not None else host, perturb=Perturb(config.perturb))
    extra = dict(persistent_workers=False, prefetch_factor=2) if workers > 0 else {}
    loader = DataLoader(dataset, batch_size=None, num_workers=min(workers, todo.height),
                        pin_memory=dev.type == "cuda", **extra)
    amp = (torch.autocast(dev.type, dtype=AMP_DTYPES[precision]) if precision in AMP_DTYPES
           else contextlib.nullcontext())

    def embed(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with amp:
            return backbone.encode_with_layers(on_device(pixels))

    with torch.inference_mode(), worker_deaths(loader):
        counts = embed_media(loader, todo, embed, writer, device=dev, batch_size=batch_size, faces=faces,
                             skip=plan.skip, on_file=on_file)
    del loader
    return counts


def extract_like(provenance: dict, images: str | os.PathLike, out: str | os.PathLike, *, device: str = "auto",
                 workers: int | None = None, progress: bool = True, layers: Sequence[int] | None = None) -> dict:
    """Embed `images` (a folder, or one image or video file) into the store `out`/store exactly as the store of
    `provenance` was embedded (embed.config.config_from_provenance), on `device` with `workers`.
    layers: the blocks to store (default: those of `provenance`).

    One file is embedded through a link in a folder of `out` (named so the walk never skips it, a
    hidden file included); messages name the file itself, never that folder."""
    from dfclip.embed.sources import scan_folder

    images = Path(images)
    out = Path(out)
    if not images.exists():
        raise UserError(f"{images} does not exist; give a folder of images and videos, or one image or video file")
    out.mkdir(parents=True, exist_ok=True)
    if images.is_file():  # one image: a folder holding a link to it
        folder = out / "_input"
        folder.mkdir(exist_ok=True)
        link = folder / (f"_{images.name}" if images.name.startswith(".") else images.name)
        if not link.exists():
            link.symlink_to(images.resolve())
        try:
            scan_folder(folder)
        except UserError:
            raise UserError(f"{images} is not an image file dfclip reads (extension {images.suffix or '(none)'}); "
                            "give an image, or a folder of images") from None
        images = folder
    config = dataclasses.replace(config_from_provenance(provenance, out), device=device, workers=workers)
    if layers is not None:
        config = dataclasses.replace(config, layers=",".join(map(str, layers)))
    return extract(images, out / "store", config, progress=progress)
