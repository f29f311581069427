"""RemoteCLIP-style pretraining data.

- `annotations`: the records readers yield (`Box`, `ImageAnnotation`, `CaptionedImage`, `Skipped`).
- `readers`: one reader per annotation format of RemoteCLIP's sources (`READERS`).
- `b2c`: box-to-caption; `m2b`: mask-to-box.
- `caption_cli`: `rsclip data caption` (imported on its own: it pulls in the image stack).

See docs/data.md for the recipe, the formats and the command line.
"""

from rsclip_jax.data.annotations import (
    AnnotationError,
    Box,
    CaptionedImage,
    ImageAnnotation,
    Record,
    Skipped,
    normalize_label,
    relabel,
)
from rsclip_jax.data.b2c import B2CConfig, box_to_caption, pluralize, readable_name
from rsclip_jax.data.m2b import isprs_rgb_to_index, mask_to_boxes
from rsclip_jax.data.readers import READERS, read_annotations

__all__ = [
    "READERS",
    "AnnotationError",
    "B2CConfig",
    "Box",
    "CaptionedImage",
    "ImageAnnotation",
    "Record",
    "Skipped",
    "box_to_caption",
    "isprs_rgb_to_index",
    "mask_to_boxes",
    "normalize_label",
    "pluralize",
    "read_annotations",
    "readable_name",
    "relabel",
]
