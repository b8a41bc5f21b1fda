"""Test pictures and videos with known face positions, made on the fly (no test data on disk).

The face is the astronaut photo that ships with scikit-image (`skimage.data.astronaut()`, a
public-domain NASA portrait): a real face, which MTCNN finds with confidence 0.99999, unlike
drawn cartoons. `astronaut_face()` cuts out the head; `paste_face` scales, rotates and places it
on a canvas and returns where its box and five landmarks went, so a test knows the truth.

Videos are written with PyAV (`write_video`); `numbered_frames` draws frames whose index can be
read back after lossy encoding (`frame_number`), for checks of which frames a decoder sampled.
Broken inputs: `write_audio_only` (a container without a video stream), `truncate_file` and
`write_garbage`.

This is a helper module for tests, the demo's tests and benchmarks; it holds no tests itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# MTCNN (facenet-pytorch 2.6.0, default settings) on skimage.data.astronaut(), full 512x512 photo:
# box x0, y0, x1, y1 and the five landmarks (left eye, right eye, nose, left mouth, right mouth).
ASTRONAUT_BOX = np.array([181.05, 62.16, 267.75, 172.05])
ASTRONAUT_LANDMARKS = np.array(
    [[205.01, 101.73], [246.76, 103.71], [224.67, 128.96], [201.72, 139.25], [245.27, 141.86]]
)
HEAD_REGION = (140, 20, 310, 215)  # x0, y0, x1, y1 of the cut-out: the head with hair and neck

# Container suffix -> the codec write_video uses by default (all bundled in PyAV's wheels).
DEFAULT_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9"}


@dataclass(frozen=True)
class Face:
    """A face picture and where its MTCNN box and landmarks are, in its own pixel coordinates."""

    pixels: np.ndarray  # uint8 [h, w, 3]
    box: np.ndarray  # float [4] x0, y0, x1, y1
    landmarks: np.ndarray  # float [5, 2] (x, y)


class Pasted(NamedTuple):
    """A frame with a face pasted in, and where the face's box and landmarks are in the frame.

    `box` is the face box moved with the face; for a rotated face it is the axis-aligned hull of
    the rotated box's corners (larger than what a detector draws around the tilted face).
    """

    frame: np.ndarray  # uint8 [H, W, 3]
    box: np.ndarray  # float [4]
    landmarks: np.ndarray  # float [5, 2]


@functools.lru_cache(maxsize=1)
def astronaut_face() -> Face:
    """The astronaut's head (170 x 195 px) with its MTCNN box and landmarks."""
    from skimage.data import astronaut

    x0, y0, x1, y1 = HEAD_REGION
    offset = np.array([x0, y0], dtype=np.float64)
    pixels = np.ascontiguousarray(astronaut()[y0:y1, x0:x1])
    pixels.setflags(write=False)
    return Face(pixels, ASTRONAUT_BOX - np.tile(offset, 2), ASTRONAUT_LANDMARKS - offset)


