"""`rsclip train --config configs/X.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]`.

With `--compile-only` it plans instead of training: it compiles the step for the configured mesh
and prints per-device memory, FLOPs and collective bytes (rsclip_jax/train/compile_plan.py).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from rsclip_jax.argtypes import byte_size, positive_int
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.fileio import atomic_write_json
from rsclip_jax.train.compile_plan import (EXCEEDS_EXIT_CODE, GIB, format_plan, plan, topology_devices,
                                           use_simulated_devices)
from rsclip_jax.train.config import load_config
from rsclip_jax.train.distributed import add_distributed_args, check_distributed_args, init_distributed
from rsclip_jax.train import INTERRUPTED_EXIT_CODE
from rsclip_jax.train.loop import train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help=COMMAND_HELP["train"],
        description="Overrides: --config.KEY=VALUE, e.g. --config.optim.lr=1e-4 --config.batch_size=512. "
        "Rerunning the same command resumes from the workdir's latest checkpoint.",
    )
    p.add_argument("--config", required=True, help="config file, optionally with an argument: configs/demo.py[:ARG]")
    p.add_argument("--workdir", help="checkpoints, metrics.jsonl and TensorBoard logs go here (required unless "
                   "--compile-only)")
    add_distributed_args(p)
    p.add_argument("--allow-config-change", action="store_true", help="resume even though batch_size, "
                   "loss.chunk_size or data.train changed since the checkpoint (the architecture and clip<->siglip "
                   "can never change)")
    plan = p.add_argument_group("planning (--compile-only: nothing is trained, read or written but --plan-json)")
    plan.add_argument("--compile-only", action="store_true", help="compile the train step for the configured mesh "
                      "from abstract shapes and report per-device memory, FLOPs and collective bytes, then exit")
    plan.add_argument("--simulate-devices", type=positive_int, metavar="N", help="plan on N simulated CPU devices")
    plan.add_argument("--topology", metavar="NAME", help="plan for a TPU topology, e.g. v5e:4x4 (needs libtpu)")
    plan.add_argument("--device-memory", type=byte_size, metavar="SIZE", help="memory of one device, e.g. 16GiB or "
                      f"80GB: a plan that needs more prints a WARNING and exits {EXCEEDS_EXIT_CODE}")
    plan.add_argument("--plan-json", metavar="FILE", help="also write the plan as JSON to FILE")
    plan.add_argument("--caption-tokens", type=positive_int, metavar="N", help="the longest caption of the "
                      "training data in tokens (max_caption_tokens in its manifest.json): plan at the width the "
                      "run trims captions to (data.trim_text_multiple), not the full context length")
    p.set_defaults(func=run_train, accepts_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    check_distributed_args(args)
    if args.compile_only:
        return run_plan(args)
    planning = [f for f in ("--simulate-devices", "--topology", "--device-memory", "--plan-json", "--caption-tokens")
                if getattr(args, f[2:].replace("-", "_")) is not None]
    if planning:
        verb = "plans" if len(planning) == 1 else "plan"
        raise ValueError(f"{', '.join(planning)} only {verb} a run: add --compile-only")
    if not args.workdir:
        raise ValueError("--workdir DIR is required to train (only --compile-only runs without one)")
    config = load_config(args.config, args.overrides)  # errors here, before anything compiles
    init_distributed(args)
    summary = train(config, args.workdir, args.allow_config_change)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, default=float), file=sys.stdout)
    if summary["ended"] == "interrupted":  # Ctrl-C: saved, but not finished; a script must not go on
        print(f"rsclip train: interrupted (Ctrl-C) at step {summary['step']}; checkpoint saved, rerun the same "
              "command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """`--compile-only`: compile and report, on this process alone, without touching a workdir."""
    if args.coordinator_address or args.distributed:
        raise ValueError("--compile-only plans in one process: drop --coordinator-address/--distributed (use "
                         "--simulate-devices N or --topology for the devices of the real job)")
    if args.simulate_devices and args.topology:
        raise ValueError("--simulate-devices and --topology: give one of them")
    config = load_config(args.config, args.overrides)
    # Devices first: simulated CPU devices must be configured before anything starts JAX's backends.
    if args.simulate_devices:
        devices = use_simulated_devices(args.simulate_devices)
    elif args.topology:
        devices = topology_devices(args.topology)
    else:
        devices = None
    result = plan(config, devices, args.device_memory, args.caption_tokens)
    print(format_plan(result), file=sys.stdout)
    if args.plan_json:
        atomic_write_json(args.plan_json, result)
    if result["exceeds_device_memory"]:
        total = result["memory_per_device_bytes"]["total"]
        print(f"rsclip train: WARNING: the plan needs {total / GIB:.2f} GiB per device, more than --device-memory "
              f"{args.device_memory / GIB:.2f} GiB; shard more (config.mesh.shape fsdp), lower config.batch_size or "
              "raise config.optim.grad_accum_steps, or remat (config.model.visual_remat)", file=sys.stderr)
        return EXCEEDS_EXIT_CODE
    return 0
