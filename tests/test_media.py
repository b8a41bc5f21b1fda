"""The test-media helpers (tests/media.py) do what the video and face tests rely on: every
container round-trips numbered frames, the broken files are broken in the stated ways, and a
pasted face's box and landmarks move with it."""

from __future__ import annotations

import numpy as np
import pytest
from media import (
    DEFAULT_CODECS,
    astronaut_face,
    frame_number,
    numbered_frames,
    paste_face,
    truncate_file,
    write_audio_only,
    write_garbage,
    write_video,
)

av = pytest.importorskip("av")


def decoded_numbers(path) -> list[int]:
    with av.open(str(path)) as container:
        return [frame_number(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


@pytest.mark.parametrize("suffix", sorted(DEFAULT_CODECS))
def test_numbered_frames_survive_every_container(tmp_path, suffix):
    path = write_video(tmp_path / f"v{suffix}", numbered_frames(23), fps=7)
    assert decoded_numbers(path) == list(range(23))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate) == (96, 64, 7)


def test_broken_files_are_broken_as_stated(tmp_path):
    audio = write_audio_only(tmp_path / "a.mp4")
    with av.open(str(audio)) as container:
        assert len(container.streams.video) == 0 and len(container.streams.audio) == 1
    mp4 = write_video(tmp_path / "v.mp4", numbered_frames(20))
    mkv = write_video(tmp_path / "v.mkv", numbered_frames(20))
    for broken in [truncate_file(mp4, tmp_path / "cut.mp4", 0.5), truncate_file(mkv, tmp_path / "zero.mkv", 0.0),
                   write_garbage(tmp_path / "g.mp4")]:
        with pytest.raises(av.error.InvalidDataError):
            av.open(str(broken))
    assert (tmp_path / "zero.mkv").stat().st_size == 0
    # a cut Matroska file keeps the frames before the cut (and loses the rest)
    kept = decoded_numbers(truncate_file(mkv, tmp_path / "cut.mkv", 0.6))
    assert 1 <= len(kept) < 20 and kept == list(range(len(kept)))


def test_pasted_face_geometry():
    face = astronaut_face()
    plain = paste_face((200, 300), face, (120, 90), 60)
    width = face.box[2] - face.box[0]
    scale = 60 / width
    assert np.allclose((plain.box[:2] + plain.box[2:]) / 2, (120, 90))
    assert np.allclose(plain.box[2] - plain.box[0], 60)
    assert np.allclose(plain.landmarks, (face.landmarks - (face.box[:2] + face.box[2:]) / 2) * scale + (120, 90))
    turned = paste_face((200, 300), face, (120, 90), 60, angle_deg=90)
    # a quarter turn counter-clockwise on screen (y points down): (x, y) -> (y, -x), so the
    # left-to-right eye line now points up
    eyes = face.landmarks[1] - face.landmarks[0]
    assert np.allclose(turned.landmarks[1] - turned.landmarks[0], scale * np.array([eyes[1], -eyes[0]]))
    assert plain.frame.shape == (200, 300, 3) and plain.frame.dtype == np.uint8
