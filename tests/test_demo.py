"""The generated demo folder: layout, counts, labels via the walker, determinism, traces."""

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dfclip.embed.demo import FAKE_SOURCES, REAL_SOURCES, make_demo_images
from dfclip.embed.sources import read_manifest, scan_folder
from dfclip.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The default demo (40 per fake source), built once for the module."""
    return make_demo_images(tmp_path_factory.mktemp("demo") / "out")


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.csv")


def test_layout_counts_and_walker_labels(demo):
    assert demo.is_absolute()
    assert sorted(p.name for p in (demo / "real").iterdir()) == sorted(REAL_SOURCES)
    assert sorted(p.name for p in (demo / "fake").iterdir()) == sorted(FAKE_SOURCES)
    rows = scan_folder(demo)
    counts = dict(rows.group_by("source").len().iter_rows())
    assert counts == {"ffhq": 20, "celeba": 20, "stylegan2": 40, "sd15": 40, "dalle": 40}
    assert (rows["label"] == 0).sum() * 3 == (rows["label"] == 1).sum() == 120
    for row in rows.iter_rows(named=True):
        top, source, name = row["path"].split("/")
        assert row["label"] == {"real": 0, "fake": 1}[top] and row["source"] == source
        assert re.fullmatch(r"vid\d{3}_f\d{2}\.(jpg|png|webp)", name), name
    assert len(image_files(demo)) == rows.height


def test_manifest_matches_folder_and_keeps_videos_together(demo):
    manifest = read_manifest(demo / "manifest.csv")
    walked = scan_folder(demo)
    assert manifest.select("path", "label", "source").equals(walked.select("path", "label", "source"))
    assert set(manifest["split"]) == {"train", "val", "test"}
    # Every video (group) sits in exactly one split and holds frames of one source.
    per_group = manifest.group_by("group").agg(pl.col("split").n_unique(), pl.col("source").n_unique(), pl.len())
    assert per_group["split"].max() == 1 and per_group["source"].max() == 1
    assert per_group["len"].max() == 4
    frames = manifest.with_columns(video=pl.col("path").str.extract(r"(vid\d{3})_f"))
    assert frames.select((pl.col("source") + "/" + pl.col("video") == pl.col("group")).all()).item()
    # Both classes appear in every split, so each split can be evaluated.
    assert manifest.group_by("split").agg(pl.col("label").n_unique())["label"].min() == 2


def test_images_decode_with_varied_formats_and_sizes(demo):
    formats, sizes = set(), set()
    for path in image_files(demo):
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB"
            assert image.width == image.height and 64 <= image.width <= 256
            formats.add(image.format)
            sizes.add(image.width)
    assert formats == {"JPEG", "PNG", "WEBP"}
    assert len(sizes) > 10


def test_frames_of_a_video_share_format_and_size_but_differ(demo):
    frames = sorted((demo / "fake" / "sd15").glob("vid000_f*"))
    assert len(frames) == 4 and len({p.suffix for p in frames}) == 1
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in frames]
    assert len({a.shape for a in arrays}) == 1
    assert not np.array_equal(arrays[0], arrays[1])  # pose jitter between frames


def gray(path: Path, side: int = 64) -> np.ndarray:
    """The image as the tiny model sees it: resized to its 64 px input (bicubic, as open_clip does)."""
    image = Image.open(path).convert("L").resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def checkerboard_strength(x: np.ndarray) -> float:
    """Magnitude of the Fourier coefficient at a period of 4 pixels in both directions (2-cell checkerboard)."""
    rows, cols = np.indices(x.shape)
    cells = np.where((rows // 2 + cols // 2) % 2 == 0, 1.0, -1.0)
    return abs((x * cells).mean())


def roughness(x: np.ndarray) -> float:
    """Mean absolute discrete Laplacian: high for grainy images, low for smooth ones."""
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return np.abs(lap).mean()


def test_generator_traces_are_present_at_the_models_input_size(demo):
    def measure(folder: str, fn) -> np.ndarray:
        return np.array([fn(gray(p)) for p in sorted((demo / folder).iterdir())])

    real_checker = np.concatenate([measure(f"real/{s}", checkerboard_strength) for s in REAL_SOURCES])
    real_rough = np.concatenate([measure(f"real/{s}", roughness) for s in REAL_SOURCES])
    # stylegan2: an upsampling checkerboard well above the real images' on average, after the resize.
    assert np.median(measure("fake/stylegan2", checkerboard_strength)) > 10 * np.median(real_checker)
    # sd15: smoother than nearly all real images; dalle: smoother on average only (the hard, held-out one).
    sd15_rough = measure("fake/sd15", roughness)
    assert np.quantile(sd15_rough, 0.9) < np.quantile(real_rough, 0.1) and sd15_rough.mean() < 0.5 * real_rough.mean()
    assert measure("fake/dalle", roughness).mean() < 0.7 * real_rough.mean()


def test_deterministic_per_seed(tmp_path):
    first = make_demo_images(tmp_path / "a", n_per_source=6, seed=3)
    second = make_demo_images(tmp_path / "b", n_per_source=6, seed=3)
    other = make_demo_images(tmp_path / "c", n_per_source=6, seed=4)
    files = [p.relative_to(first) for p in image_files(first)] + [Path("manifest.csv")]
    assert [p.relative_to(second) for p in image_files(second)] + [Path("manifest.csv")] == files
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    # Another seed draws other faces (file names may coincide, contents must not).
    same = [rel for rel in files if (other / rel).exists() and (other / rel).read_bytes() == (first / rel).read_bytes()]
    assert same == []
    # Small runs: real sources get half as many, at least one; tiny sources are all train.
    counts = dict(scan_folder(first).group_by("source").len().iter_rows())
    assert counts == {"ffhq": 3, "celeba": 3, "stylegan2": 6, "sd15": 6, "dalle": 6}
    assert set(read_manifest(first / "manifest.csv")["split"]) == {"train"}


def test_refuses_non_empty_folder_and_bad_count(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_demo_images(tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="at least 1"):
        make_demo_images(tmp_path / "new", n_per_source=0)
    (tmp_path / "empty").mkdir()
    out = make_demo_images(tmp_path / "empty", n_per_source=1)
    assert dict(scan_folder(out).group_by("label").len().iter_rows()) == {0: 2, 1: 3}


def test_cli_hints_paste_as_they_are_with_spaces(tmp_path, monkeypatch, capsys):
    """`dfembed demo` prints the next commands; a folder with a space must come out quoted."""
    import shlex
    import sys

    from dfclip import cli

    folder = tmp_path / "my images"
    monkeypatch.setattr(cli.out, "width", 1000)  # no wrapping of the long tmp path
    monkeypatch.setattr(sys, "argv", ["dfembed", "demo", str(folder), "--n-per-source", "1"])
    with pytest.raises(SystemExit) as exit_:
        cli.dfembed_main()
    assert exit_.value.code in (0, None)
    hints = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("dfembed extract")]
    assert hints and all(shlex.split(h)[2] == str(folder) for h in hints)


def decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_demo_videos_layout_faces_traces_and_determinism(tmp_path):
    pytest.importorskip("skimage")
    from dfclip.embed.demo import write_demo_videos

    out = write_demo_videos(tmp_path / "v", n_per_source=3, frames=3, size=128, seed=1)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    assert files == sorted(f"{'fake' if s in FAKE_SOURCES else 'real'}/{s}/vid00{i}.mp4"
                           for s in REAL_SOURCES + FAKE_SOURCES for i in range(3))
    manifest = pl.read_csv(out / "manifest.csv")
    assert manifest["path"].to_list() == files
    assert manifest.select((pl.col("label") == pl.col("path").str.starts_with("fake/").cast(pl.Int64)).all()).item()
    assert (manifest.group_by("source").agg(pl.col("split").n_unique())["split"] == 3).all()  # train, val, test
    videos = {f: decode(out / f) for f in files}
    assert {v.shape for v in videos.values()} == {(3, 128, 128, 3)}
    # the real sources' grain survives H.264; sd15's smoothing shows
    rough = {s: np.mean([roughness(v.mean(-1)) for f, v in videos.items() if f"/{s}/" in f]) for s in ["ffhq", "sd15"]}
    assert rough["sd15"] < 0.8 * rough["ffhq"]
    again = write_demo_videos(tmp_path / "again", n_per_source=1, frames=3, size=128, seed=1)  # vid000 of each
    assert all(np.array_equal(decode(again / f), videos[f]) for f in files if f.endswith("vid000.mp4"))
    with pytest.raises(UserError, match="not empty"):
        write_demo_videos(out)

    pytest.importorskip("facenet_pytorch")
    import torch

    from dfclip.embed.faces import load_detector

    detector = load_detector("mtcnn", "cpu")
    for f, frames in videos.items():
        found = detector.detect(torch.from_numpy(frames))
        assert [len(faces) for faces in found] == [1, 1, 1], f
