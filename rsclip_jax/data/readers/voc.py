"""Pascal VOC XML (DIOR, HRRSD, RSOD, deepforest) and HRSC2016's own XML: one file per image.

Pascal VOC (VOC devkit documentation):

    <annotation>
      <filename>00001.jpg</filename>
      <size><width>800</width><height>800</height><depth>3</depth></size>
      <object><name>airplane</name><difficult>0</difficult>
        <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
    </annotation>

An object may carry an oriented box instead, as roLabelImg writes it:
`<robndbox><cx/><cy/><w/><h/><angle/></robndbox>` (angle in radians); it becomes the
axis-aligned box around the rotated rectangle.

HRSC2016 ships its own XML (`<HRSC_Image>` with `Img_FileName`, `Img_FileFmt`,
`Img_SizeWidth/Height` and `HRSC_Objects/HRSC_Object/box_xmin...box_ymax`). Its `Class_ID`
codes a ship-type hierarchy whose top level is "ship", so every object is labelled "ship".
Both layouts are recognised by their root element, so `--format voc` reads either.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rsclip_jax.data.annotations import AnnotationError, Box, ImageAnnotation, Record
from rsclip_jax.data.readers._common import add_box, annotation_files, number, parse_each

HRSC_LABEL = "ship"


def read_voc(path: str | Path, *, strict: bool = True) -> Iterator[Record]:
    """Reads a VOC/HRSC2016 XML file or a folder of them (searched recursively), one record per file.

    Args:
        path: an `Annotations` folder or a single `.xml` file.
        strict: raise on the first malformed file (True) or report that image as skipped (False).
    """
    files = annotation_files(Path(path), (".xml",))
    yield from parse_each(files, _parse, strict=strict, name=str)


def _parse(file: Path) -> Iterator[Record]:
    try:
        root = ET.parse(file).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{file}:{e.position[0]}: not well-formed XML ({e})") from None
    if root.tag == "annotation":
        yield _parse_voc(root, file)
    elif root.tag == "HRSC_Image":
        yield _parse_hrsc(root, file)
    else:
        raise AnnotationError(
            f"{file}: expected a Pascal VOC <annotation> or an HRSC2016 <HRSC_Image> root element, got <{root.tag}>"
        )


def _text(element: ET.Element, tag: str, where: str) -> str:
    child = element.find(tag)
    if child is None or not (child.text or "").strip():
        raise AnnotationError(f"{where}: expected a non-empty <{tag}>")
    return child.text.strip()


def _size(element: ET.Element, tag: str, where: str) -> int | None:
    """A stated image dimension; missing or 0 (some VOC exports write 0) means unknown."""
    child = element.find(tag)
    if child is None or not (child.text or "").strip():
        return None
    value = number(child.text.strip(), where, f"<{tag}>")
    return int(value) if value > 0 else None


def _parse_voc(root: ET.Element, file: Path) -> ImageAnnotation:
    filename = _text(root, "filename", str(file))
    size = root.find("size")
    width = _size(size, "width", f"{file}: <size>") if size is not None else None
    height = _size(size, "height", f"{file}: <size>") if size is not None else None
    boxes: list[Box] = []
    ignored: Counter = Counter()
    for index, obj in enumerate(root.findall("object"), start=1):
        where = f"{file}: <object> #{index}"
        label = _text(obj, "name", where)
        if (bndbox := obj.find("bndbox")) is not None:
            x0, y0, x1, y1 = (
                number(_text(bndbox, t, where), where, f"<{t}>") for t in ("xmin", "ymin", "xmax", "ymax")
            )
        elif (robndbox := obj.find("robndbox")) is not None:
            x0, y0, x1, y1 = _rotated_rect_bounds(robndbox, where)
        else:
            raise AnnotationError(f"{where}: expected a <bndbox> or <robndbox>")
        add_box(boxes, ignored, x0, y0, x1, y1, label, where)
    return ImageAnnotation(filename, width, height, boxes, "voc", dict(ignored))


def _rotated_rect_bounds(robndbox: ET.Element, where: str) -> tuple[float, float, float, float]:
    cx, cy, w, h, angle = (
        number(_text(robndbox, t, where), where, f"<robndbox><{t}>") for t in ("cx", "cy", "w", "h", "angle")
    )
    # half-extents of a w x h rectangle rotated by `angle`, projected on the image axes
    half_x = (abs(w * math.cos(angle)) + abs(h * math.sin(angle))) / 2.0
    half_y = (abs(w * math.sin(angle)) + abs(h * math.cos(angle))) / 2.0
    return cx - half_x, cy - half_y, cx + half_x, cy + half_y


def _parse_hrsc(root: ET.Element, file: Path) -> ImageAnnotation:
    where = str(file)
    filename = f"{_text(root, 'Img_FileName', where)}.{_text(root, 'Img_FileFmt', where)}"
    width, height = _size(root, "Img_SizeWidth", where), _size(root, "Img_SizeHeight", where)
    boxes: list[Box] = []
    ignored: Counter = Counter()
    for index, obj in enumerate(root.iter("HRSC_Object"), start=1):
        obj_where = f"{file}: <HRSC_Object> #{index}"
        x0, y0, x1, y1 = (
            number(_text(obj, t, obj_where), obj_where, f"<{t}>")
            for t in ("box_xmin", "box_ymin", "box_xmax", "box_ymax")
        )
        add_box(boxes, ignored, x0, y0, x1, y1, HRSC_LABEL, obj_where)
    return ImageAnnotation(filename, width, height, boxes, "hrsc2016", dict(ignored))
