"""`rsclip models`, `rsclip init` and `rsclip convert`."""

from __future__ import annotations

import argparse
import sys

from rsclip_jax.checkpoint import load_checkpoint_with_info, save_checkpoint
from rsclip_jax.cli.common import MODEL_HELP, add_checkpoint_choice_args, check_output_path
from rsclip_jax.models import create_model, list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the known model architectures")
    p.set_defaults(func=run_models)

    p = sub.add_parser("init", help="write a randomly initialised model as an OpenCLIP checkpoint")
    p.add_argument("--model", required=True, help="architecture name (see `rsclip models`)")
    p.add_argument("--out", required=True, help="output .pt or .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_init)

    p = sub.add_parser("convert", help="convert a checkpoint or workdir to .pt/.safetensors (records the architecture)")
    p.add_argument("src", help="input checkpoint: .pt/.pth/.bin/.safetensors or an rsclip training workdir")
    p.add_argument("dst", help="output checkpoint (.pt, with a .pt.json sidecar, or .safetensors)")
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


def run_convert(args: argparse.Namespace) -> int:
    check_output_path(args.dst, "dst")
    model, info = load_checkpoint_with_info(args.src, model=args.model, step=args.step, best=args.best)
    save_checkpoint(model, args.dst)
    where = f" step {info['step']}" if "step" in info else ""
    print(f"wrote {args.dst} ({info['model']}, from {args.src}{where})", file=sys.stderr)
    return 0
