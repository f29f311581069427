"""The `rsclip` command's entry point: the process environment first, then the command line.

Kept apart from `rsclip_jax.cli`, whose import pulls in every subcommand (and JAX): the restart
in `hostenv.restart_with_process_env` must come before that.
"""

from __future__ import annotations

from rsclip_jax import hostenv


def main() -> int:
    """Restarts under rsclip's process environment if needed, then runs `rsclip_jax.cli.main`."""
    hostenv.restart_with_process_env()
    from rsclip_jax.cli import main as cli_main  # after the restart: importing the CLI takes seconds

    return cli_main()
