"""A small, labelled demo image folder drawn from scratch, so dfclip can be tried without data.

Layout (the folder walk in embed/sources.py reads labels and sources from it):

    out_dir/real/{ffhq,celeba}/vid000_f00.png ...
    out_dir/fake/{stylegan2,sd15,dalle}/vid000_f00.jpg ...
    out_dir/manifest.csv          path,label,source,split,group

The "faces" are cartoons (head, hair, eyes, brows, nose, mouth, shoulders) with random skin
tone, proportions, background and per-frame pose jitter; a few frames share one identity, like
frames of one video, and the manifest keeps them in one group and one split. Each source
carries its own capture or generator trace, modelled on what real detectors pick up, so training
on some sources and testing on a held-out one is a meaningful (and not trivially solved)
experiment:

    real       fine grain (sensor noise, skin texture): high frequencies a camera keeps
    stylegan2  GAN-like: a checkerboard of 2-cell period (transposed-convolution upsampling), less grain
    sd15       diffusion-like: smoothed high frequencies plus a faint 8-cell grid (8x latent decoder)
    dalle      diffusion-like, milder: light smoothing, a little grain, a warm colour cast; it shares
               only "less grain than a camera" with the others, so a detector trained on stylegan2
               and sd15 transfers to it poorly, which is the held-out-generator story

Traces live on a grid of TRACE_GRID x TRACE_GRID cells across the image, whatever its size,
because CLIP sees every image resized to its input (64 px for the tiny demo model, 224 for
ViT-L/14): a one-pixel pattern in a 256 px file would be averaged away before the model sees it.

File format (jpg/png/webp) and size (64-256 px) are drawn per video independently of the label,
so neither is a shortcut. Output is byte-identical for a given seed.

`write_demo_videos` (`dfembed demo --videos`) writes short H.264 videos instead, for the face
stage: the bundled face detector finds no face in the cartoons, so every frame shows a real face
photo (scikit-image's astronaut) gliding, turning and zooming over a background, with the same
per-source traces drawn on a grid scaled to the face, so that the aligned crop the model sees
spans about TRACE_GRID cells.
"""

import os
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFilter

from dfclip.errors import UserError

REAL_SOURCES = ("ffhq", "celeba")
FAKE_SOURCES = ("stylegan2", "sd15", "dalle")
FRAMES_PER_VIDEO = 4
SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}  # of each source's videos; the rest is train
FORMATS = {  # suffix -> (PIL format, save options)
    "jpg": ("JPEG", {"quality": 90}),
    "png": ("PNG", {}),
    "webp": ("WEBP", {"quality": 90, "method": 4}),
}
SUPERSAMPLE = 2  # draw at 2x and downscale: anti-aliased edges without a slow renderer
TRACE_GRID = 64  # traces live on a 64 x 64 grid of cells across the image: the tiny model's input resolution

# Skin tones from light to dark; a face takes a random point between two neighbours.
SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 150], [224, 172, 122], [198, 134, 90], [141, 85, 54], [94, 58, 40]],
    dtype=np.float64,
)
HAIR_COLOURS = np.array(
    [[30, 22, 18], [70, 45, 30], [120, 80, 40], [200, 160, 90], [150, 150, 150], [120, 40, 20]],
    dtype=np.float64,
)


