"""DOTA v1.0/v1.5 `labelTxt` files: one text file per image.

Format (DOTA website, "Annotation format"): optional header lines `imagesource:SOURCE` and
`gsd:METRES` (the value may be `null`), then one object per line:

    x1 y1 x2 y2 x3 y3 x4 y4 category difficult

The four points are the corners of an oriented box, clockwise; the reader keeps the axis-aligned
box around them. Class names are DOTA's (`small-vehicle`, `storage-tank`, ...). The image is the
label file's name with `.png` (DOTA's image format), relative to the annotation folder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rsclip_jax.data.annotations import AnnotationError, Box, ImageAnnotation, Record
from rsclip_jax.data.readers._common import add_box, annotation_files, number, parse_each, read_lines, relative_name

HEADER_PREFIXES = ("imagesource:", "gsd:")
EXPECTED = "'x1 y1 x2 y2 x3 y3 x4 y4 category difficult'"


def read_dota(path: str | Path, *, strict: bool = True, image_suffix: str = ".png") -> Iterator[Record]:
    """Reads a DOTA label file or a folder of them (searched recursively), one record per file.

    Args:
        path: a `labelTxt` folder or a single `.txt` file.
        strict: raise on the first malformed line (True) or report that image as skipped (False).
        image_suffix: the extension of the image files.
    """
    root = Path(path)
    files = annotation_files(root, (".txt",))
    yield from parse_each(files, lambda f: _parse(f, root, image_suffix), strict=strict, name=str)


def _parse(file: Path, root: Path, image_suffix: str) -> Iterator[Record]:
    boxes: list[Box] = []
    ignored: Counter = Counter()
    for line_number, line in enumerate(read_lines(file), start=1):
        text = line.strip()
        if not text or text.startswith(HEADER_PREFIXES):
            continue
        where = f"{file}:{line_number}"
        fields = text.split()
        if len(fields) != 10:
            raise AnnotationError(f"{where}: expected {EXPECTED} (10 fields), got {len(fields)}: {text!r}")
        coords = [number(token, where, "a corner coordinate") for token in fields[:8]]
        if fields[9] not in ("0", "1"):
            raise AnnotationError(f"{where}: expected difficult to be 0 or 1, got {fields[9]!r}")
        xs, ys = coords[0::2], coords[1::2]
        add_box(boxes, ignored, min(xs), min(ys), max(xs), max(ys), fields[8], where)
    yield ImageAnnotation(relative_name(file, root, image_suffix), None, None, boxes, "dota", dict(ignored))
