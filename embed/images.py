"""Decode one image file into an RGB PIL image, or fail with a machine-readable reason.

Runs inside DataLoader worker processes, so it keeps no state of its own: the only
global it reads is PIL's own `Image.MAX_IMAGE_PIXELS` (the default pixel limit).

Conversion choices:
- Transparency (RGBA, LA, P with a transparent index, PA) is composited onto WHITE.
  Transparent web images are shown on white pages, which is how they appear in the
  web-scale data CLIP was trained on; the RGB hidden under alpha=0 is arbitrary
  (often black or junk) and dropping alpha would expose it.
- 16-bit / 32-bit integer grey (I;16*, I) is scaled 0..65535 -> 0..255 and rounded;
  PIL's own convert() clips instead, turning almost every 16-bit image white.
- EXIF orientation is applied, so the pixels are upright as a viewer shows them.
- Animated GIF/WebP/TIFF: the first frame.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoders we let PIL use: photo formats only. Restricting them keeps odd plugins (EPS via
# Ghostscript, ...) off untrusted files. (Multi-picture camera JPEGs come through "JPEG" as MPO.)
# HEIF/HEIC counts when the pillow-heif plugin is installed; AVIF and JPEG 2000 when this Pillow
# was built with them.
PHOTO_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "AVIF", "HEIF", "JPEG2000")


def _register_optional_plugins() -> None:
    try:  # an optional plugin, not a dependency: HEIC photos where it is installed
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


def _pillow_formats() -> tuple[tuple[str, ...], frozenset[str]]:
    """(the PHOTO_FORMATS this Pillow can open, every file extension Pillow registers for them)."""
    _register_optional_plugins()
    Image.init()
    registered = Image.registered_extensions()  # ".jfif" -> "JPEG", ...
    formats = tuple(f for f in PHOTO_FORMATS if f in Image.OPEN)
    opened_as = {"MPO": "JPEG"}  # .mpo files open through the JPEG decoder
    return formats, frozenset(ext.lower() for ext, f in registered.items() if opened_as.get(f, f) in formats)


ALLOWED_FORMATS, IMAGE_EXTENSIONS = _pillow_formats()

# The model resizes the short side to its input size (224 or 336 px) and crops the centre. The long
# side grows by the same factor, so a 1.5 kB PNG of 250000 x 2 pixels would become 224 x 28,000,000:
# gigabytes, although it passes the pixel limit. Images longer than this many times their width
# (either way) fail with kind "aspect_ratio" before any pixel is decoded; at the limit a resized
# image is at most 100 model inputs (15 MB at 224 px).
MAX_ASPECT_RATIO = 100
_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "PA"}
_PLAIN_MODES = {"RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "P"}
_INT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(Exception):
    """A file that could not be turned into an RGB image.

    `kind` is one of: "empty", "io_error", "not_an_image", "truncated", "corrupt",
    "decompression_bomb", "aspect_ratio", "unsupported_mode". `message` says what happened.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(kind, message)  # both in args, so it pickles across worker processes
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def load_rgb(path: str | os.PathLike, *, max_pixels: int | None = None) -> Image.Image:
    """Fully decode `path` and return it as an upright RGB image.

    max_pixels: refuse images with more pixels than this (decompression bombs). None
    uses PIL's `Image.MAX_IMAGE_PIXELS` (about 89.5 MP by default), so PIL's
    DecompressionBombWarning becomes an error here. PIL itself hard-fails above twice
    its own limit, so to allow more than that raise `PIL.Image.MAX_IMAGE_PIXELS` too.

    Raises ImageError with a `kind` on any failure; never returns a partial image
    (truncated files fail: LOAD_TRUNCATED_IMAGES is left off).
    """
    path = Path(path)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty", f"{path} is a zero-byte file")
        with open(path, "rb") as f:
            image = _open(f, path, limit)
            try:
                image.load()  # force the full decode now: truncation shows up here
            except Image.DecompressionBombError as e:
                raise ImageError("decompression_bomb", str(e)) from None
            except (OSError, SyntaxError, EOFError, ValueError) as e:
                if isinstance(e, OSError) and e.errno is not None:
                    raise
                raise ImageError(_decode_kind(e), f"{path}: cannot decode: {e}") from None
            _make_upright(image)
            return _to_rgb(image, path)
    except ImageError:
        raise
    except OSError as e:  # file system: missing, permission, directory, read error
        raise ImageError("io_error", f"{path}: {e.strerror or e}") from None


def _open(f, path: Path, limit: int | None) -> Image.Image:
    """Identify the file and check its size, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(f, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            "not_an_image", f"{path}: not a readable {'/'.join(ALLOWED_FORMATS)} image"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError("decompression_bomb", f"{path}: {e}") from None
    except (OSError, SyntaxError, EOFError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a real read error, not a decoder complaint
        raise ImageError(_decode_kind(e), f"{path}: bad header: {e}") from None
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageError(
            "decompression_bomb",
            f"{path}: {width}x{height} = {width * height} pixels is over the limit of {limit}",
        )
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageError(
            "aspect_ratio",
            f"{path}: {width}x{height} is more than {MAX_ASPECT_RATIO} times longer one way than the other; "
            "resizing its short side to the model's input would take gigabytes",
        )
    return image


def _decode_kind(error: Exception) -> str:
    """PIL reports running out of data as "image file is truncated" / "Truncated File Read"."""
    return "truncated" if "truncat" in str(error).lower() or isinstance(error, EOFError) else "corrupt"


def _make_upright(image: Image.Image) -> None:
    """Apply the EXIF orientation tag in place (no copy when there is none).

    A malformed EXIF block keeps the image as stored: broken metadata should not cost
    us the pixels.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:
        pass


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in _INT_MODES:
        # 16-bit range -> 8 bits by scaling; values outside 0..65535 (only possible in
        # 32-bit "I") are clipped.
        values = np.asarray(image).astype(np.float32)
        grey = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    raise ImageError("unsupported_mode", f"{path}: pixel mode {mode!r} has no defined RGB conversion")
