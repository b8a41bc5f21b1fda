"""The face stage (embed/faces.py): MTCNN on pictures with known face positions (tests/media.py),
the least-squares similarity against Umeyama's SVD solution, and the warps' geometry checked on
drawn points, squares and a checkerboard. The MTCNN tests skip when facenet-pytorch is missing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from media import astronaut_face, background, face_frames, noise_frames, paste_face

from dfclip.embed import faces as fc
from dfclip.errors import UserError


def iou(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def eye_angle(landmarks) -> float:
    """Degrees of the left-to-right eye line above the horizontal, as seen on screen (y points down)."""
    (lx, ly), (rx, ry) = np.asarray(landmarks, dtype=np.float64)[:2]
    return math.degrees(math.atan2(-(ry - ly), rx - lx))


def similarity(angle: float, scale: float, shift) -> torch.Tensor:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[c, -s, shift[0]], [s, c, shift[1]]], dtype=torch.float64)


def apply(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """maps [n, 2, 3] applied to points [n, k, 2]."""
    return points @ maps[:, :, :2].transpose(1, 2) + maps[:, None, :, 2]


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991), eq. 40-42: the least-squares similarity src -> dst by SVD, no reflection."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(dc.T @ sc / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(sv) @ d) / (sc ** 2).sum(1).mean()
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


# --- similarity transform -------------------------------------------------------------------


def test_similarity_transform_recovers_exact_similarities():
    rng = np.random.default_rng(0)
    truth = torch.stack([similarity(rng.uniform(-math.pi, math.pi), rng.uniform(0.01, 100), rng.normal(0, 50, 2))
                         for _ in range(6)])
    dst = fc.TEMPLATE
    src = apply(fc._invert(truth), dst.expand(6, 5, 2))  # points that truth maps exactly onto dst
    fitted = fc.similarity_transform(src, dst)
    assert torch.allclose(fitted, truth, atol=1e-9, rtol=1e-9)
    assert torch.allclose(apply(fitted, src), dst.expand(6, 5, 2), atol=1e-9)


def test_similarity_transform_is_umeyamas_least_squares_solution():
    rng = np.random.default_rng(1)
    src = rng.normal(0, 30, size=(8, 5, 2)) + 100
    src[4] = src[4] * [-1, 1]  # mirrored points: the best similarity must still not reflect
    dst = rng.normal(0, 1, size=(5, 2))
    fitted = fc.similarity_transform(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    for i in range(len(src)):
        assert np.allclose(fitted[i], umeyama(src[i], dst), atol=1e-10)
        assert np.linalg.det(fitted[i][:, :2]) > 0
        # and no nearby similarity fits better (the definition: least squares over 4 parameters)
        hom = np.hstack([src[i], np.ones((5, 1))])
        best = ((hom @ fitted[i].T - dst) ** 2).sum()
        a, b = fitted[i][0, 0], fitted[i][1, 0]
        for step in np.eye(4) * 1e-3:
            for sign in (1, -1):
                da, db, tx, ty = sign * step
                m = np.array([[a + da, -(b + db), fitted[i][0, 2] + tx], [b + db, a + da, fitted[i][1, 2] + ty]])
                assert ((hom @ m.T - dst) ** 2).sum() > best


# --- warps (no detector) --------------------------------------------------------------------


def dots(h: int, w: int, points: np.ndarray, radius: float = 2.5) -> np.ndarray:
    """A black uint8 frame with a white disc at each point."""
    yy, xx = np.mgrid[:h, :w]
    frame = np.zeros((h, w, 3), np.uint8)
    for x, y in points:
        frame[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = 255
    return frame


def centroid(crop: np.ndarray, near: np.ndarray, window: int = 6) -> np.ndarray:
    """Brightness-weighted centroid (x, y) of crop [3, s, s] within `window` px of `near`."""
    x0, y0 = np.maximum(np.round(near).astype(int) - window, 0)
    patch = crop[:, y0:y0 + 2 * window + 1, x0:x0 + 2 * window + 1].astype(np.float64).mean(0)
    yy, xx = np.mgrid[:patch.shape[0], :patch.shape[1]]
    assert patch.sum() > 0, f"no dot near {near}"
    return np.array([(xx * patch).sum() / patch.sum() + x0, (yy * patch).sum() / patch.sum() + y0])


@pytest.mark.parametrize("scale", [1.0, 1.3])
def test_align_crops_puts_the_landmarks_on_the_template(scale):
    size = 112
    truth = similarity(math.radians(40), 120.0, (200.0, 140.0))  # unit square -> frame pixels
    landmarks = apply(truth[None], fc.TEMPLATE[None])[0]
    frame = torch.from_numpy(dots(300, 400, landmarks.numpy() - 0.5))[None]  # pixel i's centre is at i + 0.5
    crop = fc.align_crops(frame, torch.tensor([0]), landmarks[None].float(), size, scale)[0].numpy()
    # template point t lands at ((t - 0.5) / scale + 0.5) * size in the crop (pixel centres at +0.5)
    expected = ((fc.TEMPLATE.numpy() - 0.5) / scale + 0.5) * size - 0.5
    for point in expected:
        assert np.abs(centroid(crop, point) - point).max() < 0.75


def test_box_crops_and_center_box():
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[..., 2] = 200  # blue background
    frame[30:70, 50:90] = [250, 0, 0]  # a red 40 x 40 square at x 50..90, y 30..70
    frames, index = torch.from_numpy(frame)[None], torch.tensor([0])
    box = torch.tensor([[50.0, 30.0, 90.0, 70.0]])
    tight = fc.box_crops(frames, index, box, 32, scale=1.0)[0]
    assert (tight[0, 1:-1, 1:-1] > 240).all() and (tight[2, 1:-1, 1:-1] < 10).all()
    loose = fc.box_crops(frames, index, box, 32, scale=2.0)[0]  # the square fills the middle half
    assert (loose[0, 9:23, 9:23] > 240).all() and (loose[2, :7] > 190).all() and (loose[2, :, 25:] > 190).all()
    assert fc.center_box(100, 160).tolist() == [30.0, 0.0, 130.0, 100.0]
    assert fc.center_box(90, 60).tolist() == [0.0, 15.0, 60.0, 75.0]
    whole = fc.box_crops(frames, index, fc.center_box(120, 160)[None], 120, scale=1.0)[0]
    assert torch.equal(whole, frames[0, :, 20:140].permute(2, 0, 1))  # an identity warp is exact


@pytest.mark.parametrize("side", [333, 500, 700, 1000])
@pytest.mark.parametrize("period", [2, 3])
def test_large_faces_are_antialiased(side, period):
    """A fine diagonal pattern shrunk 5-16x comes out flat grey; bilinear sampling alone aliases it."""
    stripes = ((np.add.outer(np.arange(side), np.arange(side)) % period == 0) * 255).astype(np.uint8)
    frames = torch.from_numpy(np.repeat(stripes[None, ..., None], 3, axis=-1))
    args = (frames, torch.tensor([0]), torch.tensor([[[side, 0.0, 0.0], [0.0, side, 0.0]]]), 64, 1.0)
    crop = fc._warp(*args).float()
    assert abs(crop.mean().item() - 255 / period) < 2 and crop.std().item() < 3
    assert fc._warp(*args, antialias=False).float().std().item() > 30


def test_crops_do_not_depend_on_the_other_faces():
    rng = np.random.default_rng(2)
    frames = torch.from_numpy(rng.integers(0, 256, size=(3, 90, 120, 3), dtype=np.uint8))
    index = torch.tensor([2, 0, 1, 0, 2])
    # faces of very different sizes, one mostly outside the frame, one wholly outside
    maps = torch.stack([similarity(a, s, c) for a, s, c in
                        [(0.1, 20.0, (60, 45)), (-0.5, 60.0, (0, 0)), (1.0, 150.0, (60, 45)), (0.0, 10.0, (60, 45)),
                         (2.0, 90.0, (500, 500))]])
    landmarks = apply(maps, fc.TEMPLATE.expand(5, 5, 2)).float()
    together = fc.align_crops(frames, index, landmarks, 32)
    alone = torch.cat([fc.align_crops(frames, index[i:i + 1], landmarks[i:i + 1], 32) for i in range(5)])
    assert torch.equal(together, alone)
    assert (together[4] == 0).all() and (together[1] > 0).any()
    assert fc.align_crops(frames, index[:0], landmarks[:0], 32).shape == (0, 3, 32, 32)


# --- selection ------------------------------------------------------------------------------


def test_select_faces_largest_all_and_filters():
    boxes = torch.tensor([[0, 0, 30, 40], [10, 10, 110, 90], [50, 50, 100, 100], [0, 0, 200, 15]], dtype=torch.float32)
    faces = fc.Faces(boxes, torch.zeros(4, 5, 2), torch.tensor([0.99, 0.80, 0.95, 0.99]))
    # areas 1200, 8000, 2500, 3000: largest first
    assert fc.select_faces(faces, "all") == [1, 3, 2, 0]
    assert fc.select_faces(faces, "largest") == [1]
    assert fc.select_faces(faces, "largest", min_score=0.9) == [3]
    assert fc.select_faces(faces, "all", min_score=0.9, min_size=20) == [2, 0]  # box 3 is 15 px tall
    assert fc.select_faces(faces, "all", min_size=50) == [1, 2]
    assert fc.select_faces(faces, "largest", min_score=0.999) == []
    assert fc.select_faces(fc.Faces.empty(), "largest") == []
    with pytest.raises(ValueError):
        fc.select_faces(faces, "biggest")


def test_detector_errors_name_the_fix(monkeypatch):
    with pytest.raises(UserError, match="unknown face detector 'dlib'; choose one of: mtcnn"):
        fc.load_detector("dlib")
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import now raises ImportError
    with pytest.raises(UserError) as e:
        fc.load_detector("mtcnn")
    assert "install it with: pip install requests && pip install --no-deps facenet-pytorch==2.6.0" in str(e.value)


# --- MTCNN ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("facenet_pytorch")
    return fc.load_detector("mtcnn", "cpu")


def test_mtcnn_finds_pasted_faces_where_they_are(detector):
    face = astronaut_face()
    placed = [paste_face((240, 320), face, c, w, seed=i) for i, (c, w) in
              enumerate([((160, 120), 90), ((70, 80), 50), ((250, 160), 40), ((160, 110), 140)])]
    found = detector.detect(torch.from_numpy(np.stack([p.frame for p in placed])))
    assert len(found) == 4
    for p, faces in zip(placed, found):
        assert len(faces) == 1 and faces.scores[0] > 0.95
        assert iou(faces.boxes[0], p.box) >= 0.5
        width = p.box[2] - p.box[0]
        assert np.abs(faces.landmarks[0].numpy() - p.landmarks).max() < 0.1 * width
        assert faces.boxes.dtype == faces.landmarks.dtype == faces.scores.dtype == torch.float32


def test_mtcnn_finds_nothing_without_a_face(detector):
    frames = np.concatenate([noise_frames(2, 120, 160), background(120, 160)[None]])
    found = detector.detect(torch.from_numpy(frames))
    assert [len(f) for f in found] == [0, 0, 0]
    assert found[0].boxes.shape == (0, 4) and found[0].landmarks.shape == (0, 5, 2)
    assert [len(f) for f in detector.detect(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))] == [0, 0]  # < min size
    with pytest.raises(ValueError):
        detector.detect(torch.zeros(2, 16, 16, 3))  # float frames


def test_a_batch_gives_what_single_frames_give(detector):
    frames, _ = face_frames(4, 160, 224, 60)
    frames = np.concatenate([frames[:2], noise_frames(1, 160, 224), frames[2:]])
    batch = detector.detect(torch.from_numpy(frames))
    for one, frame in zip(batch, frames):
        single = detector.detect(torch.from_numpy(frame)[None])[0]
        assert len(one) == len(single)
        for a, b in [(one.boxes, single.boxes), (one.landmarks, single.landmarks), (one.scores, single.scores)]:
            assert torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("angle", [30.0, -30.0])
def test_a_tilted_face_comes_out_upright(detector, angle):
    pasted = paste_face((240, 320), astronaut_face(), (160, 120), 90, angle_deg=angle)
    frames = torch.from_numpy(pasted.frame)[None]
    faces = detector.detect(frames)[0]
    assert len(faces) == 1 and abs(eye_angle(faces.landmarks[0]) - angle) < 6  # the input is tilted
    size = 160
    crop = fc.align_crops(frames, torch.tensor([0]), faces.landmarks, size)
    again = detector.detect(crop.permute(0, 2, 3, 1).contiguous())[0]
    assert len(again) == 1
    assert abs(eye_angle(again.landmarks[0])) < 3
    expected_eyes = ((fc.TEMPLATE[:2] - 0.5) / 1.3 + 0.5) * size
    assert (again.landmarks[0, :2] - expected_eyes).abs().max() < 0.05 * size


def test_largest_or_all_of_two_faces(detector):
    face = astronaut_face()
    big = paste_face((240, 360), face, (110, 120), 110)
    frame = paste_face(big.frame, face, (280, 90), 50)
    faces = detector.detect(torch.from_numpy(frame.frame)[None])[0]
    assert len(faces) == 2
    largest = fc.select_faces(faces, "largest")
    assert len(largest) == 1 and iou(faces.boxes[largest[0]], big.box) >= 0.5
    both = fc.select_faces(faces, "all")
    assert both[0] == largest[0] and iou(faces.boxes[both[1]], frame.box) >= 0.5
    assert fc.select_faces(faces, "all", min_size=80) == largest
    assert fc.select_faces(faces, "all", min_score=1.01) == []


def test_provenance_names_the_weights_and_settings(detector):
    prov = detector.provenance
    import facenet_pytorch

    data = Path(facenet_pytorch.__file__).parent / "data"
    assert prov["name"] == "mtcnn" and prov["package"] == "facenet-pytorch"
    assert prov["version"] == importlib.metadata.version("facenet-pytorch")
    assert prov["weights_sha256"] == {f"{n}.pt": hashlib.sha256((data / f"{n}.pt").read_bytes()).hexdigest()
                                      for n in ("pnet", "rnet", "onet")}
    assert prov["min_face_size"] == 20 and prov["thresholds"] == [0.6, 0.7, 0.7] and prov["factor"] == 0.709
    assert prov["max_side"] == fc.DETECT_MAX_SIDE == 640
    other = fc.load_detector("mtcnn", "cpu", min_face_size=40, max_side=None).provenance
    assert other["min_face_size"] == 40 and other["max_side"] is None
    assert {k: v for k, v in other.items() if k not in ("min_face_size", "max_side")} == \
        {k: v for k, v in prov.items() if k not in ("min_face_size", "max_side")}


def test_large_frames_are_shrunk_for_detection_and_mapped_back(detector):
    """A 720 x 1280 frame is detected at 360 x 640; boxes and landmarks come back in frame pixels."""
    pasted = paste_face((720, 1280), astronaut_face(), (900, 300), 200)
    frames = torch.from_numpy(pasted.frame)[None]
    shrunk = detector.detect(frames)[0]
    full = fc.MtcnnDetector("cpu", max_side=None).detect(frames)[0]
    assert len(shrunk) == len(full) == 1
    assert iou(shrunk.boxes[0], pasted.box) >= 0.5 and iou(full.boxes[0], pasted.box) >= 0.5
    assert np.abs(shrunk.landmarks[0].numpy() - pasted.landmarks).max() < 0.05 * 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_detection_and_crops_on_a_gpu_match_the_cpu(detector):
    frames, _ = face_frames(3, 240, 320, 80)
    frames = torch.from_numpy(frames)
    gpu = fc.load_detector("mtcnn", "cuda")
    on_cpu, on_gpu = detector.detect(frames), gpu.detect(frames.cuda())
    for a, b in zip(on_cpu, on_gpu):
        assert len(a) == len(b) == 1 and torch.allclose(a.landmarks, b.landmarks, atol=0.5)
    index = torch.arange(3)
    landmarks = torch.cat([f.landmarks for f in on_cpu])
    crops_cpu = fc.align_crops(frames, index, landmarks, 224)
    crops_gpu = fc.align_crops(frames.cuda(), index.cuda(), landmarks.cuda(), 224)
    assert crops_gpu.is_cuda and (crops_gpu.cpu().int() - crops_cpu.int()).abs().max() <= 2
