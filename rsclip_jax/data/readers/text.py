"""Plain-text box formats: LEVIR, VisDrone-DET, CARPK (one file per image) and Stanford Drone (one per video).

LEVIR (Zou & Shi, 2018), `IMAGE.txt` beside `IMAGE.jpg`, one object per line:
    class x_min y_min x_max y_max          class: 1 airplane, 2 ship, 3 oil tank
VisDrone2019-DET (toolkit readme), `IMAGE.txt`, comma-separated, trailing comma allowed:
    left,top,width,height,score,category,truncation,occlusion
    category: 0 ignored region, 1 pedestrian, 2 people, 3 bicycle, 4 car, 5 van, 6 truck,
    7 tricycle, 8 awning-tricycle, 9 bus, 10 motor, 11 others; score 0 marks a region to ignore.
CARPK / PUCPR+ (Hsieh et al., 2017), `Annotations/IMAGE.txt` for `Images/IMAGE.png`:
    x_min y_min x_max y_max class          class: 1 car
Stanford Drone Dataset (its README, the VATIC layout), `annotations/SCENE/videoN/annotations.txt`:
    track_id x_min y_min x_max y_max frame lost occluded generated "label"
    lost = 1: the object is outside the view. Each frame is one image; see `read_sdd`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from rsclip_jax.data.annotations import AnnotationError, Box, ImageAnnotation, Record, Skipped
from rsclip_jax.data.readers._common import add_box, annotation_files, number, parse_each, read_lines, relative_name

LEVIR_CLASSES = {1: "airplane", 2: "ship", 3: "oil tank"}
VISDRONE_CLASSES = {
    1: "pedestrian", 2: "people", 3: "bicycle", 4: "car", 5: "van", 6: "truck",
    7: "tricycle", 8: "awning-tricycle", 9: "bus", 10: "motor", 11: "others",
}  # fmt: skip
CARPK_CLASSES = {1: "car"}
SDD_FRAME_PATTERN = "{video}/{frame:05d}.jpg"
NOT_SELECTED = "frame not selected (frame_step)"


def _class_id(token: str, classes: Mapping[int, str], where: str) -> str:
    value = number(token, where, "the class id")
    if value not in classes:
        legend = ", ".join(f"{k} {v}" for k, v in classes.items())
        raise AnnotationError(f"{where}: expected a class id in {{{legend}}}, got {token!r}")
    return classes[int(value)]


LineParser = Callable[[str, str, list[Box], Counter], None]
"""Parses one non-empty line (text, FILE:LINE) into the image's boxes and ignored counts."""


def _per_image_reader(
    path: str | Path, strict: bool, image_suffix: str, source: str, parse_line: LineParser
) -> Iterator[Record]:
    root = Path(path)

    def parse(file: Path) -> Iterator[Record]:
        boxes: list[Box] = []
        ignored: Counter = Counter()
        for line_number, line in enumerate(read_lines(file), start=1):
            if line.strip():
                parse_line(line.strip(), f"{file}:{line_number}", boxes, ignored)
        yield ImageAnnotation(relative_name(file, root, image_suffix), None, None, boxes, source, dict(ignored))

    yield from parse_each(annotation_files(root, (".txt",)), parse, strict=strict, name=str)


def read_levir(path: str | Path, *, strict: bool = True, image_suffix: str = ".jpg") -> Iterator[Record]:
    """Reads LEVIR label files (a folder, searched recursively, or one file), one record per image."""

    def parse_line(text: str, where: str, boxes: list[Box], ignored: Counter) -> None:
        fields = text.split()
        if len(fields) != 5:
            raise AnnotationError(
                f"{where}: expected 'class x_min y_min x_max y_max' (5 fields), got {len(fields)}: {text!r}"
            )
        label = _class_id(fields[0], LEVIR_CLASSES, where)
        x0, y0, x1, y1 = (number(t, where, "a box coordinate") for t in fields[1:])
        add_box(boxes, ignored, x0, y0, x1, y1, label, where)

    yield from _per_image_reader(path, strict, image_suffix, "levir", parse_line)


