"""`rsclip index build|add|info` and `rsclip search`: a text-and-image search index over an archive.

    rsclip index build --checkpoint RemoteCLIP-ViT-B-32.pt --out archive.index tiles/ scene.tif
    rsclip index add archive.index new_tiles/
    rsclip search archive.index --text "ships in a harbour" --k 20 --out hits.geojson --contact-sheet hits.jpg

See docs/applications.md ("Searching an archive") and rsclip_jax/apps/index_store.py for the layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from rsclip_jax.apps.index import DEFAULT_SHARD_SIZE, KINDS, Options, add_to_index, build_index
from rsclip_jax.apps.index_merge import merge_indexes
from rsclip_jax.apps.index_store import read_manifest, unlisted_shards
from rsclip_jax.apps.index_vectors import EXACT_MAX_ROWS
from rsclip_jax.apps.search import Searcher, hits_to_csv, hits_to_geojson, write_contact_sheet
from rsclip_jax.argtypes import fraction
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.common import (
    CHECKPOINT_HELP,
    MODEL_HELP,
    add_checkpoint_choice_args,
    add_raster_args,
    check_output_path,
    positive_int,
)
from rsclip_jax.fileio import atomic_write_json, atomic_write_text
from rsclip_jax.raster import parse_bands, parse_scale


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    default = "" if required else "; default: the checkpoint the index was built with"
    p.add_argument("--checkpoint", required=required, default=None, help=CHECKPOINT_HELP + default)
    if required:  # build: which checkpoint of a workdir (add and search use the recorded one)
        add_checkpoint_choice_args(p)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default=None if not required else "float32", choices=["float32", "bfloat16"],
                   help="compute dtype" + ("" if required else " (default: the index's)"))
    p.add_argument("--batch-size", type=positive_int, default=64)


def _input_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    p.add_argument("inputs", nargs="+", metavar="DIR|FILE|SCENE",
                   help="image files, rasters (GeoTIFF/COG/JP2, STAC item .json) and folders (walked recursively)")
    p.add_argument("--tile", type=positive_int, default=224 if defaults else None,
                   help="tile side in scene pixels" + (" (default 224)" if defaults else " (default: the index's)"))
    p.add_argument("--stride", type=positive_int, default=None,
                   help="pixels between tiles (default: the tile, no overlap)")
    p.add_argument("--min-valid", type=fraction, default=0.5 if defaults else None,
                   help="skip (and count) scene tiles with a smaller share of valid pixels (default 0.5)")
    p.add_argument("--whole-rasters", action="store_true",
                   help="index each raster whole (an archive of chips) instead of tiling it")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images instead of failing")
    p.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"rows per shard (default {DEFAULT_SHARD_SIZE:,})")
    p.add_argument("--report", default=None, help="also write what was done to this JSON file")
    add_raster_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help=COMMAND_HELP["index"])
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = isub.add_parser("build", help="embed images and scene tiles into a new index folder")
    _model_args(b, required=True)
    b.add_argument("--out", required=True, help="the new index folder")
    b.add_argument("--kind", choices=KINDS, default="auto",
                   help=f"exact search, approximate (IVF, nprobe calibrated to recall@10 >= 0.97, reported), or auto: "
                        f"exact up to {EXACT_MAX_ROWS:,} rows per shard (default auto)")
    _input_args(b, defaults=True)
    b.set_defaults(func=run_build)

    a = isub.add_parser("add", help="add files not yet indexed (same model); already indexed ones are skipped")
    a.add_argument("index", help="the index folder")
    _model_args(a, required=False)
    _input_args(a, defaults=False)
    a.set_defaults(func=run_add)

    g = isub.add_parser("merge", help="one index from several built with the same model (e.g. by separate jobs)")
    g.add_argument("sources", nargs="+", metavar="INDEX", help="the indexes to merge, in id order")
    g.add_argument("--out", required=True, help="the new merged index folder")
    g.set_defaults(func=run_merge)

    i = isub.add_parser("info", help="what an index holds")
    i.add_argument("index", help="the index folder")
    i.set_defaults(func=run_info)

    s = sub.add_parser("search", help=COMMAND_HELP["search"],
                       description="Prints the ranked hits (rank, score, path, window); writes them as GeoJSON/CSV.")
    s.add_argument("index", help="the index folder (rsclip index build --out)")
    s.add_argument("--text", default=None, help='what to find, e.g. "ships in a harbour"')
    s.add_argument("--image", default=None, help="an example image file (combined with --text when both are given)")
    s.add_argument("--similar-to", type=int, default=None, metavar="ID", help="an indexed item's id: more like it")
    s.add_argument("--negative-text", action="append", default=[], metavar="TEXT",
                   help="push results away from this (repeatable); score = sim(query) - w * mean sim(negatives)")
    s.add_argument("--negative-image", action="append", default=[], metavar="FILE", help="same, with an image")
    s.add_argument("--negative-weight", type=float, default=1.0, help="w above (default 1)")
    s.add_argument("--k", type=positive_int, default=50, help="number of hits (default 50)")
    s.add_argument("--out", default=None, help="write the hits: .geojson (lon/lat footprints) or .csv")
    s.add_argument("--contact-sheet", default=None, help="write a grid of the hits with rank and score (.jpg/.png)")
    s.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP + "; default: the one the index was built with")
    s.add_argument("--model", default=None, help=MODEL_HELP)
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: the index's)")
    s.add_argument("--batch-size", type=positive_int, default=64)
    s.set_defaults(func=run_search)


def _options(args: argparse.Namespace, base: Options) -> Options:
    """The tiling and stretch options: those given on the command line over `base`."""
    given = {"tile": args.tile, "stride": args.stride, "bands": parse_bands(args.bands),
             "scale": parse_scale(args.scale), "min_valid": args.min_valid}
    opts = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    if args.tile is not None and args.stride is None:
        opts = dataclasses.replace(opts, stride=None)  # a new tile without a stride: no overlap, as in build
    if args.gamma != 1.0:
        opts = dataclasses.replace(opts, gamma=args.gamma)
    if args.whole_rasters:
        opts = dataclasses.replace(opts, whole_rasters=True)
    return opts


def _finish(report, path: str | None) -> int:
    for line in report.lines():
        print(line, file=sys.stderr)
    if path:
        atomic_write_json(path, dataclasses.asdict(report))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def run_build(args: argparse.Namespace) -> int:
    if args.report:
        check_output_path(args.report, "--report")
    report = build_index(args.out, args.inputs, args.checkpoint, model=args.model, dtype=args.dtype,
                         batch_size=args.batch_size, kind=args.kind, options=_options(args, Options()),
                         skip_bad=args.skip_bad, shard_size=args.shard_size, step=args.step, best=args.best)
    return _finish(report, args.report)


def run_add(args: argparse.Namespace) -> int:
    if args.report:
        check_output_path(args.report, "--report")
    manifest = read_manifest(args.index)
    base = Options.from_settings(manifest["shards"][-1].get("settings") or manifest.get("settings") or {})
    report = add_to_index(args.index, args.inputs, checkpoint=args.checkpoint, model=args.model, dtype=args.dtype,
                          batch_size=args.batch_size, options=_options(args, base), skip_bad=args.skip_bad,
                          shard_size=args.shard_size)
    return _finish(report, args.report)


def run_merge(args: argparse.Namespace) -> int:
    m = merge_indexes(args.out, args.sources)
    print(f"{os.path.abspath(args.out)}: {m['count']} items in {len(m['shards'])} shard(s) from "
          f"{len(args.sources)} indexes", file=sys.stderr)
    return 0


def run_info(args: argparse.Namespace) -> int:
    m = read_manifest(args.index)
    print(f"{os.path.abspath(args.index)}: {m['count']} items, {len(m['shards'])} shard(s), model {m['model']} "
          f"from {m['checkpoint']} ({m.get('dtype')}, fingerprint {m['fingerprint'][:12]}), {m['embed_dim']}-d, "
          f"kind {m['kind']}, root {m.get('root')}")
    for s in m["shards"]:
        how = (f"approx nprobe {s['nprobe']}/{s['nlist']}, recall@10 {s['recall_at_10']}" if s["kind"] == "approx"
               else "exact")
        print(f"  {s['name']}: ids {s['first_id']}..{s['first_id'] + s['count'] - 1}, {s['files']} files, {how}")
    orphans = unlisted_shards(args.index, m)
    if orphans:
        print(f"  not in the manifest (interrupted build/add; safe to delete): {', '.join(orphans)}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    if args.text is None and args.image is None and args.similar_to is None:
        raise ValueError("give --text \"...\" or --image FILE (or --similar-to ID)")
    if args.out:
        check_output_path(args.out, "--out")
        if not args.out.lower().endswith((".geojson", ".json", ".csv")):
            raise ValueError(f"--out {args.out}: give a .geojson or .csv file name")
    if args.contact_sheet:
        check_output_path(args.contact_sheet, "--contact-sheet")
        if not args.contact_sheet.lower().endswith((".jpg", ".jpeg", ".png")):
            raise ValueError(f"--contact-sheet {args.contact_sheet}: give a .jpg or .png file name")
    for f in ([args.image] if args.image else []) + args.negative_image:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: no such image file")
    dtype = args.dtype or read_manifest(args.index).get("dtype", "float32")
    searcher = Searcher(args.index, checkpoint=args.checkpoint, model=args.model, dtype=dtype,
                        batch_size=args.batch_size)
    hits = searcher.search(text=args.text, image=args.image, negative_texts=args.negative_text,
                           negative_images=args.negative_image, similar_to=args.similar_to, k=args.k,
                           negative_weight=args.negative_weight)
    for h in hits:
        window = "" if h.window is None else "  [" + ",".join(map(str, h.window)) + "]"
        print(f"{h.rank:4d}  {h.score:.4f}  {h.path}{window}")
    if args.out:
        if args.out.lower().endswith(".csv"):
            atomic_write_text(args.out, hits_to_csv(hits))
        else:
            atomic_write_text(args.out, json.dumps(hits_to_geojson(hits), indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.contact_sheet and hits:
        write_contact_sheet(searcher, hits, args.contact_sheet)
        print(f"wrote {args.contact_sheet}", file=sys.stderr)
    return 0
