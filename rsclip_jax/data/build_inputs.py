"""`rsclip data build`, stage 1: the options and the input list.

Reads the caption CSVs (OpenCLIP style `filepath,title`, one row per caption) and groups rows by
filepath: one input image per (source, filepath), numbered by its position among all inputs.
Every task of a split build reads the same CSVs, so all agree on the list and its positions.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

from PIL import Image

from rsclip_jax.data.readers.captions import detect_delimiter, parse_separator

SKIP_NOT_FOUND = "file not found"
SKIP_EMPTY_CAPTION = "empty caption"
# Every skip reason starts with one of these; the manifest's "skip_reasons" counts them.
REASON_KINDS = (SKIP_NOT_FOUND, SKIP_EMPTY_CAPTION, "cannot decode", "decompression bomb", "duplicate of",
                "test-split leakage")
# Removals the user asked for; they do not count towards --max-skipped-fraction.
FILTER_REASON_PREFIXES = ("duplicate of ", "test-split leakage: ")


class BuildError(ValueError):
    """The build cannot run as asked (unreadable CSV, bad options); nothing about one image."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Options of `rsclip data build` (see `rsclip data build --help`)."""

    csvs: tuple[str, ...]
    out_dir: str
    sources: tuple[str, ...] = ()  # one name per CSV; default: each CSV's file stem
    # Where relative CSV paths point: one folder for all CSVs or one per CSV; default: each CSV's
    # folder. `rsclip data caption` writes paths relative to its --images, which goes here.
    images_roots: tuple[str, ...] = ()
    dedup: bool = False
    dedup_scope: str = "across"  # "across": only across sources (the rule); "all": also within one
    phash_threshold: int = 4
    exclude: tuple[str, ...] = ()
    exclude_images: tuple[str, ...] = ()  # none: each JSON's folder; one: for all; else one per --exclude
    exclude_splits: tuple[str, ...] = ("test",)
    workers: int = 1
    records_per_shard: int = 1024
    max_skipped_fraction: float = 0.5
    image_size: int | None = None  # re-encode images whose shorter side exceeds this
    reencode_format: str = "JPEG"
    jpeg_quality: int = 95
    max_pixels: int = Image.MAX_IMAGE_PIXELS  # read here, never changed globally
    csv_separator: str | None = None  # None: comma or tab, found from each CSV's header; also "tab", "\\t"
    image_column: str = "filepath"
    caption_column: str = "title"
    allow_empty: bool = False  # finish (an empty shard) when no image is left to write, instead of an error
    task_index: int = 0  # this task's share of the inputs (rsclip_jax.data.tasks), of task_count
    task_count: int = 1


# Options that change what a build writes: every task of a split build and its merge must agree.
# (workers, the task itself, --max-skipped-fraction and --allow-empty only change how it runs or exits.)
OUTPUT_OPTIONS = ("csvs", "sources", "images_roots", "dedup", "dedup_scope", "phash_threshold", "exclude",
                  "exclude_images", "exclude_splits", "records_per_shard", "image_size", "reencode_format",
                  "jpeg_quality", "max_pixels", "csv_separator", "image_column", "caption_column")


@dataclasses.dataclass(frozen=True)
class InputImage:
    """One image to build: its resolved path, captions and provenance."""

    path: str
    captions: tuple[str, ...]
    source: str
    original_id: str
    position: int = 0  # index among all inputs of the build: the manifest lists skips in this order


def check_config(config: BuildConfig) -> BuildConfig:
    """`config` with its separator parsed; BuildError naming the option for any inconsistent one."""
    if not config.csvs:
        raise BuildError("give at least one --csv")
    if config.sources and len(config.sources) != len(config.csvs):
        raise BuildError(f"give one --source per --csv ({len(config.csvs)}), not {len(config.sources)}")
    if len(config.images_roots) not in (0, 1, len(config.csvs)):
        raise BuildError(f"give --images-root once for all CSVs or once per --csv ({len(config.csvs)}), "
                         f"not {len(config.images_roots)} times")
    if config.dedup_scope not in ("across", "all"):
        raise BuildError(f"dedup scope must be 'across' or 'all', not {config.dedup_scope!r}")
    if config.records_per_shard < 1:
        raise BuildError("--records-per-shard must be >= 1")
    if config.reencode_format not in ("JPEG", "PNG"):
        raise BuildError(f"re-encode format must be JPEG or PNG, not {config.reencode_format!r}")
    if not 0 <= config.task_index < config.task_count:
        raise BuildError(f"--task-index {config.task_index}: must be from 0 to {config.task_count - 1} "
                         f"for --task-count {config.task_count}")
    if config.csv_separator is not None:
        try:
            config = dataclasses.replace(config, csv_separator=parse_separator(config.csv_separator))
        except ValueError as e:
            raise BuildError(str(e)) from None
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise BuildError(f"--out {config.out_dir}: exists and is not a folder")
    return config