def read_visdrone(path: str | Path, *, strict: bool = True, image_suffix: str = ".jpg") -> Iterator[Record]:
    """Reads VisDrone-DET annotation files, one record per image; ignored regions are counted, not kept."""

    def parse_line(text: str, where: str, boxes: list[Box], ignored: Counter) -> None:
        fields = text.rstrip(",").split(",")
        if len(fields) != 8:
            raise AnnotationError(
                f"{where}: expected 'left,top,width,height,score,category,truncation,occlusion' (8 fields), "
                f"got {len(fields)}: {text!r}"
            )
        left, top, width, height, score = (
            number(t, where, name)
            for t, name in zip(fields[:5], ("left", "top", "width", "height", "score"), strict=True)
        )
        category = number(fields[5], where, "the category")
        if category == 0 or score == 0:
            ignored["ignored region (category 0 or score 0)"] += 1
            return
        label = _class_id(fields[5], VISDRONE_CLASSES, where)
        add_box(boxes, ignored, left, top, left + width, top + height, label, where)

    yield from _per_image_reader(path, strict, image_suffix, "visdrone", parse_line)


def read_carpk(path: str | Path, *, strict: bool = True, image_suffix: str = ".png") -> Iterator[Record]:
    """Reads CARPK (or PUCPR+) annotation files, one record per image."""

    def parse_line(text: str, where: str, boxes: list[Box], ignored: Counter) -> None:
        fields = text.split()
        if len(fields) != 5:
            raise AnnotationError(
                f"{where}: expected 'x_min y_min x_max y_max class' (5 fields), got {len(fields)}: {text!r}"
            )
        x0, y0, x1, y1 = (number(t, where, "a box coordinate") for t in fields[:4])
        add_box(boxes, ignored, x0, y0, x1, y1, _class_id(fields[4], CARPK_CLASSES, where), where)

    yield from _per_image_reader(path, strict, image_suffix, "carpk", parse_line)


def read_sdd(
    path: str | Path, *, strict: bool = True, frame_step: int = 1, frame_pattern: str = SDD_FRAME_PATTERN
) -> Iterator[Record]:
    """Reads Stanford Drone `annotations.txt` files, one record per annotated video frame.

    The dataset ships videos, so frames must be extracted first, e.g. for each video
    `ffmpeg -i videos/SCENE/videoN/video.mov -start_number 0 IMAGES/SCENE/videoN/%05d.jpg`
    (SDD numbers frames from 0). `frame_pattern` names a frame's image from `video` (the
    annotation file's folder relative to `path`, e.g. "bookstore/video0") and `frame`.

    Args:
        path: the `annotations` folder (searched for `annotations.txt`) or one such file.
        strict: raise on the first malformed line (True) or skip that whole video file (False).
        frame_step: keep frames whose number is a multiple of this (consecutive frames are near
            duplicates); the others are reported as skipped "frame not selected (frame_step)".
        frame_pattern: the image path of a frame, a `str.format` pattern.
    """
    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1, got {frame_step}")
    root = Path(path)
    files = [root] if root.is_file() else [f for f in annotation_files(root, (".txt",)) if f.name == "annotations.txt"]
    if not files:
        raise AnnotationError(f"{root}: no annotations.txt files in this folder")

    def parse(file: Path) -> Iterator[Record]:
        video = file.parent.relative_to(root).as_posix() if root.is_dir() else file.parent.name
        frames: dict[int, list[Box]] = defaultdict(list)
        ignored: dict[int, Counter] = defaultdict(Counter)
        for line_number, line in enumerate(read_lines(file), start=1):
            text = line.strip()
            if not text:
                continue
            where = f"{file}:{line_number}"
            fields = text.split()
            if len(fields) < 10 or not (fields[9].startswith('"') and fields[9].endswith('"')):
                expected = "'track_id x_min y_min x_max y_max frame lost occluded generated \"label\"'"
                raise AnnotationError(f"{where}: expected {expected}, got {text!r}")
            x0, y0, x1, y1 = (number(t, where, "a box coordinate") for t in fields[1:5])
            frame = int(number(fields[5], where, "the frame"))
            frames[frame]  # a frame whose boxes are all lost is still an image that was read
            if fields[6] == "1":
                ignored[frame]["outside the view (lost = 1)"] += 1
                continue
            add_box(frames[frame], ignored[frame], x0, y0, x1, y1, fields[9].strip('"'), where)
        for frame in sorted(frames):
            image = frame_pattern.format(video=video, frame=frame)
            if frame % frame_step:
                yield Skipped(image, NOT_SELECTED)
            else:
                yield ImageAnnotation(image, None, None, frames[frame], "sdd", dict(ignored[frame]))

    yield from parse_each(files, parse, strict=strict, name=str)
