"""The `rsclip` command line: one subcommand per job (see `rsclip --help`).

Only the module of the command that runs is imported (`commands.COMMAND_MODULES`): all of them
together pull in JAX, flax, transformers and more, seconds that `rsclip --help`, a mistyped
command or the launcher's supervising process should not pay.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from rsclip_jax.cli.commands import COMMAND_HELP, COMMAND_MODULES


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` (importing its module only), or of every command.

    Without a known `command`, each command gets a placeholder parser holding just its help: enough
    for `rsclip --help` and for argparse's "invalid choice" error, with no module imported.
    """
    parser = argparse.ArgumentParser(prog="rsclip", description="RemoteCLIP in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMAND_MODULES:
        importlib.import_module(f"rsclip_jax.cli.{COMMAND_MODULES[command]}").register(sub)
    else:
        for name, help_text in COMMAND_HELP.items():
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names: its first argument, as the top-level parser has no options but -h."""
    return argv[0] if argv and not argv[0].startswith("-") else None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand. User errors print one clear line and exit 1 (RSCLIP_DEBUG=1 shows tracebacks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
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
