"""Box-labelled tiles for `make_samples.py`: trees (deepforest), buildings and roads (solaris), counting crops.

Every tile is a window of a real image; its boxes are the source's own labels moved into the
tile's pixel frame, so the project's B2C (`rsclip_jax.data.box_to_caption`) can caption it.
Each source image is split into disjoint regions (train / retrieval / counting) so no held-out
pixel is ever seen in training; the regions are listed in the tables below and in docs/samples.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from make_samples_geo import rasterize, read_geojson_polygons, read_uint16_tiff, stretch_to_uint8, tiff_geotransform
from PIL import Image

from rsclip_jax.data import Box, ImageAnnotation, mask_to_boxes, read_annotations, relabel

Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, end-exclusive


@dataclass
class Tile:
    """One output image: a window of a source raster with its labels (boxes or ready captions)."""

    name: str  # output file stem, e.g. "trees_yell528_x0400_y0200" (x, y: the window's corner in the source)
    image: Image.Image  # RGB
    source: str  # the PyPI package the pixels come from
    split: str  # "train" or "retrieval"
    annotation: ImageAnnotation | None = None  # boxes in tile pixels, captioned by B2C
    captions: list[str] | None = None  # land use: template captions (see make_samples_landuse)
    classes: dict[str, float] = field(default_factory=dict)  # land use: class -> covered fraction


@dataclass
class Report:
    """What a builder made and what it left out, with reasons, for the printed summary."""

    skipped: Counter = field(default_factory=Counter)  # "source: reason" -> number of windows
    left_out: Counter = field(default_factory=Counter)  # "source: reason" -> number of boxes/regions

    def merge(self, other: Report) -> None:
        self.skipped.update(other.skipped)
        self.left_out.update(other.left_out)


TREE_TILE = 200  # px at 0.1 m: 20 m windows hold about 1-15 crowns
MIN_VISIBLE = 0.5  # a box cut by the tile edge is kept (clipped) when at least half of it is inside
TREE_CLASS_MAP = {"Alive": "living tree", "Dead": "dead tree"}  # SOAP_061's two classes; "Tree" reads "tree"
# (VOC file, short name, train region, retrieval region, counting region); None = not used that way.
# The two Yellowstone crops are split by rows, so every held-out window is far from most training pixels.
TREE_IMAGES: list[tuple[str, str, Region | None, Region | None, Region | None]] = [
    ("OSBS_029.xml", "osbs029", (0, 0, 400, 400), None, None),
    ("SOAP_061.xml", "soap061", (0, 0, 400, 400), None, None),
    ("2019_YELL_2_528000_4978000_image_crop2.xml", "yell528", (0, 0, 2299, 1800), None, (0, 1800, 2299, 2472)),
    ("2019_YELL_2_541000_4977000_image_crop.xml", "yell541", None, (0, 0, 1249, 400), (0, 400, 1249, 1035)),
]

BUILDING_TILE = 150  # px at 0.5 m: 75 m windows, 0-3 houses each
BUILDING_RETRIEVAL_Y = 750  # the bottom row of tiles of sample_geotiff.tif is held out
ROAD_TILE = 216  # px at about 0.3 m (2.7e-6 degrees): 6 x 6 tiles of the 1300 px image
ROAD_RETRIEVAL_X = 864  # the two right-hand tile columns of road_mask_input.tif are held out
ROAD_MIN_AREA = 100  # px: smaller road-mask regions in a tile are slivers at its edge, not roads

COUNT_SIZES = (128, 160, 192, 224, 256)  # px: counting crop sides, smallest first (they block fewer others)
COUNT_STRIDE = 8
COUNT_WHOLE = 0.9  # a tree counts when at least 90% of its box lies inside the crop; a crop is rejected
COUNT_OUTSIDE = 0.0  # when any other box has more than this share inside: the boxes are tighter than the crowns
COUNT_PER_NUMBER = 3  # crops per count 1..10
COUNT_TEMPLATE = "There are {} trees in the picture ."


def grid(region: Region, size: int) -> Iterator[tuple[int, int]]:
    """Upper-left corners of the non-overlapping size x size windows that fit in `region`, row by row."""
    x0, y0, x1, y1 = region
    for y in range(y0, y1 - size + 1, size):
        for x in range(x0, x1 - size + 1, size):
            yield x, y


def boxes_in_window(
    boxes: list[Box], x: int, y: int, size: int, min_visible: float = MIN_VISIBLE
) -> tuple[list[Box], int]:
    """Boxes moved into the window's frame and clipped to it; those less than `min_visible` inside are dropped.

    Returns:
        (kept boxes, number of boxes that touch the window but were dropped).
    """
    kept, dropped = [], 0
    for b in boxes:
        cx0, cy0, cx1, cy1 = max(b.x0, x), max(b.y0, y), min(b.x1, x + size), min(b.y1, y + size)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        if (cx1 - cx0) * (cy1 - cy0) >= min_visible * (b.x1 - b.x0) * (b.y1 - b.y0):
            kept.append(Box(cx0 - x, cy0 - y, cx1 - x, cy1 - y, b.label))
        else:
            dropped += 1
    return kept, dropped


def _boxed_tile(
    name: str, image: Image.Image, boxes: list[Box], source: str, split: str, report: Report
) -> Tile | None:
    """A Tile for B2C, or None (counted) when no labelled object is in it: B2C cannot caption an empty tile."""
    if not boxes:
        report.skipped[f"{source}: {split} window with no labelled object"] += 1
        return None
    annotation = ImageAnnotation(f"images/{name}.jpg", image.width, image.height, boxes, source)
    return Tile(name, image, source, split, annotation=annotation)


def tree_tiles(shared: Path) -> tuple[list[Tile], Report]:
    """200 px windows of the deepforest orthophotos with their VOC tree boxes (train and retrieval regions)."""
    tiles, report = [], Report()
    for xml, short, train, retrieval, _ in TREE_IMAGES:
        record = relabel(next(iter(read_annotations("voc", shared / "deepforest" / xml))), TREE_CLASS_MAP)
        with Image.open(shared / "deepforest" / record.image) as im:
            image = im.convert("RGB")
        for split, region in (("train", train), ("retrieval", retrieval)):
            for x, y in grid(region, TREE_TILE) if region else ():
                boxes, dropped = boxes_in_window(record.boxes, x, y, TREE_TILE)
                report.left_out["deepforest: tree less than half inside its tile"] += dropped
                crop = image.crop((x, y, x + TREE_TILE, y + TREE_TILE))
                tile = _boxed_tile(f"trees_{short}_x{x:04d}_y{y:04d}", crop, boxes, "deepforest", split, report)
                tiles += [tile] if tile else []
    return tiles, report


def building_tiles(shared: Path) -> tuple[list[Tile], Report]:
    """150 px windows of solaris' sample_geotiff.tif with boxes from its 43 building polygons.

    The polygons (EPSG:32616, like the raster) are rasterised one by one with the raster's
    geotransform; a building enters a tile when at least half of its pixels do, as the box of
    its pixels inside the tile. solaris' `sample_fp_mask.tif` is not used: it does not register
    with this image (see docs/samples.md).
    """
    tif = shared / "solaris" / "sample_geotiff.tif"
    polygons, crs = read_geojson_polygons(shared / "solaris" / "geotiff_labels.geojson")
    if not crs.endswith("32616"):
        raise ValueError(f"geotiff_labels.geojson: expected EPSG:32616 like sample_geotiff.tif, got {crs}")
    pixels = read_uint16_tiff(tif)
    image = Image.fromarray(stretch_to_uint8(pixels, 1.0, 99.0)).convert("RGB")  # panchromatic: grey in RGB
    transform = tiff_geotransform(tif)
    masks = [rasterize(p, transform, pixels.shape) for p in polygons]
    tiles, report = [], Report()
    for x, y in grid((0, 0, *image.size), BUILDING_TILE):
        boxes = []
        for mask, (r0, c0) in masks:
            ys, xs = np.nonzero(mask)
            ys, xs = ys + r0, xs + c0
            inside = (xs >= x) & (xs < x + BUILDING_TILE) & (ys >= y) & (ys < y + BUILDING_TILE)
            if not inside.any():
                continue
            if inside.sum() < MIN_VISIBLE * len(xs):
                report.left_out["solaris: building less than half inside its tile"] += 1
                continue
            bx, by = xs[inside] - x, ys[inside] - y
            boxes.append(Box(int(bx.min()), int(by.min()), int(bx.max()) + 1, int(by.max()) + 1, "building"))
        split = "retrieval" if y >= BUILDING_RETRIEVAL_Y else "train"
        crop = image.crop((x, y, x + BUILDING_TILE, y + BUILDING_TILE))
        tile = _boxed_tile(f"buildings_solaris_x{x:04d}_y{y:04d}", crop, boxes, "solaris", split, report)
        tiles += [tile] if tile else []
    return tiles, report


def road_tiles(shared: Path) -> tuple[list[Tile], Report]:
    """216 px windows of solaris' road_mask_input.tif captioned from its road mask by M2B then B2C.

    `sample_road_raster_mask.tif` (0 background, 255 road) is on the same 1300 px grid. Within
    each tile, every 8-connected road region of at least ROAD_MIN_AREA pixels is one road
    (`mask_to_boxes`). The road GeoJSON lies outside this image and is not used.
    """
    pixels = read_uint16_tiff(shared / "solaris" / "road_mask_input.tif")
    with Image.open(shared / "solaris" / "sample_road_raster_mask.tif") as im:
        mask = np.asarray(im)
    if mask.shape != pixels.shape:
        raise ValueError(f"road mask {mask.shape} and image {pixels.shape} differ in size")
    image = Image.fromarray(stretch_to_uint8(pixels, 1.0, 99.0)).convert("RGB")
    tiles, report = [], Report()
    for x, y in grid((0, 0, *image.size), ROAD_TILE):
        dropped: Counter = Counter()
        window = mask[y : y + ROAD_TILE, x : x + ROAD_TILE]
        boxes = mask_to_boxes(window, {255: "road"}, ignore=(0,), min_area=ROAD_MIN_AREA, dropped=dropped)
        report.left_out.update({f"solaris: {k}": v for k, v in dropped.items()})
        split = "retrieval" if x >= ROAD_RETRIEVAL_X else "train"
        crop = image.crop((x, y, x + ROAD_TILE, y + ROAD_TILE))
        tile = _boxed_tile(f"roads_solaris_x{x:04d}_y{y:04d}", crop, boxes, "solaris", split, report)
        tiles += [tile] if tile else []
    return tiles, report


def _count_candidates(boxes: np.ndarray, region: Region) -> dict[int, list[tuple[int, int, int]]]:
    """Windows (size, x, y) in `region` that cut no tree, keyed by the number of whole trees (1-10)."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    found: dict[int, list[tuple[int, int, int]]] = {}
    for size in COUNT_SIZES:
        for y in range(region[1], region[3] - size + 1, COUNT_STRIDE):
            for x in range(region[0], region[2] - size + 1, COUNT_STRIDE):
                w = np.clip(np.minimum(boxes[:, 2], x + size) - np.maximum(boxes[:, 0], x), 0, None)
                h = np.clip(np.minimum(boxes[:, 3], y + size) - np.maximum(boxes[:, 1], y), 0, None)
                inside = w * h / areas
                if ((inside > COUNT_OUTSIDE) & (inside < COUNT_WHOLE)).any():
                    continue
                count = int((inside >= COUNT_WHOLE).sum())
                if 1 <= count <= 10:
                    found.setdefault(count, []).append((size, x, y))
    return found


