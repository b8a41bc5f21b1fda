"""embed.images: every bad file fails with a reason, every odd mode becomes correct RGB."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dfclip.embed.images import IMAGE_EXTENSIONS, MAX_ASPECT_RATIO, ImageError, load_rgb


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def opened(path, attribute: str):
    """An attribute of the file as PIL opens it (closing the file again)."""
    with Image.open(path) as image:
        return getattr(image, attribute)


def noise_image(width=96, height=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def white_composite(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Definition of "over white": a*v + (1-a)*255."""
    a = alpha / 255.0
    return a * value + (1 - a) * 255


# ---- failures ------------------------------------------------------------------------


def expect_kind(path, kind, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as err:
        load_rgb(path, **kwargs)
    assert err.value.kind == kind, err.value.message
    return err.value


def test_empty_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    error = expect_kind(tmp_path / "a.jpg", "empty")
    # Raised in DataLoader workers: it must survive pickling with its kind.
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.kind, copy.message, str(copy)) == ("empty", error.message, str(error))
    assert str(error).startswith("empty: ") and "zero-byte" in str(error)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_files(tmp_path, fmt, suffix):
    buffer = io.BytesIO()
    noise_image(256, 256).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    expect_kind(path, "truncated")
    path.write_bytes(data)  # the whole file decodes
    assert load_rgb(path).size == (256, 256)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    expect_kind(path, "not_an_image")


def png_with_header_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height: a decompression bomb's header."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[16:29])  # after signature(8) + length(4) + b"IHDR"(4)
    ihdr = struct.pack(">II", width, height) + ihdr[8:]
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bombs(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_with_header_size(100_000, 100_000))  # PIL itself errors
    expect_kind(huge, "decompression_bomb")
    # Between PIL's warning (89.5 MP) and its error (2x): PIL only warns, we refuse.
    big = tmp_path / "big.png"
    big.write_bytes(png_with_header_size(12_000, 8_000))
    assert Image.MAX_IMAGE_PIXELS < 12_000 * 8_000 < 2 * Image.MAX_IMAGE_PIXELS
    expect_kind(big, "decompression_bomb")


