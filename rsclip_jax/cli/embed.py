"""`rsclip embed` and `rsclip classify`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

import numpy as np

from rsclip_jax.cli.common import add_model_args, load_model_from_args, read_text_lines
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.preprocess import expand_image_paths

DEFAULT_TEMPLATES = "remote_sensing.txt"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed images and/or captions to an .npz file")
    add_model_args(p)
    p.add_argument("--images", nargs="+", default=[], help="image files or directories (expanded to their images, sorted)")
    p.add_argument("--texts", default=None, help="UTF-8 text file, one caption per line")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")
    p.set_defaults(func=run_embed)

    p = sub.add_parser("classify", help="zero-shot classify images with remote-sensing prompt templates")
    add_model_args(p)
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "airport,forest,river"')
    p.add_argument("--templates", default=None, help=f"text file of prompt templates with {{}} (default: bundled {DEFAULT_TEMPLATES})")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")
    p.set_defaults(func=run_classify)


def run_embed(args: argparse.Namespace) -> int:
    if not args.images and not args.texts:
        raise ValueError("give --images, --texts or both")
    paths = expand_image_paths(args.images) if args.images else []
    texts = read_text_lines(args.texts) if args.texts else []
    extractor = Extractor(load_model_from_args(args), batch_size=args.batch_size)
    out: dict[str, np.ndarray] = {}
    if args.images:
        images = extractor.images(paths, skip_missing=args.skip_bad)
        kept = [paths[i] for i in images.kept]
        out.update(image_embeddings=images.embeddings, image_paths=np.array(kept, dtype=str),
                   skipped_images=np.array(images.skipped, dtype=str))
        print(f"embedded {len(kept)} images" + (f", skipped {len(images.skipped)}" if images.skipped else ""),
              file=sys.stderr)
    if args.texts:
        out.update(text_embeddings=extractor.texts(texts), texts=np.array(texts, dtype=str))
        print(f"embedded {len(texts)} texts", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **out)
    print(f"wrote {args.out}", file=sys.stderr)
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


def run_classify(args: argparse.Namespace) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels needs at least two comma-separated class names, got {args.labels!r}")
    templates = load_templates(args.templates)
    paths = expand_image_paths(args.images)
    extractor = Extractor(load_model_from_args(args), batch_size=args.batch_size)
    classes = extractor.classifier(labels, templates)
    images = extractor.images(paths, skip_missing=args.skip_bad)
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
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"labels": labels, "templates": templates, "results": results}, f, indent=2)
    return 0
