"""The records that annotation readers yield, and class relabelling.

A reader turns one dataset's files into a stream of records, one per image:
`ImageAnnotation` (boxes, for B2C), `CaptionedImage` (human captions, passed through) or
`Skipped` (an image or file that could not be used, with the reason). Nothing is dropped
without a record: boxes a reader leaves out are counted in `ignored`, by reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace


class AnnotationError(ValueError):
    """An annotation file does not follow its format; the message names FILE[:LINE] and what was expected."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates (x to the right, y down), x0 < x1 and y0 < y1."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str

    def __post_init__(self) -> None:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) has no area: need x0 < x1 and y0 < y1")

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0


@dataclass(frozen=True)
class ImageAnnotation:
    """The boxes of one image.

    Attributes:
        image: the image path as the annotation names it, relative to the images folder.
        width, height: the image size in pixels when the annotation states it, else None.
        boxes: the objects, with the dataset's own class names.
        source: the format or dataset the record came from (e.g. "dota").
        ignored: boxes the reader left out, counted by reason (e.g. "zero-area box").
    """

    image: str
    width: int | None
    height: int | None
    boxes: list[Box]
    source: str
    ignored: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptionedImage:
    """Human-written captions of one image (Karpathy JSON, released CSVs), used as they are."""

    image: str
    captions: list[str]
    source: str
    ignored: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """An image (or an annotation file, when the image is unknown) that yields no captions.

    Attributes:
        item: the image path, or FILE[:LINE] when the problem is in the annotation file.
        reason: a short fixed phrase to group by (e.g. "invalid annotation", "no objects").
        detail: the specifics, e.g. the parse error naming FILE:LINE.
    """

    item: str
    reason: str
    detail: str = ""


Record = ImageAnnotation | CaptionedImage | Skipped


def normalize_label(label: str) -> str:
    """The matching key of a class name: lower case, runs of '-', '_' and spaces made one space.

    So DOTA's "small-vehicle", iSAID's "Small_Vehicle" and "small vehicle" are the same class.
    """
    return re.sub(r"[\s_\-]+", " ", label).strip().lower()


def relabel(annotation: ImageAnnotation, class_map: Mapping[str, str | None]) -> ImageAnnotation:
    """Renames classes by `class_map` (matched by `normalize_label`); a class mapped to None is dropped.

    Dropped boxes are counted in `ignored` as "class 'NAME' mapped to null", so they stay visible.
    """
    if not class_map:
        return annotation
    table = {normalize_label(k): v for k, v in class_map.items()}
    boxes: list[Box] = []
    ignored = Counter(annotation.ignored)
    for box in annotation.boxes:
        key = normalize_label(box.label)
        if key not in table:
            boxes.append(box)
        elif table[key] is None:
            ignored[f"class '{box.label}' mapped to null"] += 1
        else:
            boxes.append(replace(box, label=table[key]))
    return replace(annotation, boxes=boxes, ignored=dict(ignored))