def background(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A faceless uint8 [h, w, 3] frame: a diagonal colour gradient with mild grain."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.uniform(40, 215, size=(2, 3))
    t = (np.arange(h)[:, None] / max(h - 1, 1) + np.arange(w)[None, :] / max(w - 1, 1)) / 2
    pixels = (1 - t[..., None]) * top + t[..., None] * bottom + rng.normal(0, 4, size=(h, w, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def noise_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """n faceless uint8 [n, h, w, 3] frames of uniform noise (MTCNN finds nothing in them)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _feather(h: int, w: int, border: float = 0.06) -> np.ndarray:
    """An alpha mask [h, w] in [0, 1]: 1 inside, fading to 0 over `border` of each side."""
    ramp_y = np.clip(np.minimum(np.arange(h) + 0.5, h - np.arange(h) - 0.5) / (border * h), 0, 1)
    ramp_x = np.clip(np.minimum(np.arange(w) + 0.5, w - np.arange(w) - 0.5) / (border * w), 0, 1)
    return np.outer(ramp_y, ramp_x)


def paste_face(canvas: tuple[int, int] | np.ndarray, face: Face, center: tuple[float, float],
               width: float, angle_deg: float = 0.0, seed: int = 0) -> Pasted:
    """Paste `face` so its box is `width` px wide, centred on `center` (x, y), turned by `angle_deg`.

    `canvas` is a (h, w) size (the face goes on `background(h, w, seed)`) or a frame to paste on
    (not modified). A positive angle turns the face counter-clockwise as seen on screen. Parts of
    the face outside the canvas are cut off.
    """
    frame = background(*canvas, seed=seed) if isinstance(canvas, tuple) else np.array(canvas, dtype=np.uint8)
    h, w = frame.shape[:2]
    scale = width / (face.box[2] - face.box[0])
    theta = np.deg2rad(angle_deg)
    # Screen counter-clockwise with y pointing down: x' = c x + s y, y' = -s x + c y.
    rotation = scale * np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    src_centre = (face.box[:2] + face.box[2:]) / 2
    dst_centre = np.asarray(center, dtype=np.float64)

    def forward(points: np.ndarray) -> np.ndarray:  # face pixels -> frame pixels
        return (points - src_centre) @ rotation.T + dst_centre

    inverse = np.linalg.inv(rotation)  # PIL maps each output pixel back to its input pixel
    offset = src_centre - inverse @ dst_centre
    coeffs = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    fh, fw = face.pixels.shape[:2]
    rgb = Image.fromarray(face.pixels).transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
    alpha = Image.fromarray((_feather(fh, fw) * 255).round().astype(np.uint8), "L")
    alpha = alpha.transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255
    frame = (a * np.asarray(rgb, dtype=np.float32) + (1 - a) * frame).round().astype(np.uint8)

    x0, y0, x1, y1 = face.box
    corners = forward(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    box = np.concatenate([corners.min(0), corners.max(0)])
    return Pasted(frame, box, forward(face.landmarks))


def face_frames(n: int, h: int, w: int, width: float, seed: int = 0,
                angle_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n frames [n, h, w, 3] of the astronaut face gliding left to right (and a little down).

    Returns the frames and the true boxes [n, 4]. The face box is `width` px wide and stays
    inside the frame; the background is the same in every frame.
    """
    face = astronaut_face()
    height = width * (face.box[3] - face.box[1]) / (face.box[2] - face.box[0])
    base = background(h, w, seed)
    xs = np.linspace(0.5 * width + 2, w - 0.5 * width - 2, n) if n > 1 else np.array([w / 2])
    ys = np.linspace(0.5 * height + 2, h - 0.5 * height - 2, n) * 0.3 + 0.35 * h if n > 1 else np.array([h / 2])
    pasted = [paste_face(base, face, (x, y), width, angle_deg) for x, y in zip(xs, ys)]
    return np.stack([p.frame for p in pasted]), np.stack([p.box for p in pasted])


NUMBER_BITS = 10  # numbered_frames encodes 0..1023


def numbered_frames(n: int, h: int = 64, w: int = 96) -> np.ndarray:
    """n uint8 frames [n, h, w, 3] whose index is drawn as NUMBER_BITS black/white bars.

    The bars are wide and flat, so the index survives lossy encoding: `frame_number` reads it back.
    """
    if n > 2**NUMBER_BITS:
        raise ValueError(f"numbered_frames encodes at most {2**NUMBER_BITS} frames")
    bars = (np.arange(n)[:, None] >> np.arange(NUMBER_BITS)[None, :]) & 1  # [n, bits], lowest bit first
    columns = bars[:, np.arange(w) * NUMBER_BITS // w]  # [n, w]
    return np.broadcast_to((columns * 255).astype(np.uint8)[:, None, :, None], (n, h, w, 3)).copy()


def frame_number(frame: np.ndarray) -> int:
    """The index drawn by `numbered_frames` into `frame` (uint8 [h, w, 3]), read from bar centres."""
    h, w = frame.shape[:2]
    centres = ((np.arange(NUMBER_BITS) + 0.5) * w / NUMBER_BITS).astype(int)
    bits = frame[h // 4: 3 * h // 4, centres].astype(np.float32).mean(axis=(0, 2)) > 127
    return int((bits.astype(int) << np.arange(NUMBER_BITS)).sum())


def write_video(path: str | Path, frames: list[np.ndarray] | np.ndarray, fps: int = 10,
                codec: str | None = None, crf: int = 18) -> Path:
    """Encode uint8 RGB frames ([T, H, W, 3], even H and W) to `path` with PyAV.

    The container follows the suffix; the codec defaults to DEFAULT_CODECS for it (libx264 for
    .mp4/.mov/.mkv, mpeg4 for .avi, VP9 for .webm). `crf` sets libx264's quality (18: nearly
    lossless to the eye). Returns the path.
    """
    import av

    path = Path(path)
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    if not frames:
        raise ValueError("write_video needs at least one frame")
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p video needs even frame sizes, got {h}x{w}")
    codec = codec or DEFAULT_CODECS[path.suffix.lower()]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def write_audio_only(path: str | Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """A container (by suffix, e.g. .mp4 or .mkv) holding one AAC audio stream and no video."""
    import av

    path = Path(path)
    samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        chunk = 1024  # AAC frame size
        for start in range(0, len(samples), chunk):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + chunk], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate_file(source: str | Path, out: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first `fraction` of `source`'s bytes to `out`: a video cut off mid-stream.

    With fraction 0 the result is a zero-length file. For an .mp4, whose index (moov atom) is
    written at the end, any cut leaves an unreadable file; a cut .mkv opens and decodes a prefix
    of its frames (how many depends on the packet sizes: the first keyframe is the largest).
    """
    data = Path(source).read_bytes()
    out = Path(out)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def write_garbage(path: str | Path, n_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a video's name: a file no demuxer recognises."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes())
    return path
