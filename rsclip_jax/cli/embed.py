"""`rsclip embed` and `rsclip classify`."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

import numpy as np

from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.common import (
    add_model_args,
    add_raster_args,
    check_output_path,
    load_model_from_args,
    positive_int,
    read_text_lines,
)
from rsclip_jax.data.tasks import add_task_args, resolve_run
from rsclip_jax.evaluate import embed_tasks
from rsclip_jax.evaluate.embeddings import Extractor, FileReader, ImageReader, RasterFileReader
from rsclip_jax.fileio import atomic_write_json, atomic_write_npz
from rsclip_jax.preprocess import expand_image_paths
from rsclip_jax.raster import parse_bands, parse_scale

DEFAULT_TEMPLATES = "remote_sensing.txt"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help=COMMAND_HELP["embed"])
    add_model_args(p)
    p.add_argument("--images", nargs="+", default=[], help="image files or directories (expanded to their images, sorted)")
    p.add_argument("--texts", default=None, help="UTF-8 text file, one caption per line")
    p.add_argument("--out", required=True,
                   help="output .npz file ('.npz' is appended when the name lacks it; missing folders are created)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")
    add_raster_args(p)
    add_task_args(p, "join their part files (OUT.task-I-of-N.npz) into --out, as one run writes it (give the "
                  "same --images/--texts/--out, no --task-index; no model is loaded)")
    p.set_defaults(func=run_embed)

    p = sub.add_parser("classify", help=COMMAND_HELP["classify"])
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "airport,forest,river"')
    p.add_argument("--templates", default=None, help=f"text file of prompt templates with {{}} (default: bundled {DEFAULT_TEMPLATES})")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", default=None,
                   help="also write the results to this JSON file (missing folders are created)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")
    add_raster_args(p)
    p.set_defaults(func=run_classify)


def image_inputs(args: argparse.Namespace) -> tuple[list[str], ImageReader]:
    """The image items of `args.images` and the reader for them.

    Without --bands/--scale/--gamma: files as given and folders expanded to their images, read as
    `FileReader` reads them. With them: rasters read through `rsclip_jax.raster` with that choice;
    with band *names* (`--bands B04,B03,B02`) a folder or STAC item JSON is one scene, not a list.
    """
    bands, scale = parse_bands(args.bands), parse_scale(args.scale)
    if bands is None and scale is None and args.gamma == 1.0:
        return expand_image_paths(args.images), FileReader()
    reader = RasterFileReader(bands, scale, args.gamma)
    if bands and isinstance(bands[0], str):
        return [os.fspath(p) for p in args.images], reader
    return expand_image_paths(args.images), reader


def npz_path(out: str) -> str:
    """The file `--out` names: `out` itself when it ends in .npz (any case), else `out` + '.npz'."""
    return out if out.lower().endswith(".npz") else out + ".npz"


def run_embed(args: argparse.Namespace) -> int:
    if not args.images and not args.texts:
        raise ValueError("give --images, --texts or both")
    out_path = check_output_path(npz_path(args.out), "--out")
    task_index, task_count = resolve_run(args.task_index, args.task_count, args.merge)
    paths, reader = image_inputs(args) if args.images else ([], FileReader())
    texts = read_text_lines(args.texts) if args.texts else []
    digest = embed_tasks.inputs_digest(paths, texts, [args.bands, args.scale, args.gamma])
    if args.merge:
        out = embed_tasks.merge_parts(out_path, task_count, digest, (len(paths), len(texts)))
        atomic_write_npz(out_path, out)
        print(f"wrote {out_path}: {len(out.get('image_paths', []))} images, {len(out.get('texts', []))} texts "
              f"from {task_count} tasks", file=sys.stderr)
        return 0
    image_share, text_share = embed_tasks.shares(len(paths), len(texts), task_index, task_count)
    model, tokenizer = load_model_from_args(args)
    extractor = Extractor(model, batch_size=args.batch_size, tokenizer=tokenizer)
    out: dict[str, np.ndarray] = {}
    if args.images:
        share = paths[image_share.start : image_share.stop]
        images = extractor.images(share, skip_missing=args.skip_bad, reader=reader)
        kept = [share[i] for i in images.kept]
        out.update(image_embeddings=images.embeddings, image_paths=np.array(kept, dtype=str),
                   skipped_images=np.array(images.skipped, dtype=str))
        if task_count > 1:  # where each row goes in the merged file
            dropped = np.setdiff1d(np.arange(len(share)), images.kept)
            out.update(image_positions=image_share.start + np.asarray(images.kept, np.int64),
                       skipped_positions=image_share.start + dropped.astype(np.int64))
        print(f"embedded {len(kept)} images" + (f", skipped {len(images.skipped)}" if images.skipped else ""),
              file=sys.stderr)
    if args.texts:
        share = texts[text_share.start : text_share.stop]
        out.update(text_embeddings=extractor.texts(share), texts=np.array(share, dtype=str))
        if task_count > 1:
            out.update(text_positions=np.arange(text_share.start, text_share.stop, dtype=np.int64))
        print(f"embedded {len(share)} texts", file=sys.stderr)
    if task_count > 1:
        part = embed_tasks.write_part(out_path, task_index, task_count, digest, extractor.fingerprint,
                                      (len(paths), len(texts)), out)
        print(f"task {task_index} of {task_count}: wrote {part}; when all tasks have finished, run the same "
              "command with --merge (and no --task-index)", file=sys.stderr)
        return 0
    atomic_write_npz(out_path, out)
    print(f"wrote {out_path}", file=sys.stderr)
    return 0


def load_templates(path: str | None) -> list[str]:
    """Prompt templates from a file (or the bundled default); each must contain `{}`."""
    if path is None:
        text = (resources.files("rsclip_jax") / "resources" / "templates" / DEFAULT_TEMPLATES).read_text("utf-8")
        lines, path = [line.strip() for line in text.splitlines() if line.strip()], DEFAULT_TEMPLATES
    else:
        lines = read_text_lines(path)
    templates = [t for t in lines if not t.startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs a {{}} placeholder for the class name; bad: {bad or 'none given'}")
    return templates


def parse_labels(text: str) -> list[str]:
    """The class names of `--labels "a,b,c"`, stripped.

    Raises:
        ValueError: naming --labels, for an empty name ("a,,b", a trailing comma), a name given
            twice (compared as the tokenizer sees them: ignoring case and repeated spaces), or
            fewer than two names.
    """
    labels = [" ".join(s.split()) for s in text.split(",")]
    empty = [i for i, label in enumerate(labels, start=1) if not label]
    if empty:
        raise ValueError(f"--labels {text!r}: class name {empty[0]} of {len(labels)} is empty; "
                         "give comma-separated names without empty entries")
    first: dict[str, str] = {}
    for label in labels:
        if label.lower() in first:
            raise ValueError(f"--labels {text!r}: {label!r} is given twice (as {first[label.lower()]!r}); "
                             "give each class once")
        first[label.lower()] = label
    if len(labels) < 2:
        raise ValueError(f"--labels needs at least two comma-separated class names, got {text!r}")
    return labels


def run_classify(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels)
    if args.json:
        check_output_path(args.json, "--json")
    templates = load_templates(args.templates)
    paths, reader = image_inputs(args)
    model, tokenizer = load_model_from_args(args)
    extractor = Extractor(model, batch_size=args.batch_size, tokenizer=tokenizer)
    classes = extractor.classifier(labels, templates)
    images = extractor.images(paths, skip_missing=args.skip_bad, reader=reader)
    kept = [paths[i] for i in images.kept]
    logits = extractor.logit_scale * images.embeddings @ classes.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(args.top_k, len(labels))
    results = []
    for path, p in zip(kept, probs):
        top = np.argsort(-p, kind="stable")[:k]
        results.append({"image": path, "top": [{"label": labels[i], "prob": float(p[i])} for i in top]})
        print(path)
        for i in top:
            print(f"  {p[i]:6.3f}  {labels[i]}")
    if args.json:
        report = {"labels": labels, "templates": templates, "results": results}
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
