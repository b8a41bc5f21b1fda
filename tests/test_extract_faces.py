"""`dfembed extract --faces` end to end on videos and images with known face positions: the rows and
their boxes, faceless frames as counted failures, largest vs all, the centre-crop fallback, the
detection cache (no detector call at all), and the face settings as part of the store's identity."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfclip import store
from dfclip.embed import EmbedConfig, extract
from dfclip.errors import UserError

pytest.importorskip("facenet_pytorch")
sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

H, W, FACE = 144, 192, 64  # small frames keep MTCNN quick on a CPU


def tiny(**kw) -> EmbedConfig:
    return EmbedConfig(**{"model": "dfclip-tiny", "pretrained": "none", "workers": 0, **kw})


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = np.maximum(a[:2], b[:2])
    x1, y1 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def face_videos(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """real/yt/a.mp4: 6 frames with a face gliding across; fake/df/b.mp4: 3 frames with a face, then 3
    of noise. Returns the folder and the true face box of every frame that has one."""
    folder = tmp_path_factory.mktemp("faces") / "v"
    frames, boxes = media.face_frames(6, H, W, FACE)
    (folder / "real" / "yt").mkdir(parents=True)
    (folder / "fake" / "df").mkdir(parents=True)
    media.write_video(folder / "real" / "yt" / "a.mp4", frames)
    media.write_video(folder / "fake" / "df" / "b.mp4", np.concatenate([frames[:3], media.noise_frames(3, H, W)]))
    truth = {f"real/yt/a.mp4#f{i:06d}": boxes[i] for i in range(6)}
    truth.update({f"fake/df/b.mp4#f{i:06d}": boxes[i] for i in range(3)})
    return folder, truth


@pytest.fixture(scope="module")
def largest_store(face_videos, tmp_path_factory) -> tuple[Path, dict]:
    folder, _ = face_videos
    out = tmp_path_factory.mktemp("largest") / "st"
    rep = extract(folder, out, tiny(frames=None, faces="largest"), progress=False)
    return out, rep


def test_largest_face_rows_have_the_pasted_boxes(face_videos, largest_store):
    _, truth = face_videos
    out, rep = largest_store
    meta = store.open(out).meta.sort("path")
    assert meta["path"].to_list() == sorted(truth)
    assert (rep["embedded"], rep["frames"], rep["no_face"]) == (9, 12, 3)
    for path, box, n_faces, face_index, score, group in meta.select(
            "path", "face_box", "n_faces", "face_index", "face_score", "group").iter_rows():
        assert iou(np.asarray(box), truth[path]) >= 0.5, path
        assert (n_faces, face_index) == (1, 0) and score >= 0.9
        assert group == path.split("#")[0]  # frames of one video are one group


def test_faceless_frames_are_counted_no_face_failures(largest_store, dfembed):
    out, _ = largest_store
    s = store.open(out)
    failures = s.failures
    assert sorted(failures["path"].to_list()) == [f"fake/df/b.mp4#f{i:06d}" for i in (3, 4, 5)]
    assert set(failures["error"]) == {"no_face"}
    code, text, _ = dfembed("info", out)
    assert code == 0 and "no_face=3" in text
    assert s.info()["failure_kinds"] == {"no_face": 3}


def test_a_second_run_detects_nothing_again(face_videos, largest_store, monkeypatch):
    folder, _ = face_videos
    out, _ = largest_store
    from dfclip.embed import faces

    monkeypatch.setattr(faces.MtcnnDetector, "detect", lambda *a: pytest.fail("the detector ran on a finished store"))
    rep = extract(folder, out, tiny(frames=None, faces="largest"), progress=False)
    assert (rep["embedded"], rep["failed"], rep["skipped"]) == (0, 0, 2)


def test_detection_cache_is_reused_without_a_detector_call(face_videos, largest_store, tmp_path, monkeypatch):
    folder, _ = face_videos
    out, _ = largest_store
    assert (out / "detections.parquet").is_file()
    want = store.open(out).meta.sort("path")
    from dfclip.embed import faces

    monkeypatch.setattr(faces.MtcnnDetector, "detect", lambda *a: pytest.fail("the detector ran despite --detections"))
    rep = extract(folder, tmp_path / "layers", tiny(frames=None, faces="largest", layers="1,2", detections=str(out)),
                  progress=False)
    got = store.open(tmp_path / "layers").meta.sort("path")
    assert rep["detector_frames"] == 0 and rep["no_face"] == 3
    assert got["path"].to_list() == want["path"].to_list()
    np.testing.assert_array_equal(np.stack(got["face_box"].to_list()), np.stack(want["face_box"].to_list()))


def test_detection_cache_of_another_detector_setting_is_refused(face_videos, largest_store, tmp_path, monkeypatch):
    folder, _ = face_videos
    out, _ = largest_store
    from dfclip.embed import faces

    original = faces.MtcnnDetector.__init__

    def other_threshold(self, device="cpu", **kw):
        original(self, device, min_face_size=30)

    monkeypatch.setattr(faces.MtcnnDetector, "__init__", other_threshold)
    with pytest.raises(UserError, match="--detections .* was detected with"):
        extract(folder, tmp_path / "st", tiny(frames=None, faces="largest", detections=str(out)), progress=False)


def test_all_faces_vs_largest_on_two_faces(tmp_path):
    face = media.astronaut_face()
    small = media.paste_face((H, 2 * W), face, (70, 70), 40)
    two = media.paste_face(small.frame, face, (260, 72), 80)
    (tmp_path / "i" / "real").mkdir(parents=True)
    Image.fromarray(two.frame).save(tmp_path / "i" / "real" / "two.png")
    extract(tmp_path / "i", tmp_path / "all", tiny(faces="all", min_face_score=0.5), progress=False)
    extract(tmp_path / "i", tmp_path / "largest", tiny(faces="largest", min_face_score=0.5), progress=False)
    every = store.open(tmp_path / "all").meta.sort("path")
    assert every["path"].to_list() == ["real/two.png@0", "real/two.png@1"]
    assert every["n_faces"].to_list() == [2, 2] and every["frame"].to_list() == [-1, -1]
    assert iou(np.asarray(every["face_box"][0]), two.box) >= 0.5  # face 0 is the larger one
    assert iou(np.asarray(every["face_box"][1]), small.box) >= 0.5
    largest = store.open(tmp_path / "largest").meta
    assert largest["path"].to_list() == ["real/two.png"]
    assert iou(np.asarray(largest["face_box"][0]), two.box) >= 0.5


def test_center_fallback_marks_the_row(tmp_path):
    (tmp_path / "i" / "real").mkdir(parents=True)
    Image.fromarray(media.noise_frames(1, H, W)[0]).save(tmp_path / "i" / "real" / "noise.png")
    rep = extract(tmp_path / "i", tmp_path / "st", tiny(faces="largest", face_fallback="center"), progress=False)
    meta = store.open(tmp_path / "st").meta
    assert (rep["embedded"], rep["failed"]) == (1, 0)
    assert meta["n_faces"].to_list() == [0] and meta["face_index"].to_list() == [-1]
    np.testing.assert_allclose(meta["face_box"][0].to_list(), [(W - H) / 2, 0, (W - H) / 2 + H, H])


def test_face_settings_are_part_of_the_store_identity(face_videos, largest_store):
    folder, _ = face_videos
    out, _ = largest_store
    faces = store.open(out).provenance["faces"]
    assert faces["mode"] == "largest" and faces["detector"]["name"] == "mtcnn" and faces["scale"] == 1.3
    assert set(faces["detector"]["weights_sha256"]) == {"pnet.pt", "rnet.pt", "onet.pt"}
    with pytest.raises(UserError, match="faces=largest"):
        extract(folder, out, tiny(frames=None, faces="largest", face_scale=1.5), progress=False)


@pytest.mark.parametrize("options,words", [
    ({"faces": "some"}, "--faces"), ({"face_scale": 0.5}, "--face-scale"), ({"min_face_score": 2.0}, "--min-face-score"),
    ({"faces": "all", "face_fallback": "center"}, "--face-fallback center needs --faces largest"),
    ({"detections": "x"}, "--detections reuses"),
])
def test_bad_face_settings_are_one_line_errors(options, words):
    with pytest.raises(UserError, match=words):
        tiny(**options)