def _identity(rng: np.random.Generator) -> dict:
    """Everything that stays fixed across the frames of one video."""
    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    low = int(tone)
    skin = SKIN_TONES[low] + (tone - low) * (SKIN_TONES[min(low + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[low])
    return {
        "size": int(rng.integers(64, 257)),
        "format": str(rng.choice(list(FORMATS))),
        "skin": skin,
        "hair": HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.8, 1.2),
        "iris": rng.uniform(20, 140, size=3),
        "shirt": rng.uniform(20, 235, size=3),
        "bg_top": rng.uniform(0, 255, size=3),
        "bg_bottom": rng.uniform(0, 255, size=3),
        "head_w": rng.uniform(0.26, 0.34),  # half-widths as fractions of the image side
        "head_h": rng.uniform(0.34, 0.42),
        "eye_gap": rng.uniform(0.10, 0.14),
        "hair_len": rng.uniform(0.0, 0.25),
    }


def _colour(rgb: np.ndarray, alpha: int = 255) -> tuple[int, int, int, int]:
    r, g, b = np.clip(rgb, 0, 255).astype(int)
    return int(r), int(g), int(b), alpha


def _draw_face(person: dict, rng: np.random.Generator) -> np.ndarray:
    """One frame of `person` with pose jitter, as float32 HxWx3 in [0, 255]."""
    size = person["size"]
    side = size * SUPERSAMPLE

    # Pose jitter for this frame: shift, scale and in-plane rotation of the whole person.
    cx = side * (0.5 + rng.uniform(-0.06, 0.06))
    cy = side * (0.47 + rng.uniform(-0.05, 0.05))
    scale = side * rng.uniform(0.92, 1.08)
    hw, hh = person["head_w"] * scale, person["head_h"] * scale

    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    skin, shade, hair = _colour(person["skin"]), person["skin"] * 0.8, _colour(person["hair"])
    # Shoulders and neck, then hair behind the head, then the head.
    draw.ellipse([cx - 1.6 * hw, cy + 0.85 * hh, cx + 1.6 * hw, cy + 2.6 * hh], fill=_colour(person["shirt"]))
    draw.rectangle([cx - 0.4 * hw, cy + 0.5 * hh, cx + 0.4 * hw, cy + 1.05 * hh], fill=_colour(shade))
    hair_bottom = cy + hh * (0.1 + 2 * person["hair_len"])
    draw.ellipse([cx - 1.12 * hw, cy - 1.12 * hh, cx + 1.12 * hw, hair_bottom + 0.3 * hh], fill=hair)
    draw.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=skin)
    draw.chord([cx - 1.05 * hw, cy - 1.1 * hh, cx + 1.05 * hw, cy - 0.2 * hh], 180, 360, fill=hair)

    # Eyes (sometimes mid-blink), brows, nose, mouth.
    eye_y, eye_dx = cy - 0.1 * hh, person["eye_gap"] * scale
    eye_w, eye_h = 0.2 * hw, 0.11 * hh * (0.25 if rng.random() < 0.15 else 1.0)
    for ex in (cx - eye_dx, cx + eye_dx):
        draw.ellipse([ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h], fill=(245, 245, 240, 255))
        iris = 0.8 * min(eye_w, eye_h)
        draw.ellipse([ex - iris, eye_y - iris, ex + iris, eye_y + iris], fill=_colour(person["iris"]))
        pupil = 0.45 * iris
        draw.ellipse([ex - pupil, eye_y - pupil, ex + pupil, eye_y + pupil], fill=(10, 10, 10, 255))
        brow_y = eye_y - 0.22 * hh
        draw.line([ex - eye_w, brow_y + 0.03 * hh, ex + eye_w, brow_y],
                  fill=_colour(person["hair"] * 0.7), width=max(1, int(0.04 * hh)))
    draw.line([cx, cy - 0.02 * hh, cx - 0.08 * hw, cy + 0.25 * hh, cx + 0.05 * hw, cy + 0.27 * hh],
              fill=_colour(shade * 0.9), width=max(1, int(0.025 * hh)))
    mouth_y, mouth_w = cy + 0.5 * hh, rng.uniform(0.25, 0.4) * hw
    mouth_h = rng.uniform(0.02, 0.12) * hh
    draw.ellipse([cx - mouth_w, mouth_y - mouth_h, cx + mouth_w, mouth_y + mouth_h], fill=(150, 50, 60, 255))

    # Downscale first, then rotate: rotating at full resolution was most of the demo's run time.
    layer = layer.reduce(SUPERSAMPLE)  # box average of each 2x2 block
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR,
                         center=(cx / SUPERSAMPLE, cy / SUPERSAMPLE))
    # Background: a vertical gradient between two colours.
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (1 - t) * person["bg_top"] + t * person["bg_bottom"]
    canvas = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8), "RGB")
    canvas.paste(layer, (0, 0), layer)
    return np.asarray(canvas, dtype=np.float32)


