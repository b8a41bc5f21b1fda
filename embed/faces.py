"""The face stage: detect faces in decoded frames, align them on five landmarks, crop.

It runs in the extract job's main process on the model's device (GPU when there is one), one
video's frames (or one image) per call, all frames of a call having one size:

    frames uint8 [T, H, W, 3] ─► detector.detect ─► list[Faces] (boxes, landmarks, scores per frame)
                                 select_faces     ─► which faces become rows (largest or all, filtered)
                                 align_crops      ─► uint8 [n, 3, size, size] at the backbone's input size

The crops come out at the backbone's input size, so CLIP's own resize and centre crop that run
after them are identities and the face fills exactly the `scale` margin chosen.

Detector: MTCNN from facenet-pytorch 2.6.0 (registered as "mtcnn"). Why it:
- MIT licence; its three small networks (P-, R-, O-Net, about 2 MB) ship *inside the wheel*
  (facenet_pytorch/data/{pnet,rnet,onet}.pt), so nothing is downloaded at run time and the
  weights are hashed into the store's provenance;
- it gives the five landmarks (eyes, nose, mouth corners) a similarity alignment needs, which
  is what DeepfakeBench's 5-point alignment uses (it gets them from dlib's 81-point model);
- it runs batched on a torch device (a [T, H, W, 3] tensor of equal-size frames in one call).
Its metadata pins torch < 2.3, so it cannot be a declared dependency: it is installed with
`pip install requests && pip install --no-deps facenet-pytorch==2.6.0` (INSTALL_LINE; requests is
the one package it imports that dfclip does not bring) and runs with current torch. Alternatives considered: dlib (HOG detector + landmark files downloaded
separately, the most common breakage of DeepfakeBench's preprocessing), insightface / RetinaFace
(weights downloaded at run time; insightface's are for non-commercial use only), OpenCV's Haar
cascades (no landmarks; ship only in opencv 4.x wheels), mediapipe's BlazeFace (models only in
0.10.14 and older). Another detector is one `DETECTORS` entry: a factory taking the device and
returning an object with `.detect` and `.provenance` (the `FaceDetector` protocol).

Alignment: `similarity_transform` fits rotation + uniform scale + translation (no reflection)
from the five landmarks to `TEMPLATE` by least squares (Umeyama's solution; in 2-D it is the
complex linear regression w = a z + b). `TEMPLATE` is the standard 5-point face template of
ArcFace / DeepfakeBench (112 x 112 px) divided by 112: a unit square with the eyes at y = 0.46
and the mouth at y = 0.82. A crop is that unit square enlarged by `scale` about its centre
(DeepfakeBench's margin: scale 1.3 adds 15% on each side) and sampled at size x size.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from dfclip.errors import UserError
from dfclip.store.format import sha256_file

# requests (imported by facenet_pytorch) goes in with its own dependencies; facenet-pytorch without its
# pins (torch < 2.3, numpy < 2, Pillow < 10.3), which would downgrade dfclip's.
INSTALL_LINE = "pip install requests && pip install --no-deps facenet-pytorch==2.6.0"
MODES = ("largest", "all")
# Left eye, right eye, nose, left mouth corner, right mouth corner ("left" = the image's left,
# as MTCNN orders them), in unit coordinates of the face square (x right, y down).
TEMPLATE = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float64,
) / 112.0
DETECT_CHUNK_PIXELS = 2**25  # frame pixels per MTCNN call: 16 frames of 1920 x 1080 (about 1.5 GiB peak)
# Frames are shrunk so their longer side is at most this before detection (boxes and landmarks
# are scaled back to frame pixels): MTCNN's time grows with the pixels, and its smallest face
# (min_face_size, 20 px) then means 20 px of the shrunk frame, 60 px of a 1920 px one; faces in
# face-forgery videos are larger. MtcnnDetector(max_side=None) detects at full size.
DETECT_MAX_SIDE = 640


@dataclass
class Faces:
    """The faces found in one frame, in the detector's order (CPU tensors).

    boxes: float32 [F, 4] x0, y0, x1, y1 in source pixels (x = column, y = row; pixel (i, j)
      covers [i, i + 1) x [j, j + 1), so [0, 0, W, H] is the whole frame).
    landmarks: float32 [F, 5, 2] (x, y) of left eye, right eye, nose, left and right mouth corner.
    scores: float32 [F] detection confidence in [0, 1].
    """

    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Faces:
        return cls(torch.zeros(0, 4), torch.zeros(0, 5, 2), torch.zeros(0))


class FaceDetector(Protocol):
    """What `load_detector` returns: a batched detector and what identifies its results."""

    provenance: dict

    def detect(self, frames: torch.Tensor) -> list[Faces]:
        """frames: uint8 [T, H, W, 3] RGB, any device; one Faces per frame."""
        ...


def _facenet():
    """facenet_pytorch, imported quietly, or a UserError with the install line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import facenet_pytorch
    except ImportError as e:
        raise UserError(f"the face detector needs facenet-pytorch ({e}); install it with: {INSTALL_LINE}") from None
    return facenet_pytorch


