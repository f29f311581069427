"""The `rsclip` command's entry point: the process environment first, then the command line.

Kept apart from `rsclip_jax.cli`, whose command modules pull in JAX: the restart in
`hostenv.restart_with_process_env` must come before any of that.
"""

from __future__ import annotations

from rsclip_jax import hostenv


def main() -> int:
    """Restarts under rsclip's process environment if needed, then runs `rsclip_jax.cli.main`."""
    hostenv.restart_with_process_env()
    from rsclip_jax.cli import main as cli_main  # after the restart

    return cli_main()
