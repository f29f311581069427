"""JSON box formats: AU-AIR's `annotations.json` and COCO detection JSON (iSAID).

AU-AIR (its dataset API readme): `{"annotations": [FRAME, ...], "categories": [NAME, ...]}`, where
FRAME = `{"image_name": ..., "image_width:": W, "image_height": H, "bbox": [{"top", "left",
"height", "width", "class"}, ...], ...}`. The release spells the width key `"image_width:"` (with
the colon); both spellings are read. `class` indexes `categories` (Human, Car, Truck, Van,
Motorbike, Bicycle, Bus, Trailer).

COCO (cocodataset.org, "Data format"): `images` [{id, file_name, width, height}],
`annotations` [{id, image_id, category_id, bbox: [x, y, width, height], ...}], `categories`
[{id, name}]. An annotation without `bbox` uses the bounds of its polygon `segmentation`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rsclip_jax.data.annotations import AnnotationError, Box, ImageAnnotation, Record, Skipped
from rsclip_jax.data.readers._common import INVALID, add_box, parse_each

AUAIR_CATEGORIES = ("Human", "Car", "Truck", "Van", "Motorbike", "Bicycle", "Bus", "Trailer")


def load_json(file: Path) -> Any:
    """Parses a JSON file; syntax errors name FILE:LINE."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return json.loads(file.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{file}: not valid UTF-8 (byte offset {e.start})") from None


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise AnnotationError(f"{where}: expected a key {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise AnnotationError(f"{where}: expected {key!r} to be {expected}, got {value!r}")
    return value


def read_auair(path: str | Path, *, strict: bool = True) -> Iterator[Record]:
    """Reads AU-AIR's `annotations.json`, one record per frame."""
    file = Path(path)
    data = load_json(file)
    frames = _field(data, "annotations", list, str(file))
    categories = data.get("categories") or list(AUAIR_CATEGORIES)

    def parse(indexed: tuple[int, Any]) -> Iterator[Record]:
        index, frame = indexed
        where = f"{file}: annotations[{index}]"
        name = _field(frame, "image_name", str, where)
        where = f"{where} ({name})"
        width = frame.get("image_width", frame.get("image_width:"))
        height = frame.get("image_height")
        boxes: list[Box] = []
        ignored: Counter = Counter()
        for j, box in enumerate(_field(frame, "bbox", list, where)):
            box_where = f"{where}: bbox[{j}]"
            top, left, h, w = (_field(box, k, (int, float), box_where) for k in ("top", "left", "height", "width"))
            cls = _field(box, "class", int, box_where)
            if not 0 <= cls < len(categories):
                raise AnnotationError(f"{box_where}: expected class in 0..{len(categories) - 1}, got {cls}")
            add_box(boxes, ignored, left, top, left + w, top + h, categories[cls], box_where)
        yield ImageAnnotation(name, _dimension(width), _dimension(height), boxes, "auair", dict(ignored))

    yield from parse_each(enumerate(frames), parse, strict=strict, name=lambda item: f"{file}: annotations[{item[0]}]")


def _dimension(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def read_coco(path: str | Path, *, strict: bool = True) -> Iterator[Record]:
    """Reads a COCO detection JSON (e.g. iSAID's), one record per entry of `images`.

    An annotation whose category_id is not defined makes its image invalid; one whose image_id
    is not in `images` is invalid on its own (reported as skipped with strict=False).
    """
    file = Path(path)
    data = load_json(file)
    images = _field(data, "images", list, str(file))
    categories = {}
    for i, category in enumerate(_field(data, "categories", list, str(file))):
        where = f"{file}: categories[{i}]"
        categories[_field(category, "id", int, where)] = _field(category, "name", str, where)
    by_image: dict[Any, list[tuple[int, dict]]] = defaultdict(list)
    for i, annotation in enumerate(_field(data, "annotations", list, str(file))):
        by_image[_field(annotation, "image_id", (int, str), f"{file}: annotations[{i}]")].append((i, annotation))
    image_ids = {image.get("id") for image in images if isinstance(image, dict)}
    for image_id, anns in by_image.items():
        if image_id not in image_ids:  # boxes of no listed image: report them, never lose them quietly
            for i, _ in anns:
                error = AnnotationError(f"{file}: annotations[{i}]: image_id {image_id!r} is not in 'images'")
                if strict:
                    raise error
                yield Skipped(f"{file}: annotations[{i}]", INVALID, str(error))

    def parse(indexed: tuple[int, Any]) -> Iterator[Record]:
        index, image = indexed
        where = f"{file}: images[{index}]"
        image_id = _field(image, "id", (int, str), where)
        name = _field(image, "file_name", str, where)
        boxes: list[Box] = []
        ignored: Counter = Counter()
        for j, annotation in by_image.get(image_id, []):
            ann_where = f"{file}: annotations[{j}] (image {name})"
            category = _field(annotation, "category_id", int, ann_where)
            if category not in categories:
                raise AnnotationError(f"{ann_where}: category_id {category} is not in 'categories'")
            x0, y0, x1, y1 = _coco_bounds(annotation, ann_where)
            add_box(boxes, ignored, x0, y0, x1, y1, categories[category], ann_where)
        yield ImageAnnotation(
            name, _dimension(image.get("width")), _dimension(image.get("height")), boxes, "coco", dict(ignored)
        )

    yield from parse_each(enumerate(images), parse, strict=strict, name=lambda item: f"{file}: images[{item[0]}]")


def _coco_bounds(annotation: dict, where: str) -> tuple[float, float, float, float]:
    bbox = annotation.get("bbox")
    if bbox:
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise AnnotationError(f"{where}: expected bbox [x, y, width, height], got {bbox!r}")
        x, y, w, h = bbox
        return x, y, x + w, y + h
    polygons = annotation.get("segmentation")
    if isinstance(polygons, list) and polygons and all(isinstance(p, list) and len(p) >= 6 for p in polygons):
        xs = [v for p in polygons for v in p[0::2]]
        ys = [v for p in polygons for v in p[1::2]]
        return min(xs), min(ys), max(xs), max(ys)
    raise AnnotationError(f"{where}: expected a bbox [x, y, width, height] or a polygon segmentation")
