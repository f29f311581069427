"""`rsclip models`, `rsclip init` and `rsclip convert`."""

from __future__ import annotations

import argparse
import sys

from rsclip_jax.checkpoint import load_checkpoint, save_checkpoint
from rsclip_jax.models import create_model, list_models


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the known model architectures")
    p.set_defaults(func=run_models)

    p = sub.add_parser("init", help="write a randomly initialised model as an OpenCLIP checkpoint")
    p.add_argument("--model", required=True, help="architecture name (see `rsclip models`)")
    p.add_argument("--out", required=True, help="output .pt or .safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_init)

    p = sub.add_parser("convert", help="convert between .pt/.pth/.bin and .safetensors (checks the architecture)")
    p.add_argument("src", help="input checkpoint")
    p.add_argument("dst", help="output checkpoint (.pt or .safetensors)")
    p.add_argument("--model", default=None, help="architecture to check against; default: inferred")
    p.set_defaults(func=run_convert)


def run_models(args: argparse.Namespace) -> int:
    print("\n".join(list_models()))
    return 0


def run_init(args: argparse.Namespace) -> int:
    save_checkpoint(create_model(args.model, seed=args.seed), args.out)
    print(f"wrote randomly initialised {args.model} to {args.out}", file=sys.stderr)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    save_checkpoint(load_checkpoint(args.src, model=args.model), args.dst)
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0
