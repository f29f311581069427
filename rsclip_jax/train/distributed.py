"""Joining a multi-process JAX job: the flags every multi-process command takes, and a fail-fast init.

`rsclip train` and `rsclip eval` (and the launchers of `rsclip launch`, which add these flags to the
command they start) share `add_distributed_args` and `init_distributed`. The engine is JAX's own
runtime: `jax.distributed.initialize`, explicit (`--coordinator-address`, `--num-processes`,
`--process-id`) or auto-detected on Cloud TPU, SLURM and Open MPI (`--distributed`).

What this adds is failing fast: `--init-timeout` bounds the wait for the other processes, and on
expiry the process exits with one line naming the processes that never joined, where JAX itself
would abort with a C++ stack trace after twice the timeout and name nobody.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

import jax

from rsclip_jax.argtypes import positive_int
from rsclip_jax.train import heartbeat

FLAGS = ("--coordinator-address", "--num-processes", "--process-id")
DEFAULT_INIT_TIMEOUT = 300  # JAX's own default
INIT_TIMEOUT_EXIT_CODE = 1  # a user-facing error, as every `rsclip ... error:` line


def add_distributed_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The multi-process flags (one definition for every command that can run as several processes)."""
    p.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-process: address of process 0 (with --num-processes and --process-id)")
    p.add_argument("--num-processes", type=positive_int, default=None, help="multi-process: total number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index, 0 to N-1")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() with cluster "
                   "auto-detection (Cloud TPU, SLURM, Open MPI) when no coordinator is given")
    p.add_argument("--init-timeout", type=positive_int, default=DEFAULT_INIT_TIMEOUT, metavar="SECONDS",
                   help="multi-process: give up when the other processes have not joined after this many seconds, "
                   "naming the ones missing (default %(default)s)")


def check_distributed_args(args: argparse.Namespace) -> None:
    """One-line errors for inconsistent multi-process flags, before anything is built."""
    given = {f: getattr(args, f[2:].replace("-", "_")) for f in FLAGS}
    if args.coordinator_address is None:
        extra = [f for f, v in given.items() if v is not None]
        if extra and not args.distributed:
            verb = "needs" if len(extra) == 1 else "need"
            raise ValueError(f"{' and '.join(extra)} {verb} --coordinator-address HOST:PORT (or --distributed for "
                             "cluster auto-detection)")
    else:
        missing = [f for f, v in given.items() if v is None]
        if missing:
            raise ValueError(f"--coordinator-address {args.coordinator_address} needs {' and '.join(missing)} too")
        host, _, port = args.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator-address {args.coordinator_address}: expected HOST:PORT, "
                             "e.g. 10.0.0.1:1234")
    if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id}: must be 0 to {args.num_processes - 1} "
                         f"(--num-processes {args.num_processes})")


def init_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-process job the flags describe (CPU processes talk over gloo); no flags, no job.

    Raises:
        ValueError: for inconsistent flags. An init that outlives `--init-timeout` ends the process
            (exit code 1) with one line naming the processes that never joined.
    """
    if args.coordinator_address is None and not args.distributed:
        check_distributed_args(args)
        return
    check_distributed_args(args)
    process_id = args.process_id if args.process_id is not None else _env_int("SLURM_PROCID")
    num_processes = args.num_processes if args.num_processes is not None else _env_int("SLURM_NTASKS")
    if process_id is not None:
        heartbeat.configure(process_id)
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = args.init_timeout
    command = getattr(args, "command", None) or "rsclip"
    where = args.coordinator_address or "the auto-detected coordinator"

    def expire() -> None:
        missing = never_joined(process_id, num_processes, args.coordinator_address)
        print(f"rsclip {command}: error: distributed init timed out after {timeout} s (--init-timeout): "
              f"never joined: {missing} ({num_processes or '?'} processes, coordinator {where})",
              file=sys.stderr, flush=True)
        os._exit(INIT_TIMEOUT_EXIT_CODE)  # JAX's connect() cannot be interrupted; leave now, by name

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    heartbeat.background("joining")
    watchdog.start()
    try:
        # JAX's own timeout is a backstop (it aborts with a stack trace and names nobody).
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=timeout + 60)
    finally:
        watchdog.cancel()
    if process_id is None:
        heartbeat.configure(jax.process_index())
    # Still beating in the background: the command's setup has no steps (training turns it off at its first).
    heartbeat.background("joined")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def never_joined(process_id: int | None, num_processes: int | None, coordinator: str | None) -> str:
    """Names the processes that kept the job from forming, as precisely as this process can know.

    With the launcher's heartbeat folder every process's start is on record; otherwise process 0
    knows only that some other process is missing (exactly which when there are two), and another
    process can tell whether anything listens at the coordinator's address.
    """
    if num_processes is None or process_id is None:
        return "unknown (the cluster was auto-detected; see the other processes' logs)"
    others = [i for i in range(num_processes) if i != process_id]
    directory = os.environ.get(heartbeat.ENV_DIR)
    if directory:
        absent = [i for i in others if not os.path.exists(heartbeat.heartbeat_path(directory, i))]
        if absent:
            return _names(absent)
        return (f"{_names(others)} started but the job did not form (check that every process can reach "
                f"{coordinator})")
    if process_id != 0 and coordinator and not _listening(coordinator):
        return f"process 0 (nothing listens at {coordinator})"
    if len(others) == 1:
        return _names(others)
    return f"one or more of {_names(others)}"


def _names(ids: list[int]) -> str:
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False

