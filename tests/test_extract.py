"""`dfembed extract` in-process: parity with open_clip, the store on disk, manifests, bad images, bad input.

The tiny model is loaded through `--pretrained PATH` (the `tiny_checkpoint` fixture), so the real
checkpoint path is used. Real-process behaviour (SIGKILL, torchrun, the lock across processes)
is in test_extract_faults.py.
"""

import hashlib
import io
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import open_clip
import polars as pl
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from dfclip import cli
from dfclip import embed  # noqa: E402
import dfclip.embed.backbone  # noqa: F401  registers dfclip-tiny with open_clip
from dfclip import store
from dfclip.embed import EmbedConfig
from dfclip.embed.extract import collate, extract, partition, rank_from_env
from dfclip.errors import UserError

TINY = ["--model", "dfclip-tiny"]


# ---------------------------------------------------------------- helpers

def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture: random low-frequency colour field plus mild noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def reference_embeddings(checkpoint: Path, files: list[Path]) -> np.ndarray:
    """open_clip's own pipeline: create_model_and_transforms + encode_image(preprocess(img)), fp32."""
    model, _, preprocess = open_clip.create_model_and_transforms("dfclip-tiny", pretrained=str(checkpoint))
    model.eval()
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(f)) for f in files])
        return model.encode_image(batch).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def live_rows(out: Path) -> dict[str, np.ndarray]:
    """path -> embedding (float32) of every live row, through store.open."""
    s = store.open(out)
    x, meta = s.load(dtype="float32")
    return dict(zip(meta["path"].to_list(), x))


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (the start of a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for i, label in enumerate(["real", "fake", "fake"]):
        (root / label / "src").mkdir(parents=True, exist_ok=True)
        smooth_image(48, 40, i).save(root / label / "src" / f"img{i}.png")
    return root


# ---------------------------------------------------------------- parity and the format on disk

def test_parity_with_open_clip_and_plain_h5py(tmp_path, tiny_checkpoint, dfembed):
    images = tmp_path / "images"
    (images / "real" / "photos").mkdir(parents=True)
    (images / "fake" / "gen").mkdir(parents=True)
    sample = load_sample_images()
    for name, array in zip(sample.filenames, sample.images):  # two real photographs, 640x427
        shutil.copy(name, images / "real" / "photos" / Path(name).name)  # the original JPEG bytes
        Image.fromarray(array).save(images / "real" / "photos" / (Path(name).stem + ".png"))
    for i, (size, suffix) in enumerate([((80, 50), "png"), ((200, 120), "webp"), ((64, 64), "bmp"), ((300, 310), "jpg")]):
        smooth_image(*size, seed=10 + i).save(images / "fake" / "gen" / f"g{i}.{suffix}")

    out = tmp_path / "store"
    code, stdout, stderr = dfembed("extract", images, "--out", out, *TINY, "--pretrained", tiny_checkpoint,
                                   "--workers", 2, "--batch-size", 3, "--shard-size", 5, "--no-progress")
    assert code == 0, stderr
    assert "8 embedded" in stdout and "0 failed" in stdout and "cpu" in stdout
    assert "device: CPU" in stderr  # the CPU fallback is announced up front

    # Plain h5py only: the documented dataset names and the provenance attribute.
    shards = sorted(out.glob("shard-r*-*.h5"))
    assert len(shards) == 2  # 8 rows, 5 per shard
    stored, labels, sources = {}, {}, {}
    for shard in shards:
        with h5py.File(shard, "r") as f:
            assert f.attrs["format"] == "dfclip-store/1"
            assert f["embeddings"].dtype == np.float16 and f["embeddings"].shape[1] == 32
            assert f["label"].dtype == np.int8
            for p, e, lab, src in zip(f["path"].asstr()[:], f["embeddings"][:], f["label"][:], f["source"].asstr()[:]):
                assert p not in stored
                stored[p], labels[p], sources[p] = e.astype(np.float32), int(lab), src
            prov = json.loads(f.attrs["provenance"])
    assert len(stored) == 8
    assert {p: labels[p] for p in stored} == {p: 0 if p.startswith("real/") else 1 for p in stored}
    assert set(sources.values()) == {"photos", "gen"}

    paths = sorted(stored)
    ref = reference_embeddings(tiny_checkpoint, [images / p for p in paths])
    got = np.stack([stored[p] for p in paths])
    assert cosine(got, ref).min() >= 0.999
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())

    assert prov["model"] == "dfclip-tiny" and prov["feature"] == "proj" and prov["dim"] == 32
    assert prov["dtype"] == "float16" and prov["precision"] == "fp32"
    assert prov["quick_gelu"] is False and prov["model_config"]["vision_cfg"]["width"] == 64
    assert prov["pretrained"]["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert list(prov["preprocess"]["size"]) == [64, 64]
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["open_clip"] == open_clip.__version__


def test_manifest_with_mapped_columns_and_target_means_real(tmp_path, tiny_checkpoint, dfembed):
    data = tmp_path / "data"
    data.mkdir()
    names = [f"frame{i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        smooth_image(72, 60, seed=i).save(data / name)
    csv = tmp_path / "labels.csv"  # SP_CUP style: Target 1 means real here
    pl.DataFrame({"Image Path": names, "Target": [1, 0, 0, 1], "Gen": ["cam", "sgan", "sd", "cam"],
                  "Video": ["v0", "v1", "v1", "v2"]}).write_csv(csv)

    out = tmp_path / "store"
    code, _, stderr = dfembed("extract", "--manifest", csv, "--root", data, "--column", "path=Image Path",
                              "--column", "label=Target", "--column", "source=Gen", "--column", "group=Video",
                              "--target-means", "real", "--out", out, *TINY, "--pretrained", tiny_checkpoint,
                              "--workers", 0, "--dtype", "float32", "--no-progress")
    assert code == 0, stderr
    meta = store.open(out).meta.sort("path")
    assert meta["path"].to_list() == names
    assert meta["label"].to_list() == [0, 1, 1, 0]
    assert meta["source"].to_list() == ["cam", "sgan", "sd", "cam"]
    assert meta["group"].to_list() == ["v0", "v1", "v1", "v2"]
    rows = live_rows(out)
    ref = reference_embeddings(tiny_checkpoint, [data / n for n in names])
    np.testing.assert_allclose(np.stack([rows[n] for n in names]), ref, rtol=1e-4, atol=1e-5)  # float32 store


# ---------------------------------------------------------------- bad images

def test_bad_image_zoo_logged_rows_aligned_and_retry(tmp_path, tiny_checkpoint, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    good = []
    for i in range(6):
        smooth_image(90 + 7 * i, 80, seed=100 + i).save(images / f"g{i}.png")
        good.append(f"g{i}.png")
    (images / "a_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    smooth_image(128, 128, 1).save(buf, "JPEG")
    (images / "b_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (images / "c_text.png").write_text("not a picture\n" * 10)
    (images / "d_bomb.png").write_bytes(png_claiming_size(100_000, 100_000))
    Image.fromarray(np.ones((8, 8), np.float32)).save(images / "e_float.tif")  # mode F: no RGB meaning
    smooth_image(700, 700, 7).save(images / "f_large.png")  # over the pixel limit set below, fine later
    expected = {"a_empty.jpg": "empty", "b_truncated.jpg": "truncated", "c_text.png": "not_an_image",
                "d_bomb.png": "decompression_bomb", "e_float.tif": "unsupported_mode", "f_large.png": "decompression_bomb"}

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)  # forked workers inherit it
    out = tmp_path / "store"
    config = EmbedConfig(model="dfclip-tiny", pretrained=str(tiny_checkpoint), batch_size=4, workers=2)
    rep = extract(images, out, config, progress=False)
    assert (rep["embedded"], rep["failed"]) == (6, 6)

    s = store.open(out)
    assert dict(s.failures.select("path", "error").iter_rows()) == expected
    assert all(s.failures["message"].str.len_chars() > 0)
    assert pl.read_parquet(out / "failures.parquet").equals(s.failures)
    # Rows stay aligned: every stored embedding is the embedding of its own path's image.
    rows = live_rows(out)
    assert sorted(rows) == good
    ref = reference_embeddings(tiny_checkpoint, [images / p for p in good])
    assert cosine(np.stack([rows[p] for p in good]), ref).min() >= 0.999

    # The limit is back to PIL's default, but logged failures are skipped until --retry-failed.
    monkeypatch.undo()
    rep = extract(images, out, config, progress=False)
    assert (rep["embedded"], rep["failed"], rep["skipped"], rep["skipped_failures"]) == (0, 0, 12, 6)
    rep = extract(images, out, config, progress=False, retry_failed=True)
    assert (rep["embedded"], rep["failed"], rep["skipped"]) == (1, 5, 6)
    s = store.open(out)
    assert sorted(s.meta["path"]) == sorted(good + ["f_large.png"])
    assert dict(s.failures.select("path", "error").iter_rows()) == {k: v for k, v in expected.items() if k != "f_large.png"}
    assert "f_large.png" not in pl.read_parquet(out / "failures.parquet")["path"].to_list()
    big = live_rows(out)["f_large.png"]
    assert cosine(big, reference_embeddings(tiny_checkpoint, [images / "f_large.png"])[0]) >= 0.999


def test_collate_separates_failures_and_keeps_positions():
    x = [torch.full((3, 2, 2), float(i)) for i in range(4)]
    batch = collate([(7, x[0], "", ""), (8, None, "empty", "zero bytes"), (9, x[2], "", ""), (10, None, "truncated", "cut")])
    assert batch.index.tolist() == [7, 9]
    assert batch.pixels[:, 0, 0, 0].tolist() == [0.0, 2.0]
    assert batch.failures == [(8, "empty", "zero bytes"), (10, "truncated", "cut")]
    assert len(batch) == 4
    assert collate([(3, None, "empty", "m")]).pixels is None


# ---------------------------------------------------------------- ranks, lock, bad input

def test_partition_is_disjoint_covering_and_ignores_input_order():
    rows = pl.DataFrame({"path": [f"p{i:02d}" for i in range(11)]}).sample(fraction=1.0, shuffle=True, seed=1)
    for world in (1, 2, 3, 4):
        parts = [partition(rows, r, world)["path"].to_list() for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(rows["path"])
        assert parts[1 % world] == sorted(rows["path"])[1 % world::world]


def test_rank_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = rank_from_env()
    assert (r.rank, r.world, r.local) == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="RANK=2"):
        rank_from_env()


def test_second_writer_is_refused_while_the_lock_is_held(tmp_path, small_folder, tiny_checkpoint, dfembed):
    out = tmp_path / "store"
    args = ("extract", small_folder, "--out", out, *TINY, "--pretrained", tiny_checkpoint, "--workers", 0, "--no-progress")
    with store.writer_lock(out, 0):
        code, _, stderr = dfembed(*args)
        assert code == 2
        assert "another dfembed process" in stderr and "different --out" in stderr
        assert not list(out.glob("shard-*.h5"))
    code, stdout, _ = dfembed(*args)
    assert code == 0 and "3 embedded" in stdout


def _bad_inputs(tmp: Path, folder: Path, checkpoint: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty").mkdir()
    (tmp / "no_label.csv").write_text("path\nreal/src/img0.png\n")
    (tmp / "missing.csv").write_text("path,label\nnope.png,1\n")
    wide = json.loads((Path(embed.backbone.__file__).parent / "model_configs" / "dfclip-tiny.json").read_text())
    wide["vision_cfg"]["width"] = 32
    (tmp / "other-tiny.json").write_text(json.dumps(wide))
    ck = ["--pretrained", checkpoint]
    return {
        "empty folder": ([tmp / "empty", *TINY, *ck], "no images found"),
        "neither input": ([*TINY, *ck], "either an IMAGES_DIR or --manifest"),
        "both inputs": ([folder, "--manifest", tmp / "missing.csv", *TINY, *ck], "either an IMAGES_DIR or --manifest"),
        "manifest without label column": (["--manifest", tmp / "no_label.csv", "--root", folder, *TINY, *ck], "no 'label' column"),
        "manifest with missing files": (["--manifest", tmp / "missing.csv", *TINY, *ck], "not found"),
        "unknown model": ([folder, "--model", "ViT-Q-99", *ck], "unknown model"),
        "checkpoint that does not fit": ([folder, "--model", tmp / "other-tiny.json", *ck], "does not fit"),
        "bad precision": ([folder, *TINY, *ck, "--precision", "fp8"], "--precision"),
    }


def test_bad_input_is_one_line_without_traceback(tmp_path, small_folder, tiny_checkpoint, dfembed):
    for name, (args, message) in _bad_inputs(tmp_path, small_folder, tiny_checkpoint).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        code, _, stderr = dfembed("extract", *args, "--out", out, "--workers", 0, "--no-progress")
        assert code == 2, name
        assert message in stderr, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, (name, stderr)
        assert not out.exists(), name  # refused before anything was written


def test_store_of_another_model_is_refused(tmp_path, small_folder, tiny_checkpoint, dfembed):
    out = tmp_path / "store"
    base = ("extract", small_folder, "--out", out, *TINY, "--workers", 0, "--no-progress")
    assert dfembed(*base, "--pretrained", tiny_checkpoint)[0] == 0
    code, _, stderr = dfembed(*base, "--pretrained", "none")  # other weights, same architecture
    assert code == 2 and "use another --out" in stderr and len(stderr.strip().splitlines()) == 1
    assert len(list(out.glob("shard-*.h5"))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_requested_without_gpu(tmp_path, small_folder, tiny_checkpoint, dfembed):
    code, _, stderr = dfembed("extract", small_folder, "--out", tmp_path / "s", *TINY, "--pretrained",
                              tiny_checkpoint, "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in stderr


def test_demo_writes_images_and_prints_next_commands(tmp_path, dfembed):
    code, stdout, _ = dfembed("demo", tmp_path / "images", "--n-per-source", 2)
    assert code == 0
    files = [p for p in (tmp_path / "images").rglob("*") if p.is_file() and p.suffix != ".csv"]
    assert len(files) == 2 * 1 + 3 * 2  # 2 real sources with half as many, 3 fake sources
    assert "dfembed extract" in stdout and "dfhead fit --cvar-alpha 0.3" in stdout and "dfclip-tiny" in stdout
