"""`rsclip models`, `rsclip init` and `rsclip convert`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rsclip_jax.checkpoint import (
    is_openclip_dir,
    is_transformers_dir,
    load_checkpoint_with_info,
    load_tokenizer,
    save_checkpoint,
    save_openclip_dir,
    save_transformers_dir,
)
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.cli.common import MODEL_HELP, add_checkpoint_choice_args, check_output_path
from rsclip_jax.evaluate.probe import embedding_difference
from rsclip_jax.models import create_model, list_models


TARGETS = ("openclip", "openclip-dir", "hf")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Embeddings of a float32 conversion agree to ~1e-6; more than this means the conversion is wrong.
CHECK_TOLERANCE = 1e-4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help=COMMAND_HELP["models"])
    p.set_defaults(func=run_models)

    p = sub.add_parser("init", help=COMMAND_HELP["init"])
    p.add_argument("--model", required=True, help="architecture name (see `rsclip models`)")
    p.add_argument("--out", required=True, help="output .pt or .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_init)

    p = sub.add_parser("convert", help=COMMAND_HELP["convert"])
    p.add_argument("src", help="input: .pt/.pth/.bin/.safetensors, an OpenCLIP hub folder, a transformers CLIP folder "
                   "or an rsclip training workdir")
    p.add_argument("dst", help="output: .pt (with a .pt.json sidecar) or .safetensors; or a folder with --to")
    p.add_argument("--to", choices=TARGETS, default=None, help="openclip: one state_dict file; openclip-dir: "
                   "open_clip_config.json + open_clip_model.safetensors, for open_clip.create_model_from_pretrained"
                   "('local-dir:DST') and the hub; hf: a transformers CLIPModel/CLIPProcessor folder. Default: "
                   "openclip for a file suffix, or the layout of an existing dst folder")
    p.add_argument("--check", action="store_true", help="reload dst and report the max |difference| of its embeddings "
                   f"from src's on a bundled probe batch of real tiles and captions; fails above {CHECK_TOLERANCE:g}")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_checkpoint_choice_args(p)
    p.set_defaults(func=run_convert)


def run_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def run_init(args: argparse.Namespace) -> int:
    check_output_path(args.out, "--out")
    save_checkpoint(create_model(args.model, seed=args.seed), args.out)
    print(f"wrote randomly initialised {args.model} to {args.out}", file=sys.stderr)
    return 0


def conversion_target(dst: str, to: str | None) -> str:
    """`--to`, or what `dst` implies: a weights suffix is a file; an existing folder keeps its layout.

    Raises:
        ValueError: naming dst and --to, for a suffix that contradicts --to, or a new folder
            without --to (an OpenCLIP and a transformers folder are both folders).
    """
    is_file = Path(dst).suffix.lower() in FILE_SUFFIXES
    if to is None:
        if is_file:
            return "openclip"
        if os.path.isdir(dst) and is_openclip_dir(dst):
            return "openclip-dir"
        if os.path.isdir(dst) and is_transformers_dir(dst):
            return "hf"
        raise ValueError(f"dst {dst}: a folder name; say which folder with --to hf (transformers) or "
                         f"--to openclip-dir (OpenCLIP hub), or end it in {', '.join(FILE_SUFFIXES)} for one file")
    if to == "openclip" and not is_file:
        raise ValueError(f"dst {dst}: --to openclip writes one file; end it in {', '.join(FILE_SUFFIXES)}")
    if to != "openclip" and is_file:
        raise ValueError(f"dst {dst}: --to {to} writes a folder; drop the {Path(dst).suffix} suffix")
    return to


def run_convert(args: argparse.Namespace) -> int:
    target = conversion_target(args.dst, args.to)
    if target == "openclip":
        check_output_path(args.dst, "dst")
    elif os.path.exists(args.dst) and not os.path.isdir(args.dst):
        raise ValueError(f"dst {args.dst}: exists and is not a folder")
    model, info = load_checkpoint_with_info(args.src, model=args.model, step=args.step, best=args.best)
    if target == "openclip":
        save_checkpoint(model, args.dst)
    elif target == "openclip-dir":
        save_openclip_dir(model, args.dst)
    else:
        save_transformers_dir(model, args.dst, sources=info["files"])
    where = f" step {info['step']}" if "step" in info else ""
    print(f"wrote {args.dst} ({info['model']}, from {args.src}{where})", file=sys.stderr)
    if not args.check:
        return 0
    converted, converted_info = load_checkpoint_with_info(args.dst)
    diff = embedding_difference((model, load_tokenizer(args.src, info["format"])),
                                (converted, load_tokenizer(args.dst, converted_info["format"])))
    worst = max(diff["image_max_abs_diff"], diff["text_max_abs_diff"])
    print(f"check: max |difference| of L2-normalised embeddings, {args.src} vs {args.dst}: images "
          f"{diff['image_max_abs_diff']:.2e}, texts {diff['text_max_abs_diff']:.2e} ({diff['images']} bundled tiles, "
          f"{diff['texts']} captions, float32)", file=sys.stderr)
    if worst > CHECK_TOLERANCE:
        print(f"check FAILED: {worst:.2e} exceeds {CHECK_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0