class MtcnnDetector:
    """facenet-pytorch's MTCNN with keep_all=True, on `device`; see the module docstring for why."""

    def __init__(self, device: torch.device | str = "cpu", *, min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709,
                 max_side: int | None = DETECT_MAX_SIDE):
        facenet = _facenet()
        self.device = torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mtcnn = facenet.MTCNN(keep_all=True, post_process=False, min_face_size=min_face_size,
                                       thresholds=list(thresholds), factor=factor, device=self.device).eval()
        data = Path(facenet.__file__).parent / "data"
        self.provenance = {
            "name": "mtcnn",
            "package": "facenet-pytorch",
            "version": importlib.metadata.version("facenet-pytorch"),
            "weights_sha256": {f"{net}.pt": sha256_file(data / f"{net}.pt") for net in ("pnet", "rnet", "onet")},
            "min_face_size": min_face_size,
            "thresholds": list(thresholds),
            "factor": factor,
            "max_side": max_side,
        }
        self.max_side = max_side

    def detect(self, frames: torch.Tensor) -> list[Faces]:
        """One Faces per frame of uint8 [T, H, W, 3]; frames go through MTCNN in chunks of
        DETECT_CHUNK_PIXELS pixels (its image pyramid is float32 copies of the whole batch)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        h, w = frames.shape[1:3]
        shrink = min(1.0, self.max_side / max(h, w)) if self.max_side else 1.0
        size = (max(1, round(h * shrink)), max(1, round(w * shrink)))
        if min(size) < self.provenance["min_face_size"]:  # MTCNN's pyramid would be empty
            return [Faces.empty() for _ in range(len(frames))]
        back = torch.tensor([w / size[1], h / size[0]])  # detector pixels -> frame pixels, per axis
        per_call = max(1, DETECT_CHUNK_PIXELS // (h * w))
        found: list[Faces] = []
        for start in range(0, len(frames), per_call):
            chunk = frames[start:start + per_call].to(self.device)
            if size != (h, w):  # float [T, h', w', 3] in 0..255, which MTCNN takes as it takes uint8
                chunk = F.interpolate(chunk.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                                      antialias=True, align_corners=False).permute(0, 2, 3, 1)
            with warnings.catch_warnings(), torch.inference_mode(), _one_thread(self.device):
                warnings.simplefilter("ignore")
                boxes, scores, points = self.mtcnn.detect(chunk, landmarks=True)
            found += [_as_faces(b, s, p, back) for b, s, p in zip(boxes, scores, points)]
        return found


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """MTCNN on a CPU in one torch thread. Its R- and O-Net stages resize every candidate box with a
    separate small op, and a thread pool's start-up per op costs more than the op: on a 2-core CPU
    with other processes busy, 8 frames of 192 px took 4.5-5.0 s with 2 threads and 0.8-1.0 s with
    one (1 thread: 200 such resizes in 0.04 s, 2 threads: 1.6 s). The pool is set back after."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_faces(boxes, scores, points, back: torch.Tensor) -> Faces:
    """One frame of MTCNN.detect's output (None when nothing was found) as a Faces, with
    coordinates multiplied by `back` (x, y scale to frame pixels)."""
    if boxes is None:
        return Faces.empty()
    as_tensor = lambda a, shape: torch.tensor(a.astype("float32")).reshape(shape)  # noqa: E731
    return Faces(as_tensor(boxes, (-1, 2, 2)).mul(back).reshape(-1, 4), as_tensor(points, (-1, 5, 2)).mul(back),
                 as_tensor(scores, (-1,)))


