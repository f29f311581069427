"""`rsclip train --config configs/X.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]`."""

from __future__ import annotations

import argparse
import json
import sys

import jax

from rsclip_jax.train.config import load_config
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
    p.add_argument("--coordinator-address", default=None, help="multi-process: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: total number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() with cluster "
                   "auto-detection (TPU pods, SLURM) when no coordinator is given")
    p.add_argument("--allow-config-change", action="store_true", help="resume even though batch_size, "
                   "loss.chunk_size or data.train changed since the checkpoint (the architecture and clip<->siglip "
                   "can never change)")
    p.set_defaults(func=run_train, accepts_overrides=True)


def init_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process JAX job (CPU processes talk over gloo)."""
    if args.coordinator_address is None and not args.distributed:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
    )


def run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # errors here, before anything compiles
    init_distributed(args)
    summary = train(config, args.workdir, args.allow_config_change)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, default=float), file=sys.stdout)
    return 0
