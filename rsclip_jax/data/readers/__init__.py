"""Readers for the annotation formats of RemoteCLIP's sources, one function per format.

Every reader takes the annotation path and keyword options, and yields one record per image
(`ImageAnnotation`, `CaptionedImage` or `Skipped`, see `rsclip_jax.data.annotations`). With
`strict=True` (default) a malformed annotation raises `AnnotationError` naming FILE:LINE; with
`strict=False` that image is yielded as `Skipped(reason="invalid annotation")` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from rsclip_jax.data.annotations import Record
from rsclip_jax.data.readers.captions import read_caption_csv, read_karpathy
from rsclip_jax.data.readers.dota import read_dota
from rsclip_jax.data.readers.json_boxes import read_auair, read_coco
from rsclip_jax.data.readers.masks import read_isprs, read_loveda
from rsclip_jax.data.readers.text import read_carpk, read_levir, read_sdd, read_visdrone
from rsclip_jax.data.readers.voc import read_voc

READERS: dict[str, Callable[..., Iterator[Record]]] = {
    "dota": read_dota,
    "voc": read_voc,
    "levir": read_levir,
    "visdrone": read_visdrone,
    "auair": read_auair,
    "sdd": read_sdd,
    "carpk": read_carpk,
    "coco": read_coco,
    "loveda": read_loveda,
    "isprs": read_isprs,
    "karpathy": read_karpathy,
    "csv": read_caption_csv,
}
"""Format name (as `rsclip data caption --format` takes it) -> reader."""


def read_annotations(fmt: str, path: str | Path, **options) -> Iterator[Record]:
    """The records of `path` read as format `fmt` (a key of `READERS`), with that reader's options."""
    if fmt not in READERS:
        raise ValueError(f"unknown annotation format {fmt!r}; expected one of {', '.join(READERS)}")
    return READERS[fmt](path, **options)


__all__ = [
    "READERS",
    "read_annotations",
    "read_auair",
    "read_caption_csv",
    "read_carpk",
    "read_coco",
    "read_dota",
    "read_isprs",
    "read_karpathy",
    "read_levir",
    "read_loveda",
    "read_sdd",
    "read_visdrone",
    "read_voc",
]
