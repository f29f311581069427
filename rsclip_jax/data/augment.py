"""Training augmentation on the host: decode + RandomResizedCrop + remote-sensing flips/rotations.

Everything takes an explicit `np.random.Generator`, so the caller decides the seeding (the grain
pipeline seeds it from (seed, epoch, record index), which makes restored iterators exact).

Speed (see docs/performance.md): the crop is computed from the header size *before* decoding,
so JPEGs are decoded with DCT scaling (`Image.draft`) at the smallest 1/2^k scale that still
leaves the crop at least `image_size` pixels, and the crop and bicubic resize are one
`Image.resize(box=...)` call. Flips and 90° rotations are one PIL transpose of the result.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from rsclip_jax.preprocess import to_rgb

# Records hold JPEG or PNG; naming the formats skips PIL's probing of every other plugin.
DECODE_FORMATS = ("JPEG", "PNG")
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """RandomResizedCrop as OpenCLIP's train default (scale 0.9-1.0), plus rotations and flips.

    Remote-sensing images have no canonical "up", so flips and 90° rotations are on by default.
    `reducing_gap` lets PIL box-reduce by an integer factor before the bicubic pass when the
    downscale is large (>= 2x the gap); 3.0 is indistinguishable from a full bicubic pass.
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    reducing_gap: float | None = 3.0
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"bad scale {self.scale} or ratio {self.ratio}")


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, crop_width, crop_height).

    Ten tries at a random area share and log-uniform aspect ratio that fit the image; else the
    largest centred crop within the ratio range.
    """
    area = width * height
    # All ten tries drawn at once (two generator calls instead of up to twenty); taking the first
    # that fits gives the same distribution as torchvision's sequential loop.
    target_area = area * rng.uniform(scale[0], scale[1], 10)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), 10))
    ws = np.round(np.sqrt(target_area * aspect)).astype(int)
    hs = np.round(np.sqrt(target_area / aspect)).astype(int)
    fits = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
    if fits.size:
        w, h = int(ws[fits[0]]), int(hs[fits[0]])
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_and_augment(image_bytes: bytes, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Decodes an encoded JPEG/PNG and returns an augmented uint8 (S, S, 3) array."""
    size = config.image_size
    with Image.open(io.BytesIO(image_bytes), formats=DECODE_FORMATS) as img:
        full_w, full_h = img.size
        left, top, w, h = random_resized_crop_box(full_w, full_h, config.scale, config.ratio, rng)
        if config.jpeg_draft and img.format == "JPEG":
            # Ask for the smallest DCT-scaled decode in which the crop still covers >= size pixels.
            img.draft("RGB", (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
        img.load()
        rgb = to_rgb(img)
    sx, sy = rgb.width / full_w, rgb.height / full_h  # 1.0 unless draft() reduced the decode
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = rgb.resize((size, size), INTERPOLATIONS[config.interpolation], box=box, reducing_gap=config.reducing_gap)
    return np.asarray(random_flip_rotate(out, config, rng))


def _dihedral_ops() -> dict[tuple[int, bool, bool], Image.Transpose | None]:
    """PIL transpose equal to numpy's rot90(k) then [:, ::-1] (hflip) then [::-1] (vflip).

    Found by trying each of PIL's 7 transposes on a 2x2 image, so the table cannot drift from
    the numpy definition. One PIL transpose of the 224 px result costs ~30 µs; copying numpy's
    rotated/flipped views into the batch cost ~200 µs per image.
    """
    probe = np.arange(4, dtype=np.uint8).reshape(2, 2)
    table = {}
    for k in range(4):
        for h in (False, True):
            for v in (False, True):
                want = np.rot90(probe, k)
                want = want[:, ::-1] if h else want
                want = want[::-1] if v else want
                if np.array_equal(want, probe):
                    table[(k, h, v)] = None
                    continue
                table[(k, h, v)] = next(op for op in Image.Transpose
                                        if np.array_equal(np.asarray(Image.fromarray(probe).transpose(op)), want))
    return table


_DIHEDRAL_OPS = _dihedral_ops()


def random_flip_rotate(image: Image.Image, config: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """Random 90° rotation (k in 0..3, counter-clockwise) then horizontal and vertical flips.

    With all three on, each of the 8 symmetries of the square is equally likely (every one
    arises from exactly 2 of the 16 draws). Applied as a single PIL transpose.
    """
    k = int(rng.integers(0, 4)) if config.rot90 else 0
    h = bool(config.hflip and rng.random() < 0.5)
    v = bool(config.vflip and rng.random() < 0.5)
    op = _DIHEDRAL_OPS[(k, h, v)]
    return image if op is None else image.transpose(op)
