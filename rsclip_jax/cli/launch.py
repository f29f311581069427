"""`rsclip launch local|slurm|tpu|hosts [options] -- train ...`: run one command as a multi-process job.

    rsclip launch local --num-processes 2 --devices-per-process 2 -- train --config configs/demo.py --workdir W
    rsclip launch slurm --nodes 2 --dry-run -- train --config configs/remoteclip.py:ViT-B-32 --workdir W
    rsclip launch tpu --name my-tpu --zone us-central2-b -- train --config configs/remoteclip.py:ViT-L-14 --workdir W
    rsclip launch hosts --hosts a,b --coordinator a:1234 -- train --config configs/demo.py --workdir W

The processes find each other through JAX's own runtime (jax.distributed); `local` and `hosts`
supervise them here and take the job down as soon as one fails or hangs (docs/scaling.md).
`--dry-run` prints the exact commands and scripts instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

from rsclip_jax.argtypes import positive_int, seconds
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.fileio import atomic_write_text
from rsclip_jax.launch import scripts
from rsclip_jax.launch.supervisor import Process, Supervisor


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help=COMMAND_HELP["launch"],
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dry-run", action="store_true", help="print the exact commands/scripts; run nothing")
        q.add_argument("job", nargs=argparse.REMAINDER, help="-- train ... (or eval ...)")

    def supervised(q: argparse.ArgumentParser) -> None:
        q.add_argument("--log-dir", default=None, help="every process's log, process_<i>.log (default WORKDIR/logs)")
        q.add_argument("--kill-grace", type=seconds, default=10.0, metavar="SECONDS",
                       help="after a failure, SIGKILL the others this long after SIGTERM (default %(default)g)")

    q = kinds.add_parser("local", help="N processes on this machine, M simulated CPU devices each (gloo)")
    q.add_argument("--num-processes", type=positive_int, default=2)
    q.add_argument("--devices-per-process", type=positive_int, default=4, help="simulated CPU devices per process")
    q.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    q.add_argument("--heartbeat-timeout", type=seconds, default=300.0, metavar="SECONDS",
                   help="take the job down when a process's heartbeat is this old (stopped or stuck); 0: never "
                   "(default %(default)g)")
    supervised(q)
    common(q)
    q.set_defaults(func=run_local)

    q = kinds.add_parser("slurm", help="write and submit an sbatch script (jax.distributed reads the SLURM env)")
    q.add_argument("--nodes", type=positive_int, default=1)
    q.add_argument("--gpus-per-node", type=positive_int, default=8)
    q.add_argument("--process-per", choices=["node", "gpu"], default="node",
                   help="one process per node driving its GPUs (default), or one per GPU")
    q.add_argument("--job-name", default="rsclip")
    q.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    q.add_argument("--partition", default=None)
    q.add_argument("--account", default=None)
    q.add_argument("--cpus-per-task", type=positive_int, default=None)
    q.add_argument("--signal-seconds", type=positive_int, default=120,
                   help="SIGTERM this long before the time limit, to save a checkpoint (default %(default)s)")
    q.add_argument("--no-requeue", action="store_true", help="do not requeue after a preemption or the time limit")
    q.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    q.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line before srun, e.g. 'source ~/venv/bin/activate' (repeatable)")
    q.add_argument("--log-dir", default=None, help="the script and every process's log (default WORKDIR/logs)")
    common(q)
    q.set_defaults(func=run_slurm)

    q = kinds.add_parser("tpu", help="the same command on every worker of a Cloud TPU slice (gcloud ssh)")
    q.add_argument("--name", required=True, help="TPU VM name (several slices: the queued resource's name)")
    q.add_argument("--zone", required=True)
    q.add_argument("--project", default=None)
    q.add_argument("--slice-count", type=positive_int, default=1,
                   help="slices of a queued resource (multi-slice: the data axis spans them over DCN)")
    q.add_argument("--no-sync", action="store_true", help="the code is already installed on the workers")
    q.add_argument("--install", default=scripts.TpuOptions.install, help="install line run on every worker "
                   "after copying the code (default: %(default)s)")
    q.add_argument("--remote-dir", default=scripts.TpuOptions.remote_dir, help="code folder on the workers")
    q.add_argument("--remote-log-dir", default=scripts.TpuOptions.remote_log_dir,
                   help="each worker's log, worker_<i>.log, on that worker (default %(default)s)")
    common(q)
    q.set_defaults(func=run_tpu)

    q = kinds.add_parser("hosts", help="plain multi-node without a scheduler: one process per host over ssh")
    q.add_argument("--hosts", required=True, help="comma-separated hosts; process i runs on the i-th")
    q.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="process 0's host (listed first) and port")
    q.add_argument("--remote-dir", default=None, help="folder to cd to on each host (default: this folder's path)")
    q.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell command before rsclip on each host, e.g. 'source venv/bin/activate' (repeatable)")
    q.add_argument("--print", action="store_true", dest="print_only",
                   help="print the command to run on each host, to start them yourself")
    supervised(q)
    common(q)
    q.set_defaults(func=run_hosts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(args: argparse.Namespace) -> int:
    command = scripts.check_command(args.job)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port}: must be 0 (a free one) to 65535")
    log_dir = scripts.default_log_dir(command, args.log_dir)
    port = args.port or free_port()
    base_env = dict(os.environ)
    if args.dry_run:
        processes = scripts.local_processes(command, args.num_processes, args.devices_per_process, port, log_dir,
                                            "HEARTBEAT_DIR" if args.heartbeat_timeout else None, base_env)
        sys.stdout.write(scripts.local_dry_run(processes, base_env))
        return 0
    heartbeat_dir = tempfile.mkdtemp(prefix="rsclip-heartbeat-") if args.heartbeat_timeout else None
    try:
        processes = scripts.local_processes(command, args.num_processes, args.devices_per_process, port, log_dir,
                                            heartbeat_dir, base_env)
        print(f"rsclip launch: {args.num_processes} processes x {args.devices_per_process} devices, coordinator "
              f"127.0.0.1:{port}; logs: {log_dir}/process_<i>.log (process 0 shown here)", file=sys.stderr)
        return Supervisor(processes, heartbeat_dir, args.heartbeat_timeout, args.kill_grace).run()
    finally:
        if heartbeat_dir:
            shutil.rmtree(heartbeat_dir, ignore_errors=True)


def run_hosts(args: argparse.Namespace) -> int:
    command = scripts.check_command(args.job)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        raise ValueError("--hosts: give comma-separated host names")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"--hosts {args.hosts}: a host is listed twice (one process per host)")
    scripts.check_coordinator(args.coordinator, hosts)
    remote = scripts.host_commands(command, hosts, args.coordinator, args.remote_dir or os.getcwd(), args.setup)
    if args.print_only:
        sys.stdout.write("".join(f"# on {h} (process {i}):\n{c}\n" for i, (h, c) in enumerate(zip(hosts, remote))))
        return 0
    argvs = [scripts.ssh_argv(h, c) for h, c in zip(hosts, remote)]
    if args.dry_run:
        sys.stdout.write(scripts.shell_lines(argvs))
        return 0
    if not shutil.which("ssh"):
        raise ValueError("ssh not found; use --print to get each host's command")
    log_dir = scripts.default_log_dir(command, args.log_dir)
    processes = [Process(a, dict(os.environ), scripts.log_path(log_dir, i)) for i, a in enumerate(argvs)]
    print(f"rsclip launch: {len(hosts)} hosts, coordinator {args.coordinator}; logs: {log_dir}/process_<i>.log "
          "(process 0 shown here)", file=sys.stderr)
    return Supervisor(processes, kill_grace=args.kill_grace).run()


def run_slurm(args: argparse.Namespace) -> int:
    command = scripts.check_command(args.job)
    log_dir = scripts.default_log_dir(command, args.log_dir)
    options = scripts.SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, process_per=args.process_per, job_name=args.job_name,
        time=args.time, partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
        signal_seconds=args.signal_seconds, requeue=not args.no_requeue, sbatch_args=args.sbatch_arg,
        setup=args.setup)
    script = scripts.slurm_script(command, log_dir, options)
    path = os.path.join(log_dir, "slurm.sbatch")
    if args.dry_run:
        sys.stdout.write(scripts.slurm_dry_run(script, log_dir, path))
        return 0
    if not shutil.which("sbatch"):
        raise ValueError("sbatch not found: run this on a SLURM login node (or print the script with --dry-run)")
    os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the folder of --output
    atomic_write_text(path, script)
    print(f"rsclip launch: wrote {path}", file=sys.stderr)
    return subprocess.run(["sbatch", path]).returncode


def run_tpu(args: argparse.Namespace) -> int:
    command = scripts.check_command(args.job)
    options = scripts.TpuOptions(name=args.name, zone=args.zone, project=args.project, slice_count=args.slice_count,
                                 sync=not args.no_sync, install=args.install, remote_dir=args.remote_dir,
                                 remote_log_dir=args.remote_log_dir)
    steps = scripts.tpu_commands(command, options)
    if args.dry_run:
        sys.stdout.write(scripts.shell_lines(steps))
        return 0
    if not shutil.which("gcloud"):
        raise ValueError("gcloud not found: install the Google Cloud CLI (or print the commands with --dry-run)")
    for step in steps:
        print(f"rsclip launch: {shlex.join(step)}", file=sys.stderr, flush=True)
        code = subprocess.run(step).returncode
        if code:
            print(f"rsclip launch: that step exited with code {code}; stopping", file=sys.stderr)
            return code
    return 0
