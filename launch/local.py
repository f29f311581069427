#!/usr/bin/env python
"""Runs an `rsclip` command as N local JAX processes (multi-host, simulated on one machine).

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \
        rsclip train --config configs/demo.py --workdir runs/mp

Each process gets `--coordinator-address 127.0.0.1:PORT --num-processes N --process-id I` and, on
CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=D`; processes talk over gloo. SIGTERM and
SIGINT are forwarded to every process (so preemption handling can be tried locally). The exit
code is the first non-zero exit code of any process, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=4, help="simulated CPU devices per process")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- rsclip train ...")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if command[0] == "rsclip":  # run the package of this checkout with this interpreter
        command = [sys.executable, "-m", "rsclip_jax", *command[1:]]
    port = args.port or free_port()
    procs = []
    for i in range(args.num_processes):
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices_per_process}"
        env.setdefault("JAX_PLATFORMS", "cpu")
        extra = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(args.num_processes),
                 "--process-id", str(i)]
        procs.append(subprocess.Popen(command + extra, env=env))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
