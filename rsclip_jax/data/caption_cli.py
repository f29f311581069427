"""`rsclip data caption`: caption a dataset's annotations into an OpenCLIP-style CSV.

    rsclip data caption --format dota --images DOTA/images --annotations DOTA/labelTxt --out dota.csv

Box formats go through B2C, mask formats through M2B then B2C, caption formats (karpathy,
csv) pass through. The CSV has the header `filepath,title` and one row per caption; paths are
relative to --images unless --absolute-paths. Every image is accounted for: the summary on
stderr gives images read = captioned + skipped, the skips grouped by reason, the boxes left out
by reason, and the image files under --images that no annotation names.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from rsclip_jax.data.annotations import CaptionedImage, ImageAnnotation, Record, Skipped, normalize_label, relabel
from rsclip_jax.data.b2c import DEFAULT_CONFIG, B2CConfig, box_to_caption
from rsclip_jax.data.m2b import DEFAULT_MIN_AREA
from rsclip_jax.data.readers import READERS, read_annotations
from rsclip_jax.preprocess import IMAGE_EXTENSIONS

DEFAULT_CLASS_MAPS: dict[str, dict[str, str | None]] = {
    # classes that are not objects to caption; override one by mapping it to a name in --class-map
    "visdrone": {"others": None},
    "loveda": {"background": None},
    "isprs": {"clutter": None},
}
NO_OBJECTS = "no objects"
NO_CAPTIONS = "no captions"
NOT_FOUND = "image file not found"
AMBIGUOUS = "ambiguous image name"
DUPLICATE = "duplicate image"
UNREADABLE = "unreadable image"
SIZE_MISMATCH = "image size differs from annotation"


class ImageIndex:
    """The image files under a folder, to turn the names annotations use into real paths.

    A name resolves, in order, to: the file at that relative path (or an existing absolute
    path); the one file with that relative path and another image extension (a DOTA label
    names `P0001.png`, the copy at hand is `P0001.jpg`); the one file anywhere under the folder
    with that file stem. Several candidates make the name ambiguous, never a guess.
    """

    def __init__(self, root: Path):
        self.root = root
        self.files: set[str] = set()
        self._by_path_stem: dict[str, list[str]] = {}
        self._by_stem: dict[str, list[str]] = {}
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                    rel = Path(dirpath, filename).relative_to(root).as_posix()
                    self.files.add(rel)
                    self._by_path_stem.setdefault(os.path.splitext(rel)[0], []).append(rel)
                    self._by_stem.setdefault(os.path.splitext(filename)[0], []).append(rel)

    def resolve(self, name: str) -> tuple[str | None, str]:
        """(path, "") where path is relative to the root (or absolute as given), else (None, skip reason)."""
        if os.path.isabs(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(name):
            return name, ""
        rel = Path(name).as_posix().removeprefix("./")
        if rel in self.files:
            return rel, ""
        for candidates in (self._by_path_stem.get(os.path.splitext(rel)[0], []), self._by_stem.get(Path(rel).stem, [])):
            if len(candidates) == 1:
                return candidates[0], ""
            if len(candidates) > 1:
                return None, AMBIGUOUS
        return None, NOT_FOUND


@dataclass
class CaptionSummary:
    """What a captioning run did with every record: images read = captioned + skipped."""

    read: int = 0
    captioned: int = 0
    captions: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_examples: dict[str, str] = field(default_factory=dict)
    ignored: Counter = field(default_factory=Counter)
    unreferenced: list[str] = field(default_factory=list)
    classes: Counter = field(default_factory=Counter)  # boxes per class (`normalize_label`), before relabelling

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        self.read += 1
        self.skipped[reason] += 1
        self.skip_examples.setdefault(reason, f"{item}: {detail}" if detail else item)

    def lines(self) -> list[str]:
        skipped = sum(self.skipped.values())
        out = [f"read {self.read} images: captioned {self.captioned} ({self.captions} captions), skipped {skipped}"]
        for reason, count in self.skipped.most_common():
            out.append(f"  skipped {count}: {reason} (e.g. {self.skip_examples[reason]})")
        for reason, count in self.ignored.most_common():
            out.append(f"  left out of the captions: {count} x {reason}")
        if self.unreferenced:
            example = self.unreferenced[0]
            out.append(
                f"  {len(self.unreferenced)} image files under --images are named by no annotation (e.g. {example})"
            )
        return out


def write_captions(
    records: Iterable[Record],
    images_dir: str | Path,
    out_csv: str | Path,
    *,
    num_captions: int = 5,
    seed: int = 0,
    config: B2CConfig = DEFAULT_CONFIG,
    class_map: Mapping[str, str | None] | None = None,
    absolute_paths: bool = False,
    skipped_csv: str | Path | None = None,
) -> CaptionSummary:
    """Captions `records` (from a reader) into `out_csv` (`filepath,title`), atomically.

    Box annotations are relabelled by `class_map` and captioned by B2C; their image size, when
    the annotation lacks it, is read from the image header. `skipped_csv`, if given, receives
    one row `item,reason,detail` per skipped image.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such images folder")
    index = ImageIndex(images_dir)
    summary = CaptionSummary()
    referenced: set[str] = set()
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(out_csv.name + ".partial")
    skipped_file = open(skipped_csv, "w", newline="", encoding="utf-8") if skipped_csv else None
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "title"])
            skipped_writer = csv.writer(skipped_file) if skipped_file else None
            if skipped_writer:
                skipped_writer.writerow(["item", "reason", "detail"])

            def skip(item: str, reason: str, detail: str = "") -> None:
                summary.skip(item, reason, detail)
                if skipped_writer:
                    skipped_writer.writerow([item, reason, detail])

            for record in records:
                if isinstance(record, Skipped):
                    referenced.add(index.resolve(record.item)[0] or "")
                    skip(record.item, record.reason, record.detail)
                    continue
                if isinstance(record, ImageAnnotation):
                    summary.classes.update(normalize_label(box.label) for box in record.boxes)
                    record = relabel(record, class_map or {})
                summary.ignored.update(record.ignored)
                path, problem = index.resolve(record.image)
                if path is None:
                    skip(record.image, problem)
                    continue
                if path in referenced:
                    skip(record.image, DUPLICATE, f"{path} was already captioned or skipped")
                    continue
                referenced.add(path)
                captions, reason, detail = _captions(record, images_dir / path, num_captions, seed, config)
                if not captions:
                    skip(record.image, reason, detail)
                    continue
                filepath = str((images_dir / path).resolve()) if absolute_paths else path
                writer.writerows([filepath, caption] for caption in captions)
                summary.read += 1
                summary.captioned += 1
                summary.captions += len(captions)
        os.replace(tmp, out_csv)
    finally:
        tmp.unlink(missing_ok=True)
        if skipped_file:
            skipped_file.close()
    summary.unreferenced = sorted(index.files - referenced)
    return summary


