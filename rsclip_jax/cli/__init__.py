"""The `rsclip` command line: one subcommand per job (see `rsclip --help`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from rsclip_jax.cli import checkpoints, demo, embed

    parser = argparse.ArgumentParser(prog="rsclip", description="RemoteCLIP in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (embed, checkpoints, demo):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand. User errors print one clear line and exit 1 (RSCLIP_DEBUG=1 shows tracebacks)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        if os.environ.get("RSCLIP_DEBUG"):
            raise
        print(f"rsclip {args.command}: error: {e}", file=sys.stderr)
        return 1