def test_pixel_limit_is_overridable(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    noise_image(100, 100).save(path)
    assert "10000 pixels" in expect_kind(path, "decompression_bomb", max_pixels=9_999).message
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # PIL's setting is the default
    expect_kind(path, "decompression_bomb")


def test_unsupported_mode(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((8, 8), np.float32)).save(path)
    assert opened(path, "mode") == "F"
    expect_kind(path, "unsupported_mode")


def test_missing_file_and_directory(tmp_path):
    expect_kind(tmp_path / "missing.jpg", "io_error")
    (tmp_path / "dir.jpg").mkdir()
    expect_kind(tmp_path / "dir.jpg", "io_error")


# ---- conversions ---------------------------------------------------------------------


def test_rgb_jpeg_matches_pil_decode(tmp_path):
    path = tmp_path / "photo.JPG"
    noise_image().save(path, quality=90)
    image = load_rgb(path)
    assert image.size == (96, 64)
    with Image.open(path) as reference:
        np.testing.assert_array_equal(pixels(image), np.asarray(reference).astype(int))


def test_grayscale_and_one_bit(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    assert (pixels(load_rgb(tmp_path / "g.png")) == 77).all()
    checker = (np.indices((6, 6)).sum(0) % 2).astype(bool)
    Image.fromarray(checker).save(tmp_path / "b.png")
    assert opened(tmp_path / "b.png", "mode") == "1"
    out = pixels(load_rgb(tmp_path / "b.png"))
    np.testing.assert_array_equal(out[..., 0], np.where(checker, 255, 0))


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_composited_on_white(tmp_path, mode):
    value = np.array([[100, 100, 100]], dtype=np.uint8)
    alpha = np.array([[0, 128, 255]], dtype=np.uint8)
    if mode == "LA":
        array = np.stack([value, alpha], -1)
    else:
        array = np.stack([value, value // 2, value // 4, alpha], -1)
    Image.fromarray(array, mode).save(tmp_path / "a.png")
    out = pixels(load_rgb(tmp_path / "a.png"))
    expected = white_composite(array[..., 0].astype(float), alpha.astype(float))
    np.testing.assert_allclose(out[..., 0], expected, atol=1)
    assert (out[0, 0] == 255).all()  # fully transparent -> white, whatever RGB was under it
    if mode == "RGBA":
        np.testing.assert_array_equal(out[0, 2], [100, 50, 25])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(tmp_path, fmt):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([200, 10, 10, 0, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (2, 0, 4, 2))  # right half uses index 1, the transparent one
    path = tmp_path / f"p.{fmt.lower()}"
    image.save(path, transparency=1)
    out = pixels(load_rgb(path))
    assert (out[:, :2] == [200, 10, 10]).all()
    assert (out[:, 2:] == 255).all()


def test_cmyk(tmp_path):
    cyan = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    cyan.save(tmp_path / "c.tif")
    cyan.save(tmp_path / "c.jpg", quality=95)
    assert (pixels(load_rgb(tmp_path / "c.tif")) == [0, 255, 255]).all()
    jpeg = pixels(load_rgb(tmp_path / "c.jpg"))  # lossy, and stored inverted (Adobe)
    np.testing.assert_allclose(jpeg, np.broadcast_to([0, 255, 255], jpeg.shape), atol=6)


@pytest.mark.parametrize("dtype,suffix", [(np.uint16, ".png"), (np.uint16, ".tif"), (np.int32, ".tif")])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, dtype, suffix):
    values = np.array([[0, 1000, 25700, 40000, 65535]], dtype=dtype)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert opened(path, "mode") in ("I;16", "I")
    out = pixels(load_rgb(path))[..., 0]
    np.testing.assert_array_equal(out, np.rint(values.astype(float) * 255 / 65535))  # [0, 4, 100, 156, 255]


def test_exif_orientation_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = [255, 0, 0]  # left half red
    array[:, 20:] = [0, 0, 255]  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, exif=exif, quality=95)
    image = load_rgb(path)
    assert image.size == (20, 40)  # width and height swapped
    out = pixels(image)
    assert (abs(out[:16] - [255, 0, 0]) < 40).all()  # left half is now on top
    assert (abs(out[24:] - [0, 0, 255]) < 40).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim.{fmt.lower()}"
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)
    assert opened(path, "n_frames") == 3
    assert (pixels(load_rgb(path)) == [255, 0, 0]).all()


def test_every_accepted_extension_decodes(tmp_path):
    """Each extension the folder walk accepts is one this Pillow opens: a small photo saved under it loads."""
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".jpe"} <= IMAGE_EXTENSIONS
    registered = Image.registered_extensions()
    for ext in sorted(IMAGE_EXTENSIONS):
        path = tmp_path / f"x{ext}"
        fmt = "JPEG" if registered[ext] == "MPO" else registered[ext]
        noise_image(24, 16).save(path, fmt)
        assert load_rgb(path).size == (24, 16), ext


def test_extreme_aspect_ratio_fails_before_decoding(tmp_path):
    """250000 x 2 passes the pixel limit, but resizing its short side to 224 would need 28 G pixels."""
    wide = tmp_path / "wide.png"
    Image.new("L", (250_000, 2)).save(wide)
    assert wide.stat().st_size < 4000
    err = expect_kind(wide, "aspect_ratio")
    assert "250000x2" in err.message and str(MAX_ASPECT_RATIO) in err.message
    tall = tmp_path / "tall.png"
    Image.new("RGB", (3, 3 * MAX_ASPECT_RATIO + 3)).save(tall)
    expect_kind(tall, "aspect_ratio")
    ok = tmp_path / "panorama.png"
    Image.new("RGB", (MAX_ASPECT_RATIO * 2, 2)).save(ok)  # at the limit: decoded
    assert load_rgb(ok).size == (MAX_ASPECT_RATIO * 2, 2)
