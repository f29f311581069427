"""`rsclip models`, `rsclip init` and `rsclip convert`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rsclip_jax.checkpoint import load_checkpoint_with_info, save_checkpoint, save_openclip_dir
from rsclip_jax.cli.common import MODEL_HELP, add_checkpoint_choice_args, check_output_path
from rsclip_jax.models import create_model, list_models


TARGETS = ("openclip", "openclip-dir")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the known model architectures")
    p.set_defaults(func=run_models)

    p = sub.add_parser("init", help="write a randomly initialised model as an OpenCLIP checkpoint")
    p.add_argument("--model", required=True, help="architecture name (see `rsclip models`)")
    p.add_argument("--out", required=True, help="output .pt or .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_init)

    p = sub.add_parser("convert", help="convert a checkpoint, OpenCLIP folder or workdir to .pt/.safetensors or an "
                       "OpenCLIP hub folder (records the architecture)")
    p.add_argument("src", help="input: .pt/.pth/.bin/.safetensors, an OpenCLIP hub folder or an rsclip training workdir")
    p.add_argument("dst", help="output: .pt (with a .pt.json sidecar) or .safetensors; or a folder for --to openclip-dir")
    p.add_argument("--to", choices=TARGETS, default=None, help="openclip: one state_dict file; openclip-dir: "
                   "open_clip_config.json + open_clip_model.safetensors, for open_clip.create_model_from_pretrained"
                   "('local-dir:DST') and the hub. Default: from dst (a file suffix, else a folder)")
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
    """`--to`, or what `dst` implies: a weights suffix is a file, anything else a folder."""
    is_file = Path(dst).suffix.lower() in FILE_SUFFIXES
    if to is None:
        return "openclip" if is_file else "openclip-dir"
    if to == "openclip" and not is_file:
        raise ValueError(f"dst {dst}: --to openclip writes one file; end it in {', '.join(FILE_SUFFIXES)}")
    if to == "openclip-dir" and is_file:
        raise ValueError(f"dst {dst}: --to openclip-dir writes a folder; drop the {Path(dst).suffix} suffix")
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
    else:
        save_openclip_dir(model, args.dst)
    where = f" step {info['step']}" if "step" in info else ""
    print(f"wrote {args.dst} ({info['model']}, from {args.src}{where})", file=sys.stderr)
    return 0