def output_options(config: BuildConfig) -> dict:
    """The options that decide the output, as JSON values (what tasks and their merge compare)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items() if k in OUTPUT_OPTIONS}


def inputs_digest(inputs: Sequence[InputImage]) -> str:
    """sha256 of the input list (paths, captions, sources, ids, in order): equal lists, equal digests."""
    rows = [[img.path, list(img.captions), img.source, img.original_id] for img in inputs]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def read_csv_inputs(csv_path: str, source: str, config: BuildConfig,
                    images_root: str | None = None) -> tuple[list[InputImage], int]:
    """Groups a caption CSV's rows by image path; returns (images in first-seen order, row count).

    Relative paths are resolved in `images_root`, by default the CSV's own folder.
    """
    base = os.path.abspath(images_root) if images_root else os.path.dirname(os.path.abspath(csv_path))
    captions: dict[str, list[str]] = {}
    rows = 0
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            delimiter = config.csv_separator
            if delimiter is None:
                header = f.readline().rstrip("\r\n")
                f.seek(0)
                try:
                    delimiter = detect_delimiter(header, config.image_column, config.caption_column, csv_path)
                except ValueError:  # the missing column is named below
                    delimiter = "\t" if "\t" in header else ","
                hint = "name the columns with --csv-img-key/--csv-caption-key"
            else:
                hint = f"split at --csv-separator {delimiter!r}; leave that flag out to detect comma or tab"
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = {config.image_column, config.caption_column} - set(reader.fieldnames or ())
            if missing:
                raise BuildError(f"{csv_path}: no column {', '.join(sorted(missing))} in header {reader.fieldnames} "
                                 f"({hint})")
            for row in reader:
                rows += 1
                image = (row[config.image_column] or "").strip()
                caption = " ".join((row[config.caption_column] or "").split())
                captions.setdefault(image, [])
                if caption:
                    captions[image].append(caption)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BuildError(f"cannot read CSV {csv_path}: {e}") from None
    images = [InputImage(os.path.normpath(os.path.join(base, p)), tuple(c), source, p) for p, c in captions.items()]
    return images, rows


def read_inputs(config: BuildConfig) -> tuple[list[InputImage], list[dict]]:
    """Every input image of the build, numbered in CSV then row order, and one summary per CSV."""
    inputs: list[InputImage] = []
    csv_info = []
    for i, csv_path in enumerate(config.csvs):
        source = config.sources[i] if config.sources else os.path.splitext(os.path.basename(csv_path))[0]
        roots = config.images_roots
        root = roots[i] if len(roots) > 1 else roots[0] if roots else None
        images, rows = read_csv_inputs(csv_path, source, config, root)
        inputs += [dataclasses.replace(img, position=len(inputs) + k) for k, img in enumerate(images)]
        csv_info.append({"path": csv_path, "source": source, "rows": rows, "images": len(images), "images_root": root})
    if not inputs:
        raise BuildError("the CSVs list no images")
    return inputs, csv_info


def read_exclusion_images(config: BuildConfig) -> list[tuple[str, str]]:
    """(path, label) of every image in the excluded splits of the `--exclude` Karpathy JSONs."""
    dirs = list(config.exclude_images)
    if len(dirs) not in (0, 1, len(config.exclude)):
        raise BuildError(f"give one --exclude-images for all --exclude files or one per file, not {len(dirs)}")
    out = []
    for i, json_path in enumerate(config.exclude):
        try:
            with open(json_path, encoding="utf-8") as f:
                entries = json.load(f)["images"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BuildError(f"cannot read Karpathy JSON {json_path}: {e!r}") from None
        root = dirs[i] if len(dirs) > 1 else dirs[0] if dirs else os.path.dirname(os.path.abspath(json_path))
        name = os.path.basename(json_path)
        for entry in entries:
            if entry.get("split") in config.exclude_splits:
                rel = os.path.join(entry.get("filepath", ""), entry["filename"])
                out.append((os.path.normpath(os.path.join(root, rel)), f"{name}:{entry['filename']}"))
    return out


def reason_kind(reason: str) -> str:
    """The REASON_KINDS entry a skip reason starts with (the reason itself if none)."""
    return next((k for k in REASON_KINDS if reason.startswith(k)), reason)