def _smooth(pixels: np.ndarray, radius: float) -> np.ndarray:
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _noise(rng: np.random.Generator, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    return sigma * rng.standard_normal(shape, dtype=np.float32)


def _cells(side: int, n: int) -> np.ndarray:
    """Index of each of `side` pixels on a grid of n equal cells across the image (nearest)."""
    return np.arange(side) * n // side


def _grain(rng: np.random.Generator, sigma: float, side: int, grid: int = TRACE_GRID) -> np.ndarray:
    """Camera-like grain and fine texture, one value per cell of a grid x grid grid."""
    at = _cells(side, grid)
    return _noise(rng, sigma, (grid, grid, 3))[at][:, at]


def _add_trace(pixels: np.ndarray, source: str, rng: np.random.Generator, grid: int = TRACE_GRID) -> np.ndarray:
    """The capture (real) or generator (fake) fingerprint of `source`, applied to one frame.

    Traces are drawn on a grid of TRACE_GRID cells across the image, whatever its size: an image is
    resized to the model's input before CLIP sees it, and a trace at the scale of single pixels of
    a 256 px file would be averaged away (the tiny demo model sees 64 px). Video frames pass a finer
    `grid`, so that the face crop the model sees spans about TRACE_GRID cells.
    """
    side = pixels.shape[0]
    unit = side / grid  # file pixels per grid cell
    if source in REAL_SOURCES:  # fine sensor grain and skin texture
        return pixels + _grain(rng, rng.uniform(8.0, 12.0), side, grid)
    if source == "stylegan2":  # transposed-convolution upsampling: a checkerboard of 2-cell period
        parity = _cells(side, grid // 2) % 2
        checker = np.where(parity[:, None] == parity[None, :], 1.0, -1.0).astype(np.float32)
        return pixels + 7.0 * checker[..., None] + _grain(rng, 5.0, side, grid)
    if source == "sd15":  # latent diffusion: smoothed high frequencies and the 8x decoder's faint grid
        wave = np.cos(2 * np.pi * _cells(side, grid) / 8).astype(np.float32)
        return _smooth(pixels, 1.2 * unit) + 5.0 * np.outer(wave, wave)[..., None]
    if source == "dalle":  # another diffusion model: lighter smoothing, little grain, a warm cast
        warm = np.array([6.0, 2.0, -6.0], dtype=np.float32)
        return _smooth(pixels, 0.6 * unit) + warm + _grain(rng, 3.0, side, grid)
    raise ValueError(f"unknown demo source {source!r}")


def _split_of_videos(n_videos: int, rng: np.random.Generator) -> list[str]:
    """Split names per video index: whole videos go to one split so frames never leak."""
    if n_videos < 3:  # too few to hold anything out
        return ["train"] * n_videos
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * n_videos))
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * n_videos))
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n_videos - n_val - n_test)
    return [names[i] for i in rng.permutation(n_videos)]


