"""Helpers shared by the readers: finding annotation files, reading lines, parsing numbers, skip policy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from rsclip_jax.data.annotations import AnnotationError, Box, Record, Skipped

T = TypeVar("T")

INVALID = "invalid annotation"


def annotation_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself when it is a file, else every file under it with one of `suffixes`, sorted.

    Raises:
        FileNotFoundError: `path` does not exist.
        AnnotationError: a folder holds no file with those suffixes (likely the wrong folder).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
        raise AnnotationError(f"{path}: no annotation files ({', '.join('*' + s for s in suffixes)}) in this folder")
    return found


def relative_name(file: Path, root: Path, suffix: str) -> str:
    """`file`'s path relative to `root` (its own name when `root` is the file), with `suffix` as extension."""
    rel = file.relative_to(root) if root.is_dir() else Path(file.name)
    return rel.with_suffix(suffix).as_posix()


def read_text(file: Path) -> str:
    """A UTF-8 text file's contents (a byte-order mark is allowed).

    Raises:
        AnnotationError: naming FILE:LINE of the first byte that is not valid UTF-8.
    """
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AnnotationError(f"{file}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def read_lines(file: Path) -> list[str]:
    """The lines of a UTF-8 text file, without line ends (see `read_text`)."""
    return read_text(file).splitlines()


def number(token: str, where: str, what: str) -> float:
    """`token` as a float, or an AnnotationError saying where, what was expected and what was found."""
    try:
        return float(token)
    except ValueError:
        raise AnnotationError(f"{where}: expected {what} to be a number, got {token!r}") from None


def add_box(
    boxes: list[Box], ignored: Counter, x0: float, y0: float, x1: float, y1: float, label: str, where: str
) -> None:
    """Appends the box; a zero-width or zero-height box is counted in `ignored`, an inverted one is an error.

    Zero-area boxes occur in real releases (AU-AIR has some) and carry no location, so they are
    left out visibly; x1 < x0 means the columns were misread, so it stops the file.
    """
    if x1 < x0 or y1 < y0:
        raise AnnotationError(f"{where}: expected x_min <= x_max and y_min <= y_max, got ({x0}, {y0}, {x1}, {y1})")
    if x1 == x0 or y1 == y0:
        ignored["zero-area box"] += 1
        return
    boxes.append(Box(x0, y0, x1, y1, label))


def parse_each(
    units: Iterable[T], parse: Callable[[T], Iterator[Record]], *, strict: bool, name: Callable[[T], str]
) -> Iterator[Record]:
    """Runs `parse` on each unit (a file, a JSON entry); with strict=False an AnnotationError becomes a Skipped.

    With strict=True (the default everywhere) the first malformed unit stops the run with its
    FILE:LINE message; with strict=False the unit is reported as skipped and reading goes on.
    A unit is all or nothing: a file of many images (Stanford Drone) with one bad line yields none.
    """
    for unit in units:
        try:
            records = list(parse(unit))
        except AnnotationError as e:
            if strict:
                raise
            records = [Skipped(name(unit), INVALID, str(e))]
        yield from records
