"""Videos and face crops in the extract job: input files that give any number of rows.

A still image without a face stage is one row, and embed.extract handles it on its own fast path.
Everything else goes through here:

- a video gives one row per sampled frame (embed.video), named "clip.mp4#f000012";
- with `--faces largest`, each image or frame gives the row of its largest face; with `--faces
  all`, one row per face, named "x.png@1" or "clip.mp4#f000012@1" (store.format.row_path).

Decode workers (MediaFiles) read the files and send their frames in chunks of at most
CHUNK_BYTES: full frames when a face stage follows, frames already resized by the model's host
transform when not. The main process (embed_media) runs the face stage on the model's device,
batched over the frames of a chunk: detect (or look the detections up in a cache), choose the
faces, align and crop them at the model's input size, then normalise and embed them with the
image path's own device transform.

Resume is per row. Every file's rows and failures are handed to the writer before its completion
record (ShardWriter.add_done), so a store holding the record holds all of the file's rows, and
a resumed extract skips exactly those files. A file cut short by a kill is read again, and its
rows already in the store are not embedded twice (`skip`).

A frame without a face is never dropped silently: it is a failure "no_face" (or, with
`--face-fallback center`, a centre crop whose row has n_faces 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dfclip.embed.images import ImageError, load_rgb
from dfclip.embed.video import is_video, probe, read_frames, sample_positions
from dfclip.store import format as fmt

CHUNK_BYTES = 64 << 20  # uint8 frame bytes per chunk a worker sends (about 10 frames of 1080p)
NO_FACE = "no_face"


@dataclass
class Chunk:
    """Frames of one input file, as a decode worker sends them."""

    file: int  # position of the file in the job's list
    positions: list[int]  # frame number of each frame (-1: a still image)
    pixels: torch.Tensor | None  # uint8 [c, H, W, 3]: full frames, or frames after the host transform
    last: bool = False  # no more chunks of this file follow
    n_frames: int = -1  # frames in the whole video (-1: a still image)
    error: tuple[str, str] | None = None  # (kind, message): the file failed at `positions` (all of it if empty)

    def pin_memory(self) -> "Chunk":  # called by DataLoader(pin_memory=True): frames copy to a GPU asynchronously
        pinned = None if self.pixels is None else self.pixels.pin_memory()
        return Chunk(self.file, self.positions, pinned, self.last, self.n_frames, self.error)


class MediaFiles(IterableDataset):
    """The frames of images and videos, chunk by chunk. Worker w of W reads files w, w + W, ...

    host: the model's PIL transform ending in uint8 HWC (embed.backbone.HostPreprocess), or None to
    send full frames (a face stage follows). perturb: (image, row name) -> image, per frame.
    """

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], *, frames: int | None, stride: int | None,
                 host: Callable | None, perturb: Callable | None = None) -> None:
        self.root, self.paths = str(root), list(paths)
        self.frames, self.stride, self.host, self.perturb = frames, stride, host, perturb or None

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        start, step = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(start, len(self.paths), step):
            yield from self._file(i)

    def _frame(self, rgb: np.ndarray, name: str) -> torch.Tensor:
        if self.perturb is None and self.host is None:
            return torch.from_numpy(rgb)
        image = Image.fromarray(rgb)
        if self.perturb is not None:
            image = self.perturb(image, name)
        return self.host(image) if self.host is not None else torch.from_numpy(np.asarray(image, dtype=np.uint8))

    def _file(self, i: int) -> Iterator[Chunk]:
        path = self.paths[i]
        full = os.path.join(self.root, path)
        try:
            if not is_video(path):
                rgb = np.array(load_rgb(full), dtype=np.uint8)  # writable: torch shares its memory
                yield Chunk(i, [-1], self._frame(rgb, path)[None], last=True)
                return
            index = probe(full)
            positions = sample_positions(index.n_frames, self.frames, self.stride)
            per_chunk = max(1, CHUNK_BYTES // max(1, index.width * index.height * 3))
            got: list[tuple[int, torch.Tensor]] = []
            sent = 0
            try:
                for position, rgb in read_frames(full, index, positions):
                    got.append((position, self._frame(rgb, fmt.row_path(path, position))))
                    if len(got) == per_chunk:
                        yield _chunk(i, got, index.n_frames)
                        sent += len(got)
                        got = []
            except ImageError as e:  # the video breaks off: keep what was read, the rest are failures
                if got:
                    yield _chunk(i, got, index.n_frames)
                    sent += len(got)
                yield Chunk(i, positions[sent:], None, True, index.n_frames, (e.kind, e.message))
                return
            yield _chunk(i, got, index.n_frames, last=True)
        except ImageError as e:
            yield Chunk(i, [], None, True, -1, (e.kind, e.message))
        except Exception as e:  # noqa: BLE001 - one odd file must not end a million-file run
            yield Chunk(i, [], None, True, -1, ("preprocess_error", f"{path}: {type(e).__name__}: {e}"))


def _chunk(i: int, got: list[tuple[int, torch.Tensor]], n_frames: int, last: bool = False) -> Chunk:
    return Chunk(i, [p for p, _ in got], torch.stack([x for _, x in got]) if got else None, last, n_frames)


# ---------------------------------------------------------------- the face stage

def _faces_from_records(records: pl.DataFrame):
    """Faces of one frame from its detection records (face -1 alone: no face found)."""
    from dfclip.embed.faces import Faces

    found = records.filter(pl.col("face") >= 0).sort("face")
    if found.height == 0:
        return Faces.empty()
    return Faces(torch.from_numpy(found["box"].to_numpy().astype(np.float32)).reshape(-1, 4),
                 torch.from_numpy(found["landmarks"].to_numpy().astype(np.float32)).reshape(-1, 5, 2),
                 torch.from_numpy(found["score"].to_numpy().astype(np.float32)))


class FaceStage:
    """Detect, choose, align and crop faces on `device`; settings from an EmbedConfig.

    cache: detections of another store (fmt.DETECTION_SCHEMA) to use instead of the detector;
    frames it lacks are detected. `detector_calls` counts the frames sent to the detector.
    """

    def __init__(self, config, device: torch.device, size: int, cache: pl.DataFrame | None = None) -> None:
        from dfclip.embed.faces import load_detector

        self.config, self.device, self.size = config, device, size
        self.detector = load_detector(config.face_detector, device)
        self.cache: dict[tuple, pl.DataFrame] = {}
        if cache is not None and cache.height:
            for key, part in cache.group_by(["path", "size", "mtime_ns", "frame"]):
                self.cache[tuple(key)] = part
        self.detector_calls = 0
        self.cache_hits = 0

    def provenance(self) -> dict:
        c = self.config
        return {"mode": c.faces, "detector": self.detector.provenance, "scale": c.face_scale,
                "min_score": c.min_face_score, "min_size": c.min_face_size, "fallback": c.face_fallback,
                "size": self.size}

    def detect(self, file: dict, positions: list[int], frames: torch.Tensor) -> list:
        """One Faces per frame: from the cache where it has the frame, else from the detector."""
        found: list = [None] * len(positions)
        missing = []
        for j, position in enumerate(positions):
            records = self.cache.get((file["path"], file["size"], file["mtime_ns"], position))
            if records is None:
                missing.append(j)
            else:
                found[j] = _faces_from_records(records)
                self.cache_hits += 1
        if missing:
            self.detector_calls += len(missing)
            for j, faces in zip(missing, self.detector.detect(frames[missing])):
                found[j] = faces
        return found

    def records(self, file: dict, positions: list[int], faces: list) -> dict[str, list]:
        """The detector output of these frames as detection records (one with face -1 for a faceless frame)."""
        out: dict[str, list] = {c: [] for c in fmt.DETECTION_SCHEMA}
        nan4, nan10 = [float("nan")] * 4, [float("nan")] * 10
        for position, f in zip(positions, faces):
            entries = [(k, float(f.scores[k]), f.boxes[k].tolist(), f.landmarks[k].reshape(-1).tolist())
                       for k in range(len(f))] or [(-1, float("nan"), nan4, nan10)]
            for k, score, box, marks in entries:
                for c, v in zip(out, (file["path"], file["size"], file["mtime_ns"], position, k, score, box, marks)):
                    out[c].append(v)
        return out

    def crops(self, positions: list[int], frames: torch.Tensor, faces: list
              ) -> tuple[torch.Tensor | None, list[tuple[int, int, int, float, list[float]]], list[int]]:
        """(uint8 crops [n, S, S, 3] on the device, per crop (position, face_index, n_faces, score, box),
        positions of frames without a usable face that became failures)."""
        from dfclip.embed.faces import align_crops, box_crops, center_box, select_faces

        c = self.config
        aligned, centred, meta, no_face = [], [], [], []
        for j, (position, f) in enumerate(zip(positions, faces)):
            chosen = select_faces(f, c.faces, c.min_face_score, c.min_face_size)
            if not chosen:
                if c.face_fallback == "center":
                    centred.append(j)
                    box = center_box(frames.shape[1], frames.shape[2]).tolist()
                    meta.append((position, -1, 0, float("nan"), box, len(centred) - 1, True))
                else:
                    no_face.append(position)
                continue
            for rank, k in enumerate(chosen):
                aligned.append((j, k))
                face_index = rank if c.faces == "all" else 0
                meta.append((position, face_index, len(f), float(f.scores[k]), f.boxes[k].tolist(), len(aligned) - 1,
                             False))
        parts = []
        if aligned:
            index = torch.tensor([j for j, _ in aligned], device=frames.device)
            marks = torch.stack([faces[j].landmarks[k] for j, k in aligned])
            parts.append(align_crops(frames, index, marks, self.size, c.face_scale))
        if centred:
            index = torch.tensor(centred, device=frames.device)
            boxes = torch.stack([center_box(frames.shape[1], frames.shape[2])] * len(centred))
            parts.append(box_crops(frames, index, boxes, self.size, 1.0))
        if not parts:
            return None, [], no_face
        # Rows in frame order: aligned crops first in `parts`, then centre crops; `at` puts each back.
        offset = {False: 0, True: len(aligned)}
        stacked = torch.cat(parts)
        order = torch.tensor([offset[is_centre] + at for *_, at, is_centre in meta], device=stacked.device)
        crops = stacked[order].permute(0, 2, 3, 1).contiguous()  # [n, S, S, 3] like the host transform's output
        return crops, [m[:5] for m in meta], no_face


# ---------------------------------------------------------------- the main-process loop

class _Queue:
    """Rows waiting for the tower, and the completion records that must follow them into the writer."""

    def __init__(self) -> None:
        self.items: list = []  # ("rows", pixels, columns) or ("done", record)
        self.n = 0

    def rows(self, pixels: torch.Tensor, columns: dict[str, list]) -> None:
        self.items.append(("rows", pixels, columns))
        self.n += len(pixels)

    def done(self, record: tuple) -> None:
        self.items.append(("done", record))


def embed_media(loader, files: pl.DataFrame, embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
                writer, *, device: torch.device, batch_size: int, faces: FaceStage | None,
                skip: dict[str, set[str]], on_file: Callable[[], None]) -> dict[str, int]:
    """Run every chunk of `loader` (MediaFiles) through the face stage and `embed` (uint8 HWC batch ->
    (features, blocks)) into `writer`. files: the job's input rows, in the loader's file order.
    skip: per file path, row names already in the store. Returns counts (frames, rows, no_face, skipped)."""
    cols = {c: files[c].to_list() for c in fmt.ROW_COLUMNS}
    queue = _Queue()
    counts = {"frames": 0, "rows": 0, "no_face": 0, "skipped_rows": 0, "detector_frames": 0}
    per_file: dict[int, int] = {}
    per_face = faces is not None and faces.config.faces == "all"

    def drain(everything: bool) -> None:
        if queue.n == 0 and not everything:
            return
        pending_rows = [it for it in queue.items if it[0] == "rows"]
        if pending_rows:
            pixels = torch.cat([it[1] for it in pending_rows])
            outs = [embed(pixels[a:a + batch_size]) for a in range(0, len(pixels), batch_size)]
            features = torch.cat([f for f, _ in outs]).cpu().numpy()
            blocks = None if outs[0][1] is None else torch.cat([b for _, b in outs]).cpu().numpy()
        at = 0
        for it in queue.items:
            if it[0] == "rows":
                n = len(it[1])
                writer.add(features[at:at + n], it[2], None if blocks is None else blocks[at:at + n])
                at += n
            else:
                writer.add_done(*it[1])
        queue.items.clear()
        queue.n = 0

    for chunk in loader:
        file = {c: cols[c][chunk.file] for c in fmt.ROW_COLUMNS}
        name = file["path"]
        done_rows = skip.get(name, set())
        # a row's name: its frame, and its face's rank when every face is a row (--faces all)
        row_name = lambda m: fmt.row_path(name, m[0], m[1] if per_face else -1)  # noqa: E731
        if chunk.error is not None:
            kind, message = chunk.error
            if not chunk.positions:
                writer.add_failure(name, file["size"], file["mtime_ns"], kind, message)
            for position in chunk.positions:
                row = fmt.row_path(name, position)
                if row not in done_rows:
                    writer.add_failure(row, file["size"], file["mtime_ns"], kind, message)
                    per_file[chunk.file] = per_file.get(chunk.file, 0) + 1
        if chunk.pixels is not None:
            counts["frames"] += len(chunk.positions)
            frames = chunk.pixels.to(device, non_blocking=True)
            if faces is None:
                keep = [j for j, p in enumerate(chunk.positions) if fmt.row_path(name, p) not in done_rows]
                counts["skipped_rows"] += len(chunk.positions) - len(keep)
                meta = [(chunk.positions[j], -1, -1, float("nan"), [float("nan")] * 4) for j in keep]
                pixels = frames[keep] if len(keep) < len(chunk.positions) else frames
            else:
                found = faces.detect(file, chunk.positions, frames)
                writer.add_detections(faces.records(file, chunk.positions, found))
                pixels, meta, no_face = faces.crops(chunk.positions, frames, found)
                for position in no_face:
                    row = fmt.row_path(name, position)
                    if row not in done_rows:
                        writer.add_failure(row, file["size"], file["mtime_ns"], NO_FACE,
                                           f"no face found{_filters(faces.config)}")
                        counts["no_face"] += 1
                        per_file[chunk.file] = per_file.get(chunk.file, 0) + 1
                names = [row_name(m) for m in meta]
                keep = [j for j, row in enumerate(names) if row not in done_rows]
                counts["skipped_rows"] += len(meta) - len(keep)
                meta = [meta[j] for j in keep]
                pixels = pixels[keep] if pixels is not None and keep else None
            if meta:
                columns = {c: [file[c]] * len(meta) for c in fmt.ROW_COLUMNS}
                columns["path"] = [row_name(m) for m in meta]
                for c, k in (("frame", 0), ("face_index", 1), ("n_faces", 2), ("face_score", 3), ("face_box", 4)):
                    columns[c] = [m[k] for m in meta]
                queue.rows(pixels, columns)
                counts["rows"] += len(meta)
                per_file[chunk.file] = per_file.get(chunk.file, 0) + len(meta)
        if chunk.last:
            queue.done((name, file["size"], file["mtime_ns"], chunk.n_frames, per_file.pop(chunk.file, 0)))
            on_file()
        if queue.n >= batch_size:
            drain(False)
    drain(True)
    if faces is not None:
        counts["detector_frames"] = faces.detector_calls
    return counts


def _filters(config) -> str:
    parts = []
    if config.min_face_score > 0:
        parts.append(f"score >= {config.min_face_score:g}")
    if config.min_face_size > 0:
        parts.append(f"size >= {config.min_face_size:g} px")
    return f" ({', '.join(parts)})" if parts else ""