def _captions(
    record: ImageAnnotation | CaptionedImage,
    image_path: Path,
    num_captions: int,
    seed: int,
    config: B2CConfig,
) -> tuple[list[str], str, str]:
    """(captions, "", "") or ([], skip reason, detail) for one resolved image."""
    try:
        with Image.open(image_path) as img:
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return [], UNREADABLE, str(e)
    if isinstance(record, CaptionedImage):
        return (record.captions, "", "") if record.captions else ([], NO_CAPTIONS, "")
    if record.width and record.height and (record.width, record.height) != (width, height):
        return [], SIZE_MISMATCH, f"annotation {record.width}x{record.height}, image {width}x{height}"
    captions = box_to_caption(
        replace(record, width=width, height=height), num_captions=num_captions, seed=seed, config=config
    )
    return (captions, "", "") if captions else ([], NO_OBJECTS, "")


def register(data_sub: argparse._SubParsersAction) -> None:
    """Adds `caption` to the `rsclip data` subcommands."""
    p = data_sub.add_parser(
        "caption",
        help="caption a detection/segmentation/caption dataset into a filepath,title CSV (B2C, M2B)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--format", required=True, choices=list(READERS), help="annotation format")
    p.add_argument("--images", required=True, help="folder of the images")
    p.add_argument("--annotations", required=True, help="annotation file or folder")
    p.add_argument("--out", required=True, help="output CSV (filepath,title)")
    p.add_argument("--seed", type=int, default=0, help="B2C seed (captions depend on it and the image path only)")
    p.add_argument("--captions-per-image", type=int, default=5, help="B2C/M2B captions per image")
    p.add_argument(
        "--vague-threshold",
        type=int,
        default=B2CConfig.vague_threshold,
        help="counts above this get a vague quantifier",
    )
    p.add_argument(
        "--class-map",
        default=None,
        help='JSON file renaming classes, e.g. {"small-vehicle": "car", "others": null} (null drops)',
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip and report images with malformed annotations instead of stopping",
    )
    p.add_argument("--skipped-out", default=None, help="also write every skipped image with its reason to this CSV")
    p.add_argument(
        "--absolute-paths", action="store_true", help="write absolute image paths instead of paths relative to --images"
    )
    g = p.add_argument_group("format options")
    g.add_argument("--min-area", type=int, default=DEFAULT_MIN_AREA, help="loveda/isprs: smallest region in pixels")
    g.add_argument(
        "--connectivity", type=int, choices=(4, 8), default=8, help="loveda/isprs: pixel connectivity of regions"
    )
    g.add_argument("--image-suffix", default="_RGB", help="isprs: replaces '_label' in a label name to name its image")
    g.add_argument("--split", default="train", help="karpathy: comma-separated splits to keep, or 'all'")
    g.add_argument("--frame-step", type=int, default=1, help="sdd: keep every N-th frame")
    g.add_argument("--csv-img-key", default="filepath", help="csv: image column")
    g.add_argument("--csv-caption-key", default="title", help="csv: caption column")
    p.set_defaults(func=run_caption)


