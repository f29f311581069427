"""M2B (mask-to-box): segmentation masks become boxes, which B2C then captions.

Per class, every connected region of the mask (8-connected by default) whose pixel count
reaches `min_area` becomes the box from its min to its max pixel (box edges on pixel edges,
so a single pixel at (x, y) is the box (x, y, x+1, y+1)). Regions below `min_area` are specks
of label noise; they are counted, not captioned.

Legends:
- LoveDA index masks: 0 no-data (ignored), 1 background, 2 building, 3 road, 4 water,
  5 barren, 6 forest, 7 agricultural.
- ISPRS Potsdam/Vaihingen colour-coded label maps: impervious surfaces white (255,255,255),
  building blue (0,0,255), low vegetation cyan (0,255,255), tree green (0,255,0), car yellow
  (255,255,0), clutter/background red (255,0,0). The eroded "noBoundary" maps mark boundaries
  black; those pixels are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from rsclip_jax.data.annotations import Box

DEFAULT_MIN_AREA = 16  # pixels; the smallest building in solaris' 0.5 m mask has 61

LOVEDA_NO_DATA = 0
LOVEDA_CLASSES = {1: "background", 2: "building", 3: "road", 4: "water", 5: "barren", 6: "forest", 7: "agricultural"}

ISPRS_CLASSES = {0: "impervious surfaces", 1: "building", 2: "low vegetation", 3: "tree", 4: "car", 5: "clutter"}
ISPRS_COLOURS = {
    (255, 255, 255): 0,
    (0, 0, 255): 1,
    (0, 255, 255): 2,
    (0, 255, 0): 3,
    (255, 255, 0): 4,
    (255, 0, 0): 5,
}
ISPRS_BOUNDARY = 255  # index of black boundary pixels
ISPRS_UNKNOWN = 254  # index of pixels that match no legend colour
ISPRS_TOLERANCE = 32  # per channel; the released maps are lossless, this only forgives re-encoding


def mask_to_boxes(
    mask: np.ndarray,
    class_names: Mapping[int, str],
    *,
    min_area: int = DEFAULT_MIN_AREA,
    ignore: Iterable[int] = (),
    connectivity: int = 8,
    dropped: Counter | None = None,
) -> list[Box]:
    """The boxes of the connected regions of each class in an index mask.

    Args:
        mask: (H, W) integer class-index mask.
        class_names: mask value -> class name, for every value to turn into boxes.
        min_area: regions with fewer pixels are dropped (and counted in `dropped`).
        ignore: mask values that are not objects (no-data, boundaries); their pixels are skipped.
        connectivity: 8 (diagonal neighbours join a region) or 4.
        dropped: if given, receives the count of dropped small regions, keyed
            "region smaller than min_area (CLASS)".

    Returns:
        Boxes ordered by mask value, then by each region's first pixel in raster order.

    Raises:
        ValueError: the mask is not 2-D, or holds a value that is neither named nor ignored
            (so no class is lost by a legend mismatch).
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D class-index mask, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    ignore = set(ignore)
    present = set(np.unique(mask).tolist())
    unnamed = sorted(present - set(class_names) - ignore)
    if unnamed:
        raise ValueError(
            f"mask values {unnamed} are neither in class_names {dict(class_names)} nor ignored {sorted(ignore)}"
        )
    structure = np.ones((3, 3), bool) if connectivity == 8 else None  # None: scipy's 4-connected cross
    boxes: list[Box] = []
    for value in sorted(present & set(class_names) - ignore):
        regions, count = ndimage.label(mask == value, structure=structure)
        areas = np.bincount(regions.ravel(), minlength=count + 1)[1:]
        for area, (rows, cols) in zip(areas, ndimage.find_objects(regions), strict=True):
            if area < min_area:
                if dropped is not None:
                    dropped[f"region smaller than min_area ({class_names[value]})"] += 1
                continue
            boxes.append(Box(cols.start, rows.start, cols.stop, rows.stop, class_names[value]))
    return boxes


def isprs_rgb_to_index(rgb: np.ndarray, *, tolerance: int = ISPRS_TOLERANCE) -> np.ndarray:
    """Maps an ISPRS colour-coded label map (H, W, 3) to class indices (see `ISPRS_CLASSES`).

    Black pixels become `ISPRS_BOUNDARY`; pixels farther than `tolerance` (per channel) from
    every legend colour become `ISPRS_UNKNOWN`.
    """
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB label map, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int16)
    bits = rgb >= 128
    clean = np.all(np.abs(rgb - np.where(bits, 255, 0)) <= tolerance, axis=-1)
    # each legend colour is a corner of the RGB cube: index the 8 corners by their 3 bits
    corner_to_index = np.full(8, ISPRS_UNKNOWN, np.uint8)
    for (r, g, b), index in ISPRS_COLOURS.items():
        corner_to_index[(r // 255) * 4 + (g // 255) * 2 + b // 255] = index
    corner_to_index[0] = ISPRS_BOUNDARY
    corners = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]
    return np.where(clean, corner_to_index[corners], ISPRS_UNKNOWN).astype(np.uint8)
