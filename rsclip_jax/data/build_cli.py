"""`rsclip data build`: the command line of `rsclip_jax.data.build`."""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image

from rsclip_jax.data.build import BuildConfig, build
from rsclip_jax.data.build_merge import merge
from rsclip_jax.data.tasks import add_task_args, resolve_run


def register(data_sub: argparse._SubParsersAction) -> None:
    """Adds the `build` subcommand to the `rsclip data` subparsers."""
    p = data_sub.add_parser(
        "build",
        help="caption CSVs -> ArrayRecord training shards + manifest.json",
        description="Build ArrayRecord shards (one record per image, with all its captions) from OpenCLIP-style "
        "caption CSVs. Every input image is either written or listed under 'skipped' in DIR/manifest.json "
        "with its reason. Rerunning with the same options resumes: finished shards are kept. Split over hosts: "
        "run every --task-index of --task-count N (same options, same --out), then once more with --merge.",
    )
    p.add_argument("--csv", action="append", required=True, metavar="CSV",
                   help="caption CSV with header filepath,title (one row per caption; relative paths are relative "
                   "to the CSV's folder); repeat for several sources")
    p.add_argument("--images-root", action="append", default=[], metavar="DIR",
                   help="folder that relative CSV paths point into, e.g. the --images of `rsclip data caption`; "
                   "once for all, or once per --csv (default: each CSV's folder)")
    p.add_argument("--source", action="append", default=[], metavar="NAME",
                   help="source name for the matching --csv (default: the CSV's file stem)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    p.add_argument("--dedup", action="store_true", help="drop near-duplicate images (pHash) after the first one")
    p.add_argument("--dedup-scope", choices=("across", "all"), default="across",
                   help="'across': only duplicates from different sources (default); 'all': also within a source")
    p.add_argument("--phash-threshold", type=int, default=4, metavar="BITS",
                   help="max Hamming distance of 64-bit pHashes that counts as a near-duplicate (default 4)")
    p.add_argument("--exclude", action="append", default=[], metavar="KARPATHY_JSON",
                   help="drop images that near-duplicate any test image of this Karpathy dataset_*.json")
    p.add_argument("--exclude-images", action="append", default=[], metavar="DIR",
                   help="folder holding the --exclude images (entry 'filepath'/'filename' is resolved in it); "
                   "once for all, or once per --exclude (default: each JSON's folder)")
    p.add_argument("--exclude-split", action="append", default=[], metavar="SPLIT",
                   help="splits of the --exclude JSONs to guard against (default: test)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes for decoding, hashing and writing (default: all cores; 0 or 1: in-process)")
    p.add_argument("--records-per-shard", type=int, default=1024)
    p.add_argument("--max-skipped-fraction", type=float, default=0.5,
                   help="exit non-zero if more than this share of inputs is unusable (dedup/leakage removals "
                   "do not count; default 0.5)")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="store images whose shorter side exceeds S downscaled to S (re-encoded); default: keep "
                   "the original bytes of RGB JPEG/PNG files")
    p.add_argument("--reencode-format", choices=("JPEG", "PNG"), default="JPEG",
                   help="format for images that must be re-encoded (non-RGB, TIFF, resized; default JPEG)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--max-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
                   help=f"refuse images with more pixels as decompression bombs (default {Image.MAX_IMAGE_PIXELS})")
    p.add_argument("--csv-separator", default=None, metavar="SEP",
                   help="CSV field separator: one character, 'tab' (or \\t, as typed in a shell) or 'comma' "
                   "(default: comma or tab, detected from each CSV's header; OpenCLIP's own is tab)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (default filepath)")
    p.add_argument("--csv-caption-key", default="title", help="CSV column of captions (default title)")
    p.add_argument("--allow-empty", action="store_true",
                   help="finish with an empty build when every image is skipped or removed (by default that is an "
                   "error naming the reasons, and nothing is written)")
    add_task_args(p, "check their parts and write the one manifest.json (give the same options as the tasks, "
                  "and no --task-index)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs the build (or one task's share, or the merge); 0 when it finished, 1 when too many inputs
    were unusable."""
    task_index, task_count = resolve_run(args.task_index, args.task_count, args.merge)
    config = BuildConfig(
        csvs=tuple(args.csv), out_dir=args.out, sources=tuple(args.source), images_roots=tuple(args.images_root),
        dedup=args.dedup,
        dedup_scope=args.dedup_scope, phash_threshold=args.phash_threshold, exclude=tuple(args.exclude),
        exclude_images=tuple(args.exclude_images), exclude_splits=tuple(args.exclude_split or ("test",)),
        workers=args.workers, records_per_shard=args.records_per_shard,
        max_skipped_fraction=args.max_skipped_fraction, image_size=args.image_size,
        reencode_format=args.reencode_format, jpeg_quality=args.jpeg_quality, max_pixels=args.max_pixels,
        csv_separator=args.csv_separator, image_column=args.csv_img_key, caption_column=args.csv_caption_key,
        allow_empty=args.allow_empty, task_index=task_index, task_count=task_count,
    )
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    report = merge(config, log) if args.merge else build(config, log)
    m = report.manifest
    what = (f"task {task_index} of {task_count}: " if task_count > 1 and not args.merge else "")
    inputs = m.get("share_inputs", m["inputs"])
    print(f"{what}wrote {m['written']} of {inputs} images to {len(m['shards'])} shard(s) in {args.out}; "
          f"skipped {m['skipped_count']} (see {report.manifest_path})")
    for reason, n in sorted(m["skip_reasons"].items()):
        print(f"  {n:6d}  {reason}")
    for key in ("exclude", "dedup"):
        if key in m:
            print(f"{key}: removed {m[key]['removed']} image(s)")
    if what and config.dedup:
        print("dedup: near-duplicates across all tasks are removed by the --merge run")
    if what:
        print(f"when all {task_count} tasks have finished: the same command with --merge (and no --task-index)")
    if not report.ok:
        print(f"rsclip data build: error: {report.failed_fraction:.1%} of the inputs could not be used, more than "
              f"--max-skipped-fraction {config.max_skipped_fraction:.1%}", file=sys.stderr)
        return 1
    return 0
