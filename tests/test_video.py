"""Videos as inputs: which frames are taken, that exactly those frames are decoded, the rows a video
gives in a store, broken videos as failures with reasons, and resume after SIGKILL mid-video."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dfclip import store
from dfclip.embed import EmbedConfig, extract
from dfclip.embed.video import VideoError, probe, read_frames, sample_positions
from dfclip.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
import media  # noqa: E402

from test_extract_faults import DFEMBED, ENV, raw_rows  # noqa: E402


def tiny(**kw) -> EmbedConfig:
    return EmbedConfig(**{"model": "dfclip-tiny", "pretrained": "none", "workers": 0, **kw})


def test_sample_positions_follow_deepfakebench_linspace():
    # np.linspace(0, n - 1, N) truncated to integers: first and last frame included.
    assert sample_positions(100, 4) == [0, 33, 66, 99]
    assert sample_positions(100, 4) == np.linspace(0, 99, 4).astype(int).tolist()
    assert sample_positions(10, 32) == list(range(10))  # fewer frames than asked: every frame
    assert sample_positions(7, None) == list(range(7))  # --frames all
    assert sample_positions(10, 3, stride=4) == [0, 4, 8]  # a stride wins over --frames
    assert sample_positions(0, 8) == []


@pytest.mark.parametrize("suffix,codec", [(".mp4", None), (".mkv", None), (".webm", None), (".avi", None),
                                          (".mov", None), (".mp4", "mpeg4")])
def test_read_frames_gives_exactly_the_sampled_frames(tmp_path, suffix, codec):
    path = media.write_video(tmp_path / f"v{suffix}", media.numbered_frames(90), codec=codec)
    index = probe(path)
    assert index.n_frames == 90 and (index.width, index.height) == (96, 64)
    for positions in (sample_positions(90, 8), [3, 4, 5, 80], list(range(90))):
        got = list(read_frames(path, index, positions))
        assert [p for p, _ in got] == positions
        assert [media.frame_number(frame) for _, frame in got] == positions


def test_sparse_frames_are_found_by_seeking_in_a_long_gop(tmp_path):
    """Frames far apart in a video with few keyframes: read_frames seeks (not decoding from the start)
    and still lands on exactly the wanted frames."""
    path = tmp_path / "long.mp4"
    frames = media.numbered_frames(300)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        s.options = {"g": "50", "bf": "2", "crf": "18"}  # a keyframe every 50 frames, B-frames reordered
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    index = probe(path)
    assert 2 <= sum(index.keyframe) < 20
    positions = [7, 149, 151, 299]
    assert [media.frame_number(f) for _, f in read_frames(path, index, positions)] == positions


def test_broken_videos_raise_video_errors_with_reasons(tmp_path):
    good = media.write_video(tmp_path / "good.mp4", media.numbered_frames(20))
    cases = {
        "empty": media.truncate_file(good, tmp_path / "empty.mp4", 0.0),
        "no_video_stream": media.write_audio_only(tmp_path / "audio.mp4"),
        "not_a_video": media.write_garbage(tmp_path / "junk.avi"),
    }
    for kind, path in cases.items():
        with pytest.raises(VideoError) as e:
            probe(path)
        assert e.value.kind == kind


def make_videos(folder: Path, n_frames: int = 24) -> dict[str, int]:
    """Two real and two fake videos of numbered frames, in real/<src>/ and fake/<gen>/; {path: frames}."""
    videos = {"real/yt/a.mp4": n_frames, "real/yt/b.mkv": n_frames + 6, "fake/df/c.webm": n_frames,
              "fake/fs/d.avi": n_frames - 4}
    for rel, n in videos.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        media.write_video(folder / rel, media.numbered_frames(n))
    return videos


def test_extract_videos_one_row_per_sampled_frame(tmp_path):
    videos = make_videos(tmp_path / "v")
    Image.fromarray(media.numbered_frames(1)[0]).save(tmp_path / "v" / "real" / "yt" / "still.png")
    rep = extract(tmp_path / "v", tmp_path / "st", tiny(frames=5), progress=False)
    assert (rep["embedded"], rep["failed"], rep["videos"]) == (4 * 5 + 1, 0, 4)
    meta = store.open(tmp_path / "st").meta.sort("path")
    want = sorted([f"{v}#f{p:06d}" for v, n in videos.items() for p in sample_positions(n, 5)] + ["real/yt/still.png"])
    assert meta["path"].to_list() == want
    is_frame = meta["frame"] >= 0
    frames = meta.filter(is_frame)
    assert (frames["group"] == frames["path"].str.replace(r"#f\d+$", "")).all()  # group = the video
    assert frames["frame"].to_list() == [int(p.rsplit("#f", 1)[1]) for p in frames["path"].to_list()]
    assert dict(zip(frames["path"].str.replace(r"#f\d+$", "").to_list(), frames["label"].to_list())) == {
        v: (1 if v.startswith("fake") else 0) for v in videos}
    still = meta.filter(~is_frame)
    assert still["frame"].to_list() == [-1] and still["group"].to_list() == [""]
    done = store.open(tmp_path / "st").done_inputs
    assert dict(zip(done["path"].to_list(), done["n_frames"].to_list())) == videos


def test_frame_embeddings_match_open_clip_on_the_decoded_frame(tmp_path, tiny_checkpoint):
    folder = tmp_path / "v"
    (folder / "real").mkdir(parents=True)
    media.write_video(folder / "real" / "a.mkv", media.numbered_frames(12))
    cfg = EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), workers=1, dtype="float32", frames=3)
    extract(folder, tmp_path / "st", cfg, progress=False)
    x, meta = store.open(tmp_path / "st").load()
    model, _, preprocess = open_clip.create_model_and_transforms("dfclip-tiny", pretrained=str(tiny_checkpoint))
    model.eval()
    with av.open(str(folder / "real" / "a.mkv")) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for row, frame in zip(x, meta["frame"].to_list()):
        with torch.no_grad():
            want = model.encode_image(preprocess(Image.fromarray(decoded[frame]))[None])[0].numpy()
        np.testing.assert_allclose(row, want, rtol=1e-4, atol=1e-5)


def test_broken_videos_are_failures_and_the_run_carries_on(tmp_path, dfembed):
    folder = tmp_path / "v"
    make_videos(folder)
    bad = folder / "fake" / "bad"
    bad.mkdir()
    media.truncate_file(folder / "real/yt/a.mp4", bad / "empty.mp4", 0.0)
    media.write_audio_only(bad / "audio.mkv")
    media.write_garbage(bad / "junk.mov")
    media.truncate_file(folder / "real/yt/a.mp4", bad / "cut.mp4", 0.6)  # its index is at the end: unreadable
    code, out, err = dfembed("extract", folder, "--out", tmp_path / "st", "--model", "dfclip-tiny", "--pretrained",
                             "none", "--frames", 4, "--workers", 0, "--no-progress")
    assert code == 0, err
    s = store.open(tmp_path / "st")
    reasons = dict(zip(s.failures["path"].to_list(), s.failures["error"].to_list()))
    assert reasons["fake/bad/empty.mp4"] == "empty"
    assert reasons["fake/bad/audio.mkv"] == "no_video_stream"
    assert reasons["fake/bad/junk.mov"] == "not_a_video"
    assert reasons["fake/bad/cut.mp4"] in ("not_a_video", "corrupt", "no_frames")
    assert s.meta.height == 4 * 4  # every good video still gave its frames
    assert "4 failed" in out and "could not be embedded" in err
    # A second run redoes nothing: broken videos are logged failures, good ones are complete.
    code, out, _ = dfembed("extract", folder, "--out", tmp_path / "st", "--model", "dfclip-tiny", "--pretrained",
                           "none", "--frames", 4, "--workers", 0, "--no-progress")
    assert code == 0 and "0 embedded, 0 failed, 8 skipped" in out


def test_a_video_cut_mid_stream_keeps_its_readable_frames(tmp_path):
    """A Matroska file cut short still decodes up to the cut: those frames are rows, the rest failures."""
    folder = tmp_path / "v" / "fake"
    folder.mkdir(parents=True)
    whole = media.write_video(tmp_path / "whole.mkv", media.numbered_frames(60))
    media.truncate_file(whole, folder / "cut.mkv", 0.5)
    n = probe(folder / "cut.mkv").n_frames
    assert 0 < n < 60
    rep = extract(tmp_path / "v", tmp_path / "st", tiny(frames=None), progress=False)
    s = store.open(tmp_path / "st")
    got = s.meta["frame"].to_list()
    assert rep["embedded"] + rep["failed"] == n and rep["embedded"] > 0
    assert sorted(got + [int(p.rsplit("#f", 1)[1]) for p in s.failures["path"].to_list()]) == list(range(n))


def test_other_frame_settings_into_the_same_store_are_refused(tmp_path):
    make_videos(tmp_path / "v")
    extract(tmp_path / "v", tmp_path / "st", tiny(frames=4), progress=False)
    with pytest.raises(UserError, match="frames=8"):
        extract(tmp_path / "v", tmp_path / "st", tiny(frames=8), progress=False)


def test_bad_frame_options_are_one_line_errors(tmp_path, dfembed):
    make_videos(tmp_path / "v")
    for args, words in ((("--frames", "0"), "--frames"), (("--frames", "lots"), "--frames"),
                        (("--frame-stride", "0"), "--frame-stride")):
        code, _, err = dfembed("extract", tmp_path / "v", "--out", tmp_path / "st", "--model", "dfclip-tiny",
                               "--pretrained", "none", *args)
        assert code == 2 and words in err and "Traceback" not in err


def test_resume_after_sigkill_mid_video_gives_exact_rows(tmp_path):
    folder = tmp_path / "v"
    videos = make_videos(folder, n_frames=40)
    ref = tmp_path / "ref"
    extract(folder, ref, tiny(frames=None), progress=False)
    want = {p for p, _ in raw_rows(ref)}
    assert len(want) == sum(videos.values())

    # One frame per shard, every shard fsync'd: slow enough to be killed in the middle of a video.
    out = tmp_path / "st"
    cmd = [DFEMBED, "extract", folder, "--out", out, "--model", "dfclip-tiny", "--pretrained", "none",
           "--frames", "all", "--batch-size", 1, "--shard-size", 1, "--workers", 1, "--no-progress"]
    proc = subprocess.Popen(list(map(str, cmd)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while len(list(out.glob("shard-r000-*.h5"))) < 50 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = raw_rows(out)
    assert 0 < len(before) < len(want)
    partial = {p.rsplit("#f", 1)[0] for p, _ in before} - set(store.open(out).done_inputs["path"].to_list())
    assert partial, "the kill should leave a video cut short"

    rep = extract(folder, out, tiny(frames=None, workers=1), progress=False)
    rows = raw_rows(out)
    assert sorted(p for p, _ in rows) == sorted(want)  # none missing, none twice
    assert rep["embedded"] == len(want) - len(before)
    ref_rows = dict(raw_rows(ref))
    for p, x in rows:
        np.testing.assert_allclose(x, ref_rows[p], rtol=1e-3, atol=1e-3)
    again = extract(folder, out, tiny(frames=None), progress=False)
    assert (again["embedded"], again["skipped"]) == (0, len(videos))


def test_a_relabelled_video_keeps_its_frames_and_a_deleted_one_is_pruned(tmp_path):
    folder = tmp_path / "v"
    make_videos(folder)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nv/real/yt/a.mp4,real\nv/real/yt/b.mkv,real\nv/fake/df/c.webm,fake\n")
    extract(manifest=manifest, out=tmp_path / "st", config=tiny(frames=3), progress=False)
    before = store.open(tmp_path / "st").load(dtype="float32")
    manifest.write_text("path,label\nv/real/yt/a.mp4,fake\nv/real/yt/b.mkv,real\nv/fake/df/c.webm,fake\n")
    rep = extract(manifest=manifest, out=tmp_path / "st", config=tiny(frames=3), progress=False)
    assert (rep["embedded"], rep["relabelled"]) == (0, 3)  # a.mp4's three frames, copied, not re-embedded
    x, meta = store.open(tmp_path / "st").load(dtype="float32")
    labels = dict(zip(meta["path"].to_list(), meta["label"].to_list()))
    assert [labels[f"v/real/yt/a.mp4#f{p:06d}"] for p in sample_positions(24, 3)] == [1, 1, 1]
    old = dict(zip(before[1]["path"].to_list(), before[0]))
    for p, row in zip(meta["path"].to_list(), x):
        np.testing.assert_array_equal(row, old[p])
    # b.mkv leaves the inputs: its frames are counted missing, then pruned frame by frame.
    manifest.write_text("path,label\nv/real/yt/a.mp4,fake\nv/fake/df/c.webm,fake\n")
    rep = extract(manifest=manifest, out=tmp_path / "st", config=tiny(frames=3), progress=False)
    assert rep["missing"] == 3
    rep = extract(manifest=manifest, out=tmp_path / "st", config=tiny(frames=3), prune_missing=True, progress=False)
    assert rep["pruned"] == 3
    assert not store.open(tmp_path / "st").meta.filter(store.format.origin_expr() == "v/real/yt/b.mkv").height
    # ...and it is embedded again when it comes back.
    manifest.write_text("path,label\nv/real/yt/a.mp4,fake\nv/real/yt/b.mkv,real\nv/fake/df/c.webm,fake\n")
    rep = extract(manifest=manifest, out=tmp_path / "st", config=tiny(frames=3), progress=False)
    assert rep["embedded"] == 3


def test_fit_reports_video_auc_and_predict_pools_one_video(tmp_path, dfembed, dfhead):
    """The chain of the README: extract real/ and fake/ videos, fit (frame- and video-level report),
    predict one video (one pooled line) and a folder (one row per video, its frames on request)."""
    import polars as pl

    rng = np.random.default_rng(0)
    folder = tmp_path / "v"
    for label in ("real", "fake"):
        (folder / label).mkdir(parents=True)
        for i in range(8):
            frames = media.numbered_frames(12).astype(np.int16) + rng.integers(-20, 20, (12, 64, 96, 3))
            if label == "fake":
                frames[:, ::2, ::2] += 60  # a trace the tiny random model can pick up
            media.write_video(folder / label / f"v{i}.mp4", np.clip(frames, 0, 255).astype(np.uint8))
    tiny_args = ["--model", "dfclip-tiny", "--pretrained", "none", "--workers", 0, "--no-progress"]
    assert dfembed("extract", folder, "--out", tmp_path / "st", "--frames", 4, *tiny_args)[0] == 0
    # --calibration none: the pooled score is then exactly the mean of the frame scores written beside it
    code, out, err = dfhead("fit", tmp_path / "st", "--runs-dir", tmp_path / "runs", "--name", "r", "--epochs", 3,
                            "--calibration", "none")
    assert code == 0, err
    report = __import__("json").loads((tmp_path / "runs" / "r" / "report.json").read_text())
    assert report["val"]["video"]["pool"] == "mean" and report["val"]["video"]["n"] >= 2
    code, out, err = dfhead("predict", tmp_path / "runs" / "r", folder / "fake" / "v3.mp4", "--out",
                            tmp_path / "one.csv", "--frame-scores", tmp_path / "frames.csv", "--workers", 0)
    assert code == 0, err
    frames = pl.read_csv(tmp_path / "frames.csv")
    assert frames["frame"].to_list() == sample_positions(12, 4)
    one = pl.read_csv(tmp_path / "one.csv")
    assert one["path"].to_list() == ["v3.mp4"] and one["n_frames"].to_list() == [4]
    assert abs(one["score"][0] - frames["score"].mean()) < 1e-6  # the mean of its frames' probabilities
    assert f"v3.mp4: {'fake' if one['pred'][0] else 'real'}, score {one['score'][0]:.4f} (mean over 4 frames)" in \
        " ".join(out.split())
    code, _, err = dfhead("predict", tmp_path / "runs" / "r", folder, "--out", tmp_path / "all.csv", "--workers", 0)
    table = pl.read_csv(tmp_path / "all.csv")
    assert code == 0 and table.height == 16 and set(table["n_frames"]) == {4}
