"""Image reading and OpenAI CLIP's evaluation transform.

On the host: read any PIL-readable file to RGB, bicubic-resize the shortest side, center-crop,
and emit **uint8** (H, W, 3). On the device: `normalize_images` scales by 1/255 and applies the
OpenAI mean and std. Keeping host output uint8 quarters host->device traffic and halves host work;
the arithmetic is the same as torchvision's ToTensor + Normalize.

For ordinary 8-bit RGB files the result equals open_clip's `image_transform(size, is_train=False)`.
Other modes are converted to RGB *before* resizing (open_clip resizes first): PIL resizes palette
images with nearest-neighbour and premultiplies alpha, so converting first is the better-defined
choice. 16-bit and float rasters (common in remote sensing) are linearly stretched to 8 bits
between their 2nd and 98th percentiles, the usual display stretch. Raster files PIL cannot decode
(multi-band 16-bit, band-interleaved, float, JPEG2000 without Pillow support) are read whole through
rasterio (`rsclip_jax.raster.read_image`); whole scenes are tiled by `rsclip map` / `rsclip index`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rsclip_jax.raster import STRETCH_PERCENTILES, RasterError, is_raster_name, read_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The one list of image file types, for every folder the project reads images from (evaluation
# datasets, TFDS builders, `rsclip embed`, captioning): all formats PIL decodes here.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2")


def is_image_name(name: str) -> bool:
    """Whether a file name is an image: an `IMAGE_EXTENSIONS` suffix (any case) and not hidden.

    Names starting with "." are not images; they include macOS `._x.jpg` AppleDouble files.
    """
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file."""


def _stretch_to_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)  # float32, not float64: a 10000^2 16-bit band would need 800 MB per copy
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(finite, STRETCH_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB (high-bit-depth rasters are percentile-stretched)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning and keeps the palette colours
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Reads an image file as RGB.

    Raises:
        ImageReadError: naming the file, for missing, empty, corrupt, truncated or oversized files.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here and not later
            return to_rgb(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such image file") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        if is_raster_name(os.fspath(path)):
            return _read_raster(path, e)
        raise ImageReadError(f"{path}: cannot read image: {e}") from None


def _read_raster(path: str | os.PathLike, pil_error: Exception) -> Image.Image:
    """The rasterio fallback of `load_image` for rasters PIL cannot decode."""
    try:
        return Image.fromarray(read_image(path, max_pixels=Image.MAX_IMAGE_PIXELS), "RGB")
    except RasterError as e:
        raise ImageReadError(f"{e} (Pillow: {pil_error})") from None


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shortest side is `size` (torchvision Resize(int) on PIL)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop(size) on PIL, zero-padding images smaller than the crop."""
    w, h = img.size
    if size > w or size > h:
        canvas = Image.new(img.mode, (max(w, size), max(h, size)))
        canvas.paste(img, ((max(size - w, 0)) // 2, (max(size - h, 0)) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, size: int) -> np.ndarray:
    """RGB, resize shortest side, center crop: uint8 array (size, size, 3)."""
    out = np.asarray(center_crop(resize_shortest_side(to_rgb(img), size), size), dtype=np.uint8)
    return out


def load_and_preprocess(path: str | os.PathLike, size: int) -> np.ndarray:
    """`load_image` then `preprocess_image`: uint8 (size, size, 3)."""
    return preprocess_image(load_image(path), size)


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32, scaled to [0, 1] and normalised with the OpenAI mean and std."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(OPENAI_MEAN, jnp.float32)) / jnp.asarray(OPENAI_STD, jnp.float32)


def expand_image_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given; directories expand to their image files (by extension), sorted by name."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, f)
                for f in os.listdir(p)
                if is_image_name(f) and os.path.isfile(os.path.join(p, f))
            )
            if not found:
                raise ImageReadError(f"{p}: directory contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise ImageReadError(f"{p}: no such file or directory")
    return out
