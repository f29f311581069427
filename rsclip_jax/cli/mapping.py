"""`rsclip map`: a zero-shot land-cover / land-use map of a whole scene from text labels."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from rsclip_jax.argtypes import fraction
from rsclip_jax.apps.map_accuracy import format_accuracy, map_accuracy, parse_truth_classes
from rsclip_jax.apps.mapping import DEFAULT_MIN_VALID, PROBS_DTYPES, map_scene
from rsclip_jax.apps.mapping_outputs import vector_driver
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.common import (
    add_model_args,
    add_raster_args,
    check_output_path,
    load_model_from_args,
    positive_int,
    read_text_lines,
)
from rsclip_jax.cli.embed import DEFAULT_TEMPLATES, load_templates, parse_labels
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.fileio import atomic_write_json
from rsclip_jax.raster import open_scene, parse_bands, parse_scale

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("map", help=COMMAND_HELP["map"])
    add_model_args(p)
    p.add_argument("scene", help="a GeoTIFF/COG/JP2 file, a folder of band files, or a local STAC item .json")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated class names, e.g. "forest,farmland,river,residential"')
    labels.add_argument("--labels-file", help="UTF-8 text file, one class name per line (names may contain commas)")
    p.add_argument("--out", required=True, help="class-map GeoTIFF to write (class k of the list is value k+1)")
    p.add_argument("--tile", type=positive_int, default=224, help="tile side in pixels (default 224)")
    p.add_argument("--stride", type=int, default=112, help="pixels between tiles (default 112: half-overlapping)")
    p.add_argument("--gsd-resample", type=float, default=None, metavar="M",
                   help="map at M metres per pixel: a tile covers TILE x M metres (outputs stay on the scene's grid)")
    p.add_argument("--templates", default=None,
                   help=f"text file of prompt templates with {{}} (default: bundled {DEFAULT_TEMPLATES})")
    p.add_argument("--probs", default=None, help="also write per-class probabilities as a COG, one band per class")
    p.add_argument("--probs-dtype", default="uint8", choices=PROBS_DTYPES,
                   help="uint8: percent 0-100, nodata 255 (default); float32: 0-1, nodata NaN")
    p.add_argument("--vector", default=None, help="also write polygons of the class regions (.geojson or .gpkg)")
    p.add_argument("--preview", default=None, help="also write a quick-look PNG with a legend")
    p.add_argument("--min-valid", type=fraction, default=DEFAULT_MIN_VALID,
                   help=f"skip tiles with less than this fraction of valid pixels (default {DEFAULT_MIN_VALID})")
    p.add_argument("--truth", default=None,
                   help="score the map against reference polygons (GeoPackage/GeoJSON/Shapefile): pixel accuracy "
                        "over the labelled area against the majority class")
    p.add_argument("--truth-field", default="class", help="the polygons' class attribute (default: class)")
    p.add_argument("--truth-classes", default=None, metavar="VALUE=LABEL,...",
                   help="reference values to labels, e.g. farm=farmland,forest=forest (default: the same names)")
    p.add_argument("--report", default=None, help="also write the run's report (counts, classes, accuracy) as JSON")
    add_raster_args(p)
    p.set_defaults(func=run_map)


def read_labels(args: argparse.Namespace) -> list[str]:
    """The class names of --labels or --labels-file (one per line; duplicates and fewer than 2 refused)."""
    if args.labels is not None:
        return parse_labels(args.labels)
    names = [line for line in read_text_lines(args.labels_file) if not line.startswith("#")]
    if len(names) < 2:
        raise ValueError(f"--labels-file {args.labels_file}: needs at least two class names, one per line; "
                         f"found {len(names)}")
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name.lower() in seen:
            raise ValueError(f"--labels-file {args.labels_file}: {name!r} is given twice (entries {seen[name.lower()]} "
                             f"and {i}); give each class once")
        seen[name.lower()] = i
    return names


def run_map(args: argparse.Namespace) -> int:
    labels = read_labels(args)
    truth_classes = parse_truth_classes(args.truth_classes)
    if args.truth and not os.path.isfile(args.truth):
        raise ValueError(f"--truth {args.truth}: no such file")
    for flag in ("out", "probs", "preview", "vector", "report"):
        if getattr(args, flag):
            check_output_path(getattr(args, flag), f"--{flag}")
    if args.vector:
        vector_driver(args.vector)
    templates = load_templates(args.templates)
    with open_scene(args.scene, parse_bands(args.bands), parse_scale(args.scale), args.gamma) as scene:
        print(scene.describe(), file=sys.stderr)
        model, tokenizer = load_model_from_args(args)
        extractor = Extractor(model, batch_size=args.batch_size, tokenizer=tokenizer, progress=False)
        classes = extractor.classifier(labels, templates)
        report = map_scene(scene, extractor, classes, labels, args.out, tile=args.tile, stride=args.stride,
                           gsd_resample=args.gsd_resample, min_valid=args.min_valid, probs=args.probs,
                           probs_dtype=args.probs_dtype, vector=args.vector, preview=args.preview)
    print(report.summary(), file=sys.stderr)
    result = dataclasses.asdict(report)
    if args.truth:
        result["accuracy"] = map_accuracy(args.out, args.truth, args.truth_field, labels, truth_classes)
        print(format_accuracy(result["accuracy"]))
    if args.report:
        atomic_write_json(args.report, {"labels": labels, "templates": templates, **result})
        report.outputs.append(args.report)
    for path in report.outputs:
        print(f"wrote {path}", file=sys.stderr)
    return 0
