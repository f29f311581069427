"""M2B: connected regions per class become boxes; ISPRS colours map to classes; real solaris building mask."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsclip_jax.data import Box, ImageAnnotation, box_to_caption, isprs_rgb_to_index, mask_to_boxes
from rsclip_jax.data.m2b import ISPRS_BOUNDARY, ISPRS_UNKNOWN

REAL = Path(__file__).resolve().parent / "fixtures"  # real package files, see fixtures/ATTRIBUTION.md


def _mask(text: str) -> np.ndarray:
    return np.array([[int(c) for c in row] for row in text.split()], dtype=np.uint8)


MASK = _mask(
    """
    1100000
    1100000
    0011022
    0011022
    0000000
    3000000
    """
)


def test_regions_per_class_with_8_and_4_connectivity():
    names = {1: "building", 2: "tree", 3: "car"}
    assert mask_to_boxes(MASK, names, min_area=1, ignore=(0,)) == [
        Box(0, 0, 4, 4, "building"),  # the two 2x2 blocks touch at a corner: one 8-connected region
        Box(5, 2, 7, 4, "tree"),
        Box(0, 5, 1, 6, "car"),  # a single pixel spans one pixel edge to the next
    ]
    assert mask_to_boxes(MASK, names, min_area=1, ignore=(0,), connectivity=4)[:2] == [
        Box(0, 0, 2, 2, "building"),
        Box(2, 2, 4, 4, "building"),
    ]


def test_small_regions_are_dropped_and_counted():
    dropped: Counter = Counter()
    boxes = mask_to_boxes(MASK, {1: "building", 2: "tree", 3: "car"}, min_area=4, ignore=(0,), dropped=dropped)
    assert boxes == [Box(0, 0, 4, 4, "building"), Box(5, 2, 7, 4, "tree")]
    assert dropped == {"region smaller than min_area (car)": 1}
    dropped.clear()
    mask_to_boxes(MASK, {1: "building", 2: "tree", 3: "car"}, min_area=4, ignore=(0,), connectivity=4, dropped=dropped)
    assert dropped == {"region smaller than min_area (car)": 1}  # 2x2 blocks have exactly 4 pixels: kept


def test_values_must_be_named_or_ignored():
    with pytest.raises(ValueError, match=r"mask values \[3\] are neither in class_names .* nor ignored \[0\]"):
        mask_to_boxes(MASK, {1: "building", 2: "tree"}, ignore=(0,))
    assert mask_to_boxes(MASK, {1: "building"}, min_area=1, ignore=(0, 2, 3)) == [Box(0, 0, 4, 4, "building")]
    with pytest.raises(ValueError, match=r"expected a 2-D class-index mask"):
        mask_to_boxes(np.zeros((2, 2, 3), np.uint8), {0: "x"})
    with pytest.raises(ValueError, match=r"connectivity must be 4 or 8"):
        mask_to_boxes(MASK, {}, ignore=(0, 1, 2, 3), connectivity=6)


def test_isprs_legend_colours():
    rgb = np.array(
        [[[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0]],
         [[255, 255, 0], [255, 0, 0], [0, 0, 0], [255, 0, 255]],
         [[250, 3, 4], [128, 128, 128], [0, 0, 240], [30, 250, 225]]],
        dtype=np.uint8,
    )  # fmt: skip
    assert isprs_rgb_to_index(rgb).tolist() == [
        [0, 1, 2, 3],
        [4, 5, ISPRS_BOUNDARY, ISPRS_UNKNOWN],  # magenta is in no legend
        [5, ISPRS_UNKNOWN, 1, 2],  # small deviations are forgiven, grey is not
    ]


def test_real_solaris_building_mask():
    mask = np.asarray(Image.open(REAL / "solaris" / "sample_fp_mask.tif"))
    assert mask.shape == (900, 900) and set(np.unique(mask).tolist()) == {0, 255}
    buildings = mask_to_boxes(mask, {255: "building"}, ignore=(0,))
    assert len(buildings) == 151
    assert buildings[:2] == [Box(542, 0, 562, 18, "building"), Box(693, 0, 812, 200, "building")]
    assert (
        len(mask_to_boxes(mask, {255: "building"}, ignore=(0,), min_area=1, connectivity=4)) == 154
    )  # 3 diagonal-only joins
    dropped: Counter = Counter()
    assert len(mask_to_boxes(mask, {255: "building"}, ignore=(0,), min_area=100, dropped=dropped)) == 148
    assert dropped == {"region smaller than min_area (building)": 3}
    # the captions docs/data.md shows (40 of the 151 box centres lie in the central region)
    annotation = ImageAnnotation("sample_fp_mask.tif", 900, 900, buildings, "solaris")
    assert box_to_caption(annotation, seed=0) == [
        "A crowd of buildings are in the middle of the picture .",
        "A large deal of buildings at the edge of the picture .",
        "A crowd of buildings are located in the picture .",
        "A large deal of buildings are located in the picture .",
        "There are lots of buildings in the picture .",
    ]