def make_demo_images(out_dir: str | os.PathLike, *, n_per_source: int = 40, seed: int = 0) -> Path:
    """Write the demo folder (see module docstring) into the empty or new `out_dir`.

    Each fake source gets `n_per_source` images and each real source half that (at least 1),
    so the defaults give 40 real and 120 fake images, a 1:3 imbalance. Returns the absolute
    folder path. The same `seed` gives byte-identical files.
    """
    if n_per_source < 1:
        raise UserError(f"n_per_source must be at least 1, got {n_per_source}")
    out = Path(os.path.abspath(os.path.expanduser(out_dir)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"demo folder {out} already exists and is not empty; pass a new or empty folder")

    rows: list[dict] = []
    sources = [(s, 0, max(1, n_per_source // 2)) for s in REAL_SOURCES]
    sources += [(s, 1, n_per_source) for s in FAKE_SOURCES]
    for source_index, (source, label, n_images) in enumerate(sources):
        folder = out / ("fake" if label else "real") / source
        folder.mkdir(parents=True, exist_ok=True)
        n_videos = -(-n_images // FRAMES_PER_VIDEO)
        splits = _split_of_videos(n_videos, np.random.default_rng([seed, source_index, 1]))
        for video in range(n_videos):
            # One stream per video: the same seed draws the same video whatever n_per_source is.
            rng = np.random.default_rng([seed, source_index, 0, video])
            person = _identity(rng)
            pil_format, options = FORMATS[person["format"]]
            n_frames = min(FRAMES_PER_VIDEO, n_images - video * FRAMES_PER_VIDEO)
            for frame in range(n_frames):
                pixels = _add_trace(_draw_face(person, rng), source, rng)
                image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
                name = f"vid{video:03d}_f{frame:02d}.{person['format']}"
                image.save(folder / name, pil_format, **options)
                rows.append({
                    "path": f"{folder.relative_to(out).as_posix()}/{name}",
                    "label": label,
                    "source": source,
                    "split": splits[video],
                    "group": f"{source}/vid{video:03d}",
                })
    pl.DataFrame(rows).sort("path").write_csv(out / "manifest.csv")
    return out


# ---------------------------------------------------------------- videos
# The astronaut portrait that ships with scikit-image (skimage.data.astronaut(), a public-domain
# NASA photo): a real face, which the bundled detector finds, unlike the drawn cartoons above.
ASTRONAUT_HEAD = (140, 20, 310, 215)  # x0, y0, x1, y1 of the head (hair to neck) in the 512 px photo
ASTRONAUT_FACE_WIDTH = 86.7  # px: the width of MTCNN's box around the face in the photo
ASTRONAUT_FACE_CENTRE = (224.4 - 140, 117.1 - 20)  # its centre, in head-crop pixels
VIDEO_FPS = 10
VIDEO_CRF = 14  # libx264 quality: high enough that the procedural traces survive compression
FACE_CROP_WIDTHS = 2.0  # an aligned crop at --face-scale 1.3 spans about 2 face-box widths


def _astronaut_head() -> np.ndarray:
    try:
        from skimage.data import astronaut
    except ImportError:
        raise UserError("demo videos use scikit-image's astronaut photo; install it with: "
                        "pip install scikit-image") from None
    x0, y0, x1, y1 = ASTRONAUT_HEAD
    return np.ascontiguousarray(astronaut()[y0:y1, x0:x1])


def save_demo_head(path: str | os.PathLike) -> Path:
    """Save the demo videos' head picture as a PNG, for `write_demo_videos(face_image=...)` on a machine
    without scikit-image (bench/gpu-wheels.sh --video carries it to a GPU machine)."""
    Image.fromarray(_astronaut_head()).save(path)
    return Path(path)


def _feather(h: int, w: int, border: float = 0.08) -> np.ndarray:
    """Alpha [h, w] in [0, 255]: opaque inside, fading out over `border` of each side."""
    ramp = lambda n: np.clip(np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5) / (border * n), 0, 1)  # noqa: E731
    return np.outer(ramp(h), ramp(w)) * 255


def _video_frames(head: np.ndarray, source: str, rng: np.random.Generator, n_frames: int, size: int) -> np.ndarray:
    """One video's frames [n, size, size, 3]: the head gliding, turning and zooming a little over a
    gradient background, with `source`'s trace on every frame."""
    width = size * rng.uniform(0.28, 0.38)  # face box width
    start, end = rng.uniform(0.3, 0.7, size=(2, 2)) * size
    angles = rng.uniform(-12, 12) + np.linspace(0, rng.uniform(-10, 10), n_frames)
    zooms = np.linspace(1.0, rng.uniform(0.85, 1.15), n_frames)
    gain = rng.uniform(0.85, 1.15, size=3)  # per-video colour and lighting
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (1 - t) * rng.uniform(0, 255, size=3) + t * rng.uniform(0, 255, size=3)
    background = np.broadcast_to(background, (size, size, 3)).astype(np.float32)
    face = Image.fromarray(np.clip(head * gain, 0, 255).astype(np.uint8), "RGB")
    alpha = Image.fromarray(_feather(*head.shape[:2]).astype(np.uint8), "L")
    grid = 2 * round(TRACE_GRID * size / (FACE_CROP_WIDTHS * width) / 2)  # even: stylegan2's checker halves it
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for i in range(n_frames):
        centre = start + (end - start) * i / max(n_frames - 1, 1)
        scale = width * zooms[i] / ASTRONAUT_FACE_WIDTH
        theta = np.deg2rad(angles[i])
        # frame -> head pixels, the inverse of: rotate by theta (counter-clockwise on screen), scale, move
        inverse = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / scale
        offset = np.asarray(ASTRONAUT_FACE_CENTRE) - inverse @ centre
        coeffs = (*inverse[0], offset[0], *inverse[1], offset[1])
        rgb = face.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC)
        a = np.asarray(alpha.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR),
                       dtype=np.float32)[..., None] / 255
        pixels = a * np.asarray(rgb, dtype=np.float32) + (1 - a) * background
        frames[i] = np.clip(_add_trace(pixels, source, rng, grid), 0, 255).round().astype(np.uint8)
    return frames


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(VIDEO_CRF), "preset": "veryfast"}
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def write_demo_videos(out_dir: str | os.PathLike, *, n_per_source: int = 4, frames: int = 8, size: int = 192,
                      seed: int = 0, face_image: str | os.PathLike | None = None) -> Path:
    """Write short labelled demo videos into the empty or new `out_dir`; returns its absolute path.

    Layout: real/{ffhq,celeba}/vidNNN.mp4, fake/{stylegan2,sd15,dalle}/vidNNN.mp4 (`n_per_source`
    videos each, `frames` frames of size x size at 10 fps, H.264) and manifest.csv (path, label,
    source, split; whole videos per split). Every frame shows the astronaut face from scikit-image
    moving over a background, which the bundled face detector finds, with its source's procedural
    trace (see the module docstring) drawn on a grid that scales with the face, so the aligned face
    crop the model sees spans about TRACE_GRID cells. The same seed gives the same frames.
    """
    if n_per_source < 1 or frames < 1 or size < 32 or size % 2:
        raise UserError(f"demo videos need n_per_source >= 1, frames >= 1 and an even size >= 32; "
                        f"got {n_per_source}, {frames}, {size}")
    out = Path(os.path.abspath(os.path.expanduser(out_dir)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"demo folder {out} already exists and is not empty; pass a new or empty folder")
    # face_image: another head picture (RGB), e.g. the astronaut's head saved where scikit-image is not installed
    head = _astronaut_head() if face_image is None else np.asarray(Image.open(face_image).convert("RGB"))
    rows: list[dict] = []
    for source_index, source in enumerate(REAL_SOURCES + FAKE_SOURCES):
        label = int(source in FAKE_SOURCES)
        folder = out / ("fake" if label else "real") / source
        folder.mkdir(parents=True, exist_ok=True)
        splits = _split_of_videos(n_per_source, np.random.default_rng([seed, source_index, 3]))
        for video in range(n_per_source):
            rng = np.random.default_rng([seed, source_index, 2, video])
            _write_mp4(folder / f"vid{video:03d}.mp4", _video_frames(head, source, rng, frames, size))
            rows.append({"path": f"{folder.relative_to(out).as_posix()}/vid{video:03d}.mp4", "label": label,
                         "source": source, "split": splits[video]})
    pl.DataFrame(rows).sort("path").write_csv(out / "manifest.csv")
    return out