def counting_crops(shared: Path) -> tuple[list[dict], Report]:
    """Crops of the Yellowstone orthophotos' counting regions holding exactly N whole trees, N = 1..10.

    Higher counts are rarer, so they choose first; within a count, smaller crops first, then by
    image, row and column. Crops never overlap each other. Returns entries for counting.json,
    each with its PIL image under "image".
    """
    candidates: list[tuple[int, int, int, int, str, Path]] = []  # (count, size, x, y, short, png)
    for xml, short, _, _, region in TREE_IMAGES:
        if region is None:
            continue
        record = next(iter(read_annotations("voc", shared / "deepforest" / xml)))
        labels = {b.label for b in record.boxes}
        if labels != {"Tree"}:
            raise ValueError(f"{xml}: counting expects only 'Tree' boxes, found {sorted(labels)}")
        boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in record.boxes], float)
        for count, windows in _count_candidates(boxes, region).items():
            candidates += [(count, s, x, y, short, shared / "deepforest" / record.image) for s, x, y in windows]
    candidates.sort(key=lambda c: (-c[0], c[1], c[4], c[3], c[2]))
    chosen: list[tuple[int, int, int, int, str, Path]] = []
    for count, size, x, y, short, png in candidates:
        if sum(c[0] == count for c in chosen) >= COUNT_PER_NUMBER:
            continue
        if any(
            c[4] == short and x < c[2] + c[1] and c[2] < x + size and y < c[3] + c[1] and c[3] < y + size
            for c in chosen
        ):
            continue
        chosen.append((count, size, x, y, short, png))
    report = Report()
    for n in range(1, 11):
        missing = COUNT_PER_NUMBER - sum(c[0] == n for c in chosen)
        if missing:
            report.skipped[
                f"deepforest: counting, count {n}: {COUNT_PER_NUMBER - missing} of {COUNT_PER_NUMBER} crops found"
            ] += missing
    entries = []
    for count, size, x, y, short, png in sorted(chosen):
        with Image.open(png) as im:
            crop = im.convert("RGB").crop((x, y, x + size, y + size))
        entries.append(
            {
                "filename": f"trees_{short}_n{count:02d}_x{x:04d}_y{y:04d}.jpg",
                "count": count,
                "class_name": "tree",
                "caption_template": COUNT_TEMPLATE,
                "caption": COUNT_TEMPLATE.format(count),
                "source": f"deepforest {png.name}",
                "crop": [x, y, x + size, y + size],
                "image": crop,
            }
        )
    return entries, report
