"""The `rsclip` command line: one subcommand per job (see `rsclip --help`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rsclip_jax.cli import checkpoints, data, demo, embed, train
from rsclip_jax.cli import eval as eval_cli
from rsclip_jax.cli import index as index_cli
from rsclip_jax.cli import launch as launch_cli
from rsclip_jax.cli import mapping as map_cli
from rsclip_jax.cli import serve as serve_cli
from rsclip_jax.cli import sweep as sweep_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsclip", description="RemoteCLIP in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (embed, checkpoints, data, train, eval_cli, demo, map_cli, index_cli, serve_cli, launch_cli,
                   sweep_cli):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand. User errors print one clear line and exit 1 (RSCLIP_DEBUG=1 shows tracebacks)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only `train` takes --config.KEY=VALUE overrides; anything else unknown is an error.
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        if os.environ.get("RSCLIP_DEBUG"):
            raise
        print(f"rsclip {args.command}: error: {e}", file=sys.stderr)
        return 1
