"""Video files in: which frames to take, and decoding exactly those frames with PyAV (FFmpeg).

    index = probe("clip.mp4")                      # every frame's timestamp, from the packets
    positions = sample_positions(index.n_frames, frames=32)
    for position, rgb in read_frames("clip.mp4", index, positions): ...

Frame numbers are positions in presentation order (0 = the first frame shown), counted from
the video stream's packets without decoding anything: one packet holds one frame for every
codec FFmpeg writes into mp4/mkv/webm/avi/mov. Frames are then found by their timestamp, so
seeking is exact: a seek lands on the keyframe at or before the wanted frame and decoding runs
forward from there to the frame with the wanted timestamp. A seek is made only when the next
wanted frame lies past the next keyframe; otherwise decoding simply continues.

Streams whose packets carry no timestamps (some old AVI files) are counted and read by
decoding from the start, which is exact too, only slower.

Row names of video frames (store.format.frame_path): "clip.mp4#f000012" is frame 12 of
clip.mp4; with several faces kept per frame, "clip.mp4#f000012@1" is its face 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from dfclip.embed.images import ImageError

VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}
)
DEFAULT_FRAMES = 32  # evenly spaced frames per video, as DeepfakeBench samples them


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


class VideoError(ImageError):
    """A video that cannot be read. `kind`: empty, not_a_video, no_video_stream, corrupt, no_frames, io_error."""


@dataclass
class VideoIndex:
    """The frames of a video's first video stream, in presentation order."""

    pts: list[int] | None  # timestamps (stream time base) of frame 0, 1, ...; None: the stream has none
    keyframe: list[bool] = field(default_factory=list)  # frame i starts a keyframe packet
    n_frames: int = 0
    width: int = 0
    height: int = 0
    fps: float = 0.0


def parse_frames(spec: str | int | None) -> int | None:
    """`--frames N` (N >= 1) or `all` (None: every frame)."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        from dfclip.errors import UserError

        raise UserError(f"bad --frames {spec!r}; give a number of frames per video (e.g. 32) or all")
    return n


def sample_positions(n_frames: int, frames: int | None = DEFAULT_FRAMES, stride: int | None = None) -> list[int]:
    """Which frames to take from a video of `n_frames` frames.

    stride S: frames 0, S, 2S, ... (takes precedence over `frames`). frames N: N positions
    spread evenly over the whole video, first and last frame included, rounded down
    (`np.linspace(0, n-1, N)` truncated to integers, as DeepfakeBench does); a video with N
    frames or fewer gives every frame. frames None (`--frames all`): every frame.
    """
    if n_frames <= 0:
        return []
    if stride is not None:
        return list(range(0, n_frames, stride))
    if frames is None or frames >= n_frames:
        return list(range(n_frames))
    return sorted(set(np.linspace(0, n_frames - 1, frames).astype(np.int64).tolist()))


def _open(path: str):
    import av

    try:
        if os.path.getsize(path) == 0:
            raise VideoError("empty", f"{path} is a zero-byte file")
        container = av.open(path, metadata_errors="ignore")
    except VideoError:
        raise
    except OSError as e:
        if isinstance(e, av.error.FFmpegError):
            raise VideoError("not_a_video", f"{path}: {e}") from None
        raise VideoError("io_error", f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - FFmpeg's error types vary by build
        raise VideoError("not_a_video", f"{path}: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no_video_stream", f"{path} has no video stream (audio only?)")
    return container


def probe(path: str | os.PathLike) -> VideoIndex:
    """Count the frames of `path` and note their timestamps from its packets (no decoding)."""
    import av

    path = str(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        pts, keys, no_pts = [], [], False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                if packet.pts is None:
                    no_pts = True
                    break
                pts.append(packet.pts)
                keys.append(bool(packet.is_keyframe))
        except av.error.FFmpegError as e:
            raise VideoError("corrupt", f"{path}: cannot read its packets: {e}") from None
        index = VideoIndex(None, [], 0, stream.codec_context.width, stream.codec_context.height,
                           float(rate) if rate else 0.0)
        if no_pts:
            index.n_frames = _count_by_decoding(container, stream, path)
        else:
            order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
            index.pts = [pts[i] for i in order]
            index.keyframe = [keys[i] for i in order]
            index.n_frames = len(pts)
        if index.n_frames == 0:
            raise VideoError("no_frames", f"{path} has a video stream without frames")
        return index
    finally:
        container.close()


def _count_by_decoding(container, stream, path: str) -> int:
    import av

    container.seek(0)
    try:
        return sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as e:
        raise VideoError("corrupt", f"{path}: cannot decode: {e}") from None


def read_frames(path: str | os.PathLike, index: VideoIndex, positions: list[int]
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (position, RGB uint8 [H, W, 3]) for each of the sorted `positions` of `index`.

    Raises VideoError("corrupt", ...) when the video cannot be decoded up to a wanted frame;
    the frames yielded before that are good.
    """
    import av

    path = str(path)
    if not positions:
        return
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's frame threads; exact either way
        if index.pts is None:
            yield from _read_sequential(container, stream, positions, path)
            return
        wanted = {index.pts[p]: p for p in positions}
        # For each wanted frame: the last keyframe at or before it (where a seek would land).
        key_at, last_key = [], 0
        for i, k in enumerate(index.keyframe):
            last_key = i if k else last_key
            key_at.append(last_key)
        decoded_upto = -1  # position of the last frame decoded, in presentation order
        frames = None
        remaining = list(positions)
        while remaining:
            target = remaining[0]
            if frames is None or key_at[target] > decoded_upto + 1:
                container.seek(index.pts[key_at[target]], stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            try:
                frame = next(frames, None)
            except av.error.FFmpegError as e:
                raise VideoError("corrupt", f"{path}: decoding stopped before frame {target}: {e}") from None
            if frame is None:
                raise VideoError("corrupt", f"{path}: the video ends before frame {target} of {index.n_frames}")
            if frame.pts is None:
                continue
            position = _position(index.pts, frame.pts)
            if position is not None:
                decoded_upto = position
            if frame.pts in wanted and wanted[frame.pts] == target:
                yield target, frame.to_ndarray(format="rgb24")
                remaining.pop(0)
            elif position is not None and position > target:  # the decoder never gave the wanted frame
                raise VideoError("corrupt", f"{path}: frame {target} could not be decoded")
    finally:
        container.close()


def _position(pts: list[int], value: int) -> int | None:
    i = int(np.searchsorted(pts, value))
    return i if i < len(pts) and pts[i] == value else None


def _read_sequential(container, stream, positions: list[int], path: str) -> Iterator[tuple[int, np.ndarray]]:
    import av

    wanted = set(positions)
    last = positions[-1]
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                yield i, frame.to_ndarray(format="rgb24")
            if i >= last:
                return
    except av.error.FFmpegError as e:
        raise VideoError("corrupt", f"{path}: cannot decode: {e}") from None
    raise VideoError("corrupt", f"{path}: the video ends before frame {last}")