# name -> factory(device, **settings); the settings are the detector's own keyword arguments.
DETECTORS: dict[str, Callable[..., FaceDetector]] = {"mtcnn": MtcnnDetector}


def load_detector(name: str = "mtcnn", device: torch.device | str = "cpu", **settings) -> FaceDetector:
    """The registered detector `name` on `device`, with `settings` (e.g. min_face_size=40 for
    MTCNN) over its defaults; its provenance records them. A UserError names the choices or the
    install line."""
    if name not in DETECTORS:
        raise UserError(f"unknown face detector {name!r}; choose one of: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](device, **settings)


def select_faces(faces: Faces, mode: str, min_score: float = 0.0, min_size: float = 0.0) -> list[int]:
    """Indices of the faces that become rows: those with score >= min_score and a box whose
    shorter side is >= min_size pixels, largest box area first; `largest` keeps the first.
    An empty list means no face (the caller records the `no_face` failure)."""
    if mode not in MODES:
        raise ValueError(f"face mode must be one of {MODES}, got {mode!r}")
    sides = faces.boxes[:, 2:] - faces.boxes[:, :2]
    keep = (faces.scores >= min_score) & (sides.min(dim=1).values >= min_size)
    area = sides.prod(dim=1)
    order = [i for i in torch.argsort(area, descending=True, stable=True).tolist() if keep[i]]
    return order[:1] if mode == "largest" else order


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity maps [n, 2, 3] taking each src[i] ([n, k, 2]) onto dst ([k, 2]).

    Minimises sum_j |M_i [src_ij, 1] - dst_j|^2 over rotation, uniform scale and translation
    (no reflection), which is Umeyama's solution. In 2-D with points as complex numbers
    z (src) and w (dst) it is the regression w = a z + b: a = sum(conj(z_c) w_c) / sum(|z_c|^2)
    over centred points, b = mean(w) - a mean(z). Computed in float64 and returned in src's dtype.
    """
    s = src.double()
    d = dst.to(s.device, torch.float64).expand_as(s)
    s_mean, d_mean = s.mean(dim=1, keepdim=True), d.mean(dim=1, keepdim=True)
    sc, dc = s - s_mean, d - d_mean
    norm = (sc ** 2).sum(dim=(1, 2)).clamp_min(1e-12)
    re = (sc * dc).sum(dim=(1, 2)) / norm  # a = re + i im
    im = (sc[..., 0] * dc[..., 1] - sc[..., 1] * dc[..., 0]).sum(dim=1) / norm
    linear = torch.stack([torch.stack([re, -im], -1), torch.stack([im, re], -1)], -2)  # [n, 2, 2]
    shift = d_mean[:, 0] - (linear @ s_mean[:, 0, :, None])[..., 0]
    return torch.cat([linear, shift[..., None]], dim=-1).to(src.dtype)


def _invert(maps: torch.Tensor) -> torch.Tensor:
    """Inverses of affine maps [n, 2, 3]."""
    linear = torch.linalg.inv(maps[:, :, :2])
    return torch.cat([linear, -(linear @ maps[:, :, 2:])], dim=-1)


def align_crops(frames: torch.Tensor, frame_index: torch.Tensor, landmarks: torch.Tensor, size: int,
                scale: float = 1.3) -> torch.Tensor:
    """Aligned face crops uint8 [n, 3, size, size]: face i from frames[frame_index[i]], warped so
    its landmarks [n, 5, 2] land on TEMPLATE, the template square enlarged by `scale` about its
    centre. Runs on the frames' device."""
    to_template = similarity_transform(landmarks.to(frames.device, torch.float64), TEMPLATE)
    return _warp(frames, frame_index, _invert(to_template), size, scale)


def center_box(h: int, w: int) -> torch.Tensor:
    """The largest centred square of an h x w frame as a box [4] (the no-face fallback's crop)."""
    side = min(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return torch.tensor([x0, y0, x0 + side, y0 + side], dtype=torch.float64)


def box_crops(frames: torch.Tensor, frame_index: torch.Tensor, boxes: torch.Tensor, size: int,
              scale: float = 1.3) -> torch.Tensor:
    """Square crops uint8 [n, 3, size, size] around boxes [n, 4] without landmarks: the square of
    side max(box width, height) on the box centre, enlarged by `scale` (1.0 for `center_box`)."""
    b = boxes.to(frames.device, torch.float64)
    side = (b[:, 2:] - b[:, :2]).max(dim=1).values
    centre = (b[:, :2] + b[:, 2:]) / 2
    zero = torch.zeros_like(side)
    maps = torch.stack([torch.stack([side, zero, centre[:, 0] - side / 2], -1),
                        torch.stack([zero, side, centre[:, 1] - side / 2], -1)], -2)
    return _warp(frames, frame_index, maps, size, scale)


def _warp(frames: torch.Tensor, frame_index: torch.Tensor, unit_to_source: torch.Tensor, size: int,
          scale: float, antialias: bool = True) -> torch.Tensor:
    """Sample the square [0.5 - scale/2, 0.5 + scale/2]^2 of unit coordinates, mapped into source
    pixels by unit_to_source [n, 2, 3], at size x size; outside the frame is black.

    One face at a time, from the part of its frame the crop reads (so memory is bounded by the
    face, not the frame, and a crop does not depend on the other faces of the call). A face larger
    than the output (more than one source pixel per output pixel) is first shrunk with an
    antialiasing resize to about one source pixel per output pixel, then warped bilinearly:
    bilinear sampling alone would alias fine texture (hair, compression blocks) of large faces.
    """
    out = torch.zeros(len(frame_index), 3, size, size, dtype=torch.uint8, device=frames.device)
    u = 0.5 + ((torch.arange(size, device=frames.device, dtype=torch.float64) + 0.5) / size - 0.5) * scale
    unit = torch.stack(torch.meshgrid(u, u, indexing="xy"), dim=-1)  # output pixel centres, unit (x, y)
    lo, hi = 0.5 - scale / 2, 0.5 + scale / 2
    corners = torch.tensor([[lo, lo], [hi, lo], [hi, hi], [lo, hi]], dtype=torch.float64, device=frames.device)
    maps = unit_to_source.to(frames.device, torch.float64)
    for i, (f, m) in enumerate(zip(frame_index.tolist(), maps)):
        ratio = m[:, :2].det().abs().sqrt().item() * scale / size  # source pixels per output pixel
        reach = corners @ m[:, :2].T + m[:, 2]
        pad = 2 + 2 * max(ratio, 1.0)  # the resize filter's and bilinear's support
        h, w = frames.shape[1:3]
        x0, y0 = (reach.min(0).values - pad).floor().clamp_min(0).long().tolist()
        x1 = min(w, math.ceil(reach[:, 0].max().item() + pad))
        y1 = min(h, math.ceil(reach[:, 1].max().item() + pad))
        if x1 <= x0 or y1 <= y0:
            continue  # the crop lies outside the frame: black
        region = frames[f, y0:y1, x0:x1].permute(2, 0, 1)[None].float()
        source = unit @ m[:, :2].T + m[:, 2] - torch.tensor([x0, y0], dtype=torch.float64, device=frames.device)
        if antialias and ratio > 1:
            small = (max(1, round((y1 - y0) / ratio)), max(1, round((x1 - x0) / ratio)))
            source = source * torch.tensor([small[1] / (x1 - x0), small[0] / (y1 - y0)],
                                           dtype=torch.float64, device=frames.device)
            region = F.interpolate(region, size=small, mode="bilinear", antialias=True, align_corners=False)
        # Pixel (i, j) covers [i, i + 1) x [j, j + 1), as in grid_sample's align_corners=False
        # coordinates, where -1 and 1 are the outer edges of the region.
        grid = source / torch.tensor(region.shape[:1:-1], dtype=torch.float64, device=frames.device) * 2 - 1
        crop = F.grid_sample(region, grid[None].float(), mode="bilinear", padding_mode="zeros", align_corners=False)
        out[i] = crop[0].round().clamp(0, 255).to(torch.uint8)
    return out