def _reader_options(args: argparse.Namespace) -> dict:
    options: dict = {"strict": not args.skip_invalid}
    if args.format in ("loveda", "isprs"):
        if args.min_area < 1:
            raise ValueError(f"--min-area must be >= 1, got {args.min_area}")
        options.update(min_area=args.min_area, connectivity=args.connectivity)
    if args.format == "isprs":
        options["image_suffix"] = args.image_suffix
    if args.format == "karpathy":
        options["splits"] = tuple(s.strip() for s in args.split.split(",") if s.strip())
    if args.format == "sdd":
        options["frame_step"] = args.frame_step
    if args.format == "csv":
        options.update(image_key=args.csv_img_key, caption_key=args.csv_caption_key)
    return options


def _read_class_map(path: str) -> dict[str, str | None]:
    """The user's --class-map JSON: {class name: new name or null}."""
    with open(path, encoding="utf-8") as f:
        try:
            user = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(user, dict) or not all(isinstance(v, str) or v is None for v in user.values()):
        raise ValueError(
            f'{path}: expected a JSON object of class name -> new name or null, e.g. {{"others": null}}'
        )
    return user


def unmatched_class_map_keys(class_map: Mapping[str, str | None], classes: Iterable[str]) -> list[str]:
    """The keys of `class_map` that match none of `classes` (compared after `normalize_label`)."""
    seen = {normalize_label(c) for c in classes}
    return [key for key in class_map if normalize_label(key) not in seen]


def run_caption(args: argparse.Namespace) -> int:
    """Runs `rsclip data caption`; returns 0, or 1 when no image could be captioned."""
    if args.captions_per_image < 1:
        raise ValueError(f"--captions-per-image must be >= 1, got {args.captions_per_image}")
    config = replace(DEFAULT_CONFIG, vague_threshold=args.vague_threshold)
    user_map = _read_class_map(args.class_map) if args.class_map else {}
    records = read_annotations(args.format, args.annotations, **_reader_options(args))
    summary = write_captions(
        records,
        args.images,
        args.out,
        num_captions=args.captions_per_image,
        seed=args.seed,
        config=config,
        class_map={**DEFAULT_CLASS_MAPS.get(args.format, {}), **user_map},
        absolute_paths=args.absolute_paths,
        skipped_csv=args.skipped_out,
    )
    print(f"caption --format {args.format} {args.annotations}:", file=sys.stderr)
    print("\n".join(summary.lines()), file=sys.stderr)
    unmatched = unmatched_class_map_keys(user_map, summary.classes)
    if unmatched:
        found = ", ".join(sorted(summary.classes)) or "none (this format has no boxes to relabel)"
        print(f"warning: --class-map {args.class_map}: {len(unmatched)} key(s) match no class of the annotations, "
              f"so they changed nothing: {', '.join(map(repr, unmatched))}; classes found: {found}", file=sys.stderr)
    if summary.captioned == 0:
        print(f"error: no image was captioned; {args.out} has only the header", file=sys.stderr)
        return 1
    print(f"wrote {summary.captions} captions to {args.out}", file=sys.stderr)
    return 0
