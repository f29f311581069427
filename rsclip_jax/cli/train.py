"""`rsclip train --config configs/X.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]`."""

from __future__ import annotations

import argparse
import json
import sys

import jax

from rsclip_jax.train.config import load_config
from rsclip_jax.train.distributed import add_distributed_args, check_distributed_args, init_distributed
from rsclip_jax.train.loop import train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train (or resume) a CLIP model from a config file",
        description="Overrides: --config.KEY=VALUE, e.g. --config.optim.lr=1e-4 --config.batch_size=512. "
        "Rerunning the same command resumes from the workdir's latest checkpoint.",
    )
    p.add_argument("--config", required=True, help="config file, optionally with an argument: configs/demo.py[:ARG]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs go here")
    add_distributed_args(p)
    p.add_argument("--allow-config-change", action="store_true", help="resume even though batch_size, "
                   "loss.chunk_size or data.train changed since the checkpoint (the architecture and clip<->siglip "
                   "can never change)")
    p.set_defaults(func=run_train, accepts_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    check_distributed_args(args)
    config = load_config(args.config, args.overrides)  # errors here, before anything compiles
    init_distributed(args)
    summary = train(config, args.workdir, args.allow_config_change)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, default=float), file=sys.stdout)
    if summary["ended"] == "interrupted":  # Ctrl-C: saved, but not finished; a script must not go on
        print(f"rsclip train: interrupted (Ctrl-C) at step {summary['step']}; checkpoint saved, rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    return 0
