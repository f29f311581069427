"""Segmentation masks read through M2B: LoveDA index masks and ISPRS Potsdam/Vaihingen colour maps.

LoveDA (its readme): `{Train,Val}/{Urban,Rural}/masks_png/N.png` (8-bit index masks, legend in
`rsclip_jax.data.m2b`) beside `images_png/N.png`. The image of a mask is the same relative path
with `masks_png` replaced by `images_png`, so `--images` and `--annotations` may be the same root.

ISPRS 2D labelling (benchmark pages): Potsdam `top_potsdam_2_10_label.tif` (or
`..._label_noBoundary.tif`) labels `top_potsdam_2_10_RGB.tif`; Vaihingen labels carry the
image's own name (`top_mosaic_09cm_area1.tif`) in another folder. The image name is the label
name with a trailing `_label[_noBoundary]` replaced by `image_suffix` ("_RGB"; Potsdam also
ships "_IRRG" and "_RGBIR").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from rsclip_jax.data.annotations import AnnotationError, ImageAnnotation, Record
from rsclip_jax.data.m2b import (
    DEFAULT_MIN_AREA,
    ISPRS_BOUNDARY,
    ISPRS_CLASSES,
    ISPRS_UNKNOWN,
    LOVEDA_CLASSES,
    LOVEDA_NO_DATA,
    isprs_rgb_to_index,
    mask_to_boxes,
)
from rsclip_jax.data.readers._common import annotation_files, parse_each

ISPRS_MIN_LEGEND_FRACTION = 0.99  # below this, the file is not a label map (e.g. the photo itself)


def _load(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as img:
            return np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise AnnotationError(f"{file}: cannot read the mask image ({e})") from None


def read_loveda(
    path: str | Path, *, strict: bool = True, min_area: int = DEFAULT_MIN_AREA, connectivity: int = 8
) -> Iterator[Record]:
    """Reads LoveDA masks (a folder, searched recursively for .png, or one file), one record per mask.

    Value 0 (no-data) is ignored; any value above 7 makes the mask invalid.
    """
    root = Path(path)

    def parse(file: Path) -> Iterator[Record]:
        mask = _load(file)
        if mask.ndim != 2:
            raise AnnotationError(f"{file}: expected a single-band index mask, got shape {mask.shape}")
        unknown = sorted(set(np.unique(mask).tolist()) - set(LOVEDA_CLASSES) - {LOVEDA_NO_DATA})
        if unknown:
            raise AnnotationError(f"{file}: expected LoveDA class values 0-7, got {unknown}")
        dropped: Counter = Counter()
        boxes = mask_to_boxes(
            mask,
            LOVEDA_CLASSES,
            min_area=min_area,
            ignore=(LOVEDA_NO_DATA,),
            connectivity=connectivity,
            dropped=dropped,
        )
        rel = file.relative_to(root) if root.is_dir() else Path(file.name)
        image = "/".join("images_png" if part == "masks_png" else part for part in rel.parts)
        yield ImageAnnotation(image, mask.shape[1], mask.shape[0], boxes, "loveda", dict(dropped))

    yield from parse_each(annotation_files(root, (".png",)), parse, strict=strict, name=str)


def read_isprs(
    path: str | Path,
    *,
    strict: bool = True,
    min_area: int = DEFAULT_MIN_AREA,
    connectivity: int = 8,
    image_suffix: str = "_RGB",
) -> Iterator[Record]:
    """Reads ISPRS colour-coded label maps (a folder of .tif/.png, or one file), one record per map.

    Boundary (black) pixels are ignored. A file where under 99% of pixels are legend colours
    or black is invalid: it is most likely an image, not a label map.
    """
    root = Path(path)

    def parse(file: Path) -> Iterator[Record]:
        rgb = _load(file)
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise AnnotationError(f"{file}: expected an RGB colour-coded label map, got shape {rgb.shape}")
        index = isprs_rgb_to_index(rgb)
        legend_fraction = 1.0 - float(np.mean(index == ISPRS_UNKNOWN))
        if legend_fraction < ISPRS_MIN_LEGEND_FRACTION:
            raise AnnotationError(
                f"{file}: expected an ISPRS colour-coded label map, but only {legend_fraction:.1%} of pixels "
                "are legend colours"
            )
        dropped: Counter = Counter()
        boxes = mask_to_boxes(
            index,
            ISPRS_CLASSES,
            min_area=min_area,
            ignore=(ISPRS_BOUNDARY, ISPRS_UNKNOWN),
            connectivity=connectivity,
            dropped=dropped,
        )
        if unknown := int(np.sum(index == ISPRS_UNKNOWN)):
            dropped["pixels matching no legend colour"] += unknown
        rel = file.relative_to(root) if root.is_dir() else Path(file.name)
        stem = re.sub(r"_label(_noBoundary)?$", image_suffix, rel.stem)
        image = rel.with_name(stem + rel.suffix).as_posix()
        yield ImageAnnotation(image, index.shape[1], index.shape[0], boxes, "isprs", dict(dropped))

    yield from parse_each(annotation_files(root, (".tif", ".tiff", ".png")), parse, strict=strict, name=str)
