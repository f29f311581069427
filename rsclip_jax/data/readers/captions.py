"""Caption sources, passed through as they are: Karpathy-style JSON and RemoteCLIP/OpenCLIP CSVs.

Karpathy JSON (RSICD, RSITMD, UCM-captions `dataset_*.json`): `{"images": [{"filename": ...,
"split": "train"|"val"|"test", "sentences": [{"raw": ...}, ...]}, ...]}`; an optional
`filepath` is prefixed to `filename`. Captions are `sentences[i].raw`, stripped of surrounding
whitespace and otherwise unchanged.

CSV: a header naming the image column and the caption column (OpenCLIP's `filepath` and
`title` by default), comma- or tab-separated (OpenCLIP's own default is tab), one caption per
row. Rows of the same image are grouped, in order of first appearance. The separator is found
from the header (`detect_delimiter`, which `rsclip data build` uses too); `parse_separator` reads
the value of a separator flag (`,`, `comma`, a real tab, `\t` or `tab`).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from rsclip_jax.data.annotations import AnnotationError, CaptionedImage, Record, Skipped
from rsclip_jax.data.readers._common import INVALID, parse_each, read_text
from rsclip_jax.data.readers.json_boxes import _field, load_json

EMPTY_CAPTION = "empty caption"


def split_not_selected(split: str) -> str:
    """The skip reason of an image whose split was not asked for."""
    return f"split '{split}' not selected"


def read_karpathy(path: str | Path, *, strict: bool = True, splits: Sequence[str] = ("train",)) -> Iterator[Record]:
    """Reads a Karpathy-style JSON, one record per image; images of other splits are reported as skipped.

    Args:
        splits: the splits to keep, e.g. ("train",) for pretraining, or ("all",) for every image.
    """
    file = Path(path)
    images = _field(load_json(file), "images", list, str(file))
    keep_all = "all" in splits

    def parse(indexed: tuple[int, object]) -> Iterator[Record]:
        index, entry = indexed
        where = f"{file}: images[{index}]"
        name = _field(entry, "filename", str, where)
        if entry.get("filepath"):
            name = f"{entry['filepath'].rstrip('/')}/{name}"
        split = _field(entry, "split", str, f"{where} ({name})")
        if not keep_all and split not in splits:
            yield Skipped(name, split_not_selected(split))
            return
        captions, ignored = [], Counter()
        for j, sentence in enumerate(_field(entry, "sentences", list, f"{where} ({name})")):
            raw = _field(sentence, "raw", str, f"{where} ({name}): sentences[{j}]").strip()
            if raw:
                captions.append(raw)
            else:
                ignored[EMPTY_CAPTION] += 1
        yield CaptionedImage(name, captions, "karpathy", dict(ignored))

    yield from parse_each(enumerate(images), parse, strict=strict, name=lambda item: f"{file}: images[{item[0]}]")


def read_caption_csv(
    path: str | Path, *, strict: bool = True, image_key: str = "filepath", caption_key: str = "title"
) -> Iterator[Record]:
    """Reads an image-caption CSV (e.g. RemoteCLIP's released Det-10/Seg-4/Ret-3 CSVs), one record per image.

    The delimiter, comma or tab, is found from the header (`detect_delimiter`).

    Raises:
        AnnotationError: the header lacks either column (always, as nothing can be read), or,
            with strict=True, a row has too few fields (naming FILE:LINE).
    """
    file = Path(path)
    text = read_text(file)
    if not text.strip():
        raise AnnotationError(
            f"{file}:1: expected a header with columns {image_key!r} and {caption_key!r}, got an empty file"
        )
    delimiter = detect_delimiter(text.splitlines()[0], image_key, caption_key, str(file))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader)
    image_col, caption_col = header.index(image_key), header.index(caption_key)
    captions: dict[str, list[str]] = {}
    ignored: dict[str, Counter] = {}
    for row in reader:
        if not row:
            continue
        where = f"{file}:{reader.line_num}"
        if len(row) <= max(image_col, caption_col) or not row[image_col].strip():
            error = AnnotationError(
                f"{where}: expected {len(header)} {delimiter!r}-separated fields with an image path, got {row!r}"
            )
            if strict:
                raise error
            yield Skipped(where, INVALID, str(error))
            continue
        image = row[image_col].strip()
        captions.setdefault(image, [])
        ignored.setdefault(image, Counter())
        if caption := row[caption_col].strip():
            captions[image].append(caption)
        else:
            ignored[image][EMPTY_CAPTION] += 1
    for image, texts in captions.items():
        yield CaptionedImage(image, texts, "csv", dict(ignored[image]))


SEPARATOR_NAMES = {",": ",", "comma": ",", "\t": "\t", "\\t": "\t", "tab": "\t"}
"""Values a separator flag takes: a real tab, or `\\t` / `tab` as typed in a shell."""


def parse_separator(value: str, flag: str = "--csv-separator") -> str:
    """The one-character CSV delimiter named by a flag's value (see `SEPARATOR_NAMES`; any other
    single character stands for itself).

    Raises:
        ValueError: naming `flag`, for an empty or multi-character value that is no known name.
    """
    if value.lower() in SEPARATOR_NAMES:
        return SEPARATOR_NAMES[value.lower()]
    if len(value) == 1 and value not in "\"\r\n":
        return value
    raise ValueError(f"{flag} {value!r}: give one character, 'tab' (or \\t) or 'comma'; "
                     "leave it out to detect comma or tab from the header")


def detect_delimiter(header_line: str, image_key: str, caption_key: str, where: str) -> str:
    """The delimiter (comma or tab) under which `header_line` holds both columns.

    Raises:
        AnnotationError: naming `where` (the file) when neither does.
    """
    for delimiter in (",", "\t"):
        columns = next(csv.reader([header_line], delimiter=delimiter), [])
        if image_key in columns and caption_key in columns:
            return delimiter
    raise AnnotationError(
        f"{where}:1: expected a header with columns {image_key!r} and {caption_key!r} (comma- or tab-separated), "
        f"got {header_line!r}"
    )
