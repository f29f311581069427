"""The commands and scripts each launcher runs, as plain text (what `--dry-run` prints, byte for byte).

The job's command is an rsclip subcommand that joins a multi-process job: `train ...` or `eval ...`.
Each launcher only adds how the processes find each other: explicit flags (local, hosts) or
`--distributed`, JAX's auto-detection from the SLURM or Cloud TPU environment.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Sequence

from rsclip_jax.fileio import require_local_path
from rsclip_jax.launch.supervisor import Process
from rsclip_jax.train import heartbeat
from rsclip_jax.train.distributed import FLAGS as DISTRIBUTED_FLAGS

COMMANDS = ("train", "eval")  # the subcommands that take the multi-process flags
LAUNCHER_FLAGS = (*DISTRIBUTED_FLAGS, "--distributed")
JAX_TPU = "jax[tpu]==0.10.2"
ARCHIVE = "dist/rsclip_jax.tar.gz"
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"


def check_command(command: Sequence[str]) -> list[str]:
    """The rsclip subcommand after `--` (a leading `rsclip` is dropped), checked; one-line errors."""
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    if command[:1] == ["rsclip"]:
        command = command[1:]
    if not command:
        raise ValueError("give the command to run after --, e.g. `-- train --config configs/demo.py --workdir W`")
    if command[0] not in COMMANDS:
        raise ValueError(f"the command after -- must be {' or '.join(COMMANDS)} (the commands that join a "
                         f"multi-process job), got {command[0]!r}")
    for arg in command:
        flag = arg.split("=", 1)[0]
        if flag in LAUNCHER_FLAGS:
            raise ValueError(f"{flag}: the launcher sets it for each process; remove it from the command")
    workdir = option(command, "--workdir")
    if workdir is not None:  # refused here, before a job is queued, not by every process after it starts
        require_local_path(workdir, "--workdir")
    return command


def option(command: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in `command` (`--flag V` or `--flag=V`), else None."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def default_log_dir(command: Sequence[str], given: str | None) -> str:
    """`--log-dir`, else the command's `--workdir`/logs."""
    if given:
        return given
    workdir = option(command, "--workdir")
    if not workdir:
        raise ValueError(f"give --log-dir DIR: `{command[0]}` has no --workdir to keep the logs in")
    return os.path.join(workdir, "logs")


def log_path(log_dir: str, process_id: int) -> str:
    return os.path.join(log_dir, f"process_{process_id}.log")


def process_flags(coordinator: str, num_processes: int, process_id: int) -> list[str]:
    return ["--coordinator-address", coordinator, "--num-processes", str(num_processes),
            "--process-id", str(process_id)]


# -- local ----------------------------------------------------------------------------------------


def local_processes(command: Sequence[str], num_processes: int, devices_per_process: int, port: int,
                    log_dir: str, heartbeat_dir: str | None, base_env: dict[str, str] | None = None) -> list[Process]:
    """N processes of this checkout's rsclip on this machine, M simulated CPU devices each, over gloo."""
    base_env = dict(os.environ if base_env is None else base_env)
    flags = [f for f in base_env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env = {**base_env, "XLA_FLAGS": " ".join(flags), "PYTHONUNBUFFERED": "1"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    if heartbeat_dir:
        env[heartbeat.ENV_DIR] = heartbeat_dir
    return [Process([sys.executable, "-m", "rsclip_jax", *command,
                     *process_flags(f"127.0.0.1:{port}", num_processes, i)], env, log_path(log_dir, i))
            for i in range(num_processes)]


def local_dry_run(processes: Sequence[Process], base_env: dict[str, str]) -> str:
    """One line per process: the environment it gets beyond ours, the command and its log."""
    lines = []
    for p in processes:
        changed = [f"{k}={shlex.quote(v)}" for k, v in sorted(p.env.items()) if base_env.get(k) != v]
        lines.append(" ".join([*changed, shlex.join(p.argv), ">>", shlex.quote(p.log), "2>&1"]))
    return "\n".join(lines) + "\n"


# -- hosts ----------------------------------------------------------------------------------------


def check_coordinator(coordinator: str, hosts: Sequence[str]) -> None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {coordinator}: expected HOST:PORT, e.g. {hosts[0] if hosts else 'a'}:1234")
    if host not in hosts:
        raise ValueError(f"--coordinator {coordinator}: {host} is not among --hosts {','.join(hosts)}; process 0 "
                         "runs on the coordinator's host, so list it (first)")
    if hosts[0] != host:
        raise ValueError(f"--coordinator {coordinator}: list {host} first in --hosts (it runs process 0)")


def host_commands(command: Sequence[str], hosts: Sequence[str], coordinator: str, remote_dir: str | None,
                  setup: Sequence[str] = ()) -> list[str]:
    """The shell command to run on each host (process i on hosts[i])."""
    prefix = [f"cd {shlex.quote(remote_dir)}"] if remote_dir else []
    prefix += list(setup)
    out = []
    for i in range(len(hosts)):
        run = "exec " + shlex.join(["rsclip", *command, *process_flags(coordinator, len(hosts), i)])
        out.append(" && ".join([*prefix, run]))
    return out


def ssh_argv(host: str, remote_command: str) -> list[str]:
    """`ssh -tt`: a terminal on the remote side, so killing this ssh hangs up (SIGHUP) the remote process."""
    return ["ssh", "-tt", "-o", "BatchMode=yes", host, remote_command]


# -- SLURM ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    process_per: str = "node"  # or "gpu"
    job_name: str = "rsclip"
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    signal_seconds: int = 120
    requeue: bool = True
    sbatch_args: Sequence[str] = ()
    setup: Sequence[str] = ()


def slurm_script(command: Sequence[str], log_dir: str, o: SlurmOptions) -> str:
    """The sbatch script: one srun step of `rsclip ... --distributed` (JAX reads the SLURM environment)."""
    if any(c.isspace() for c in log_dir):
        raise ValueError(f"--log-dir {log_dir!r}: SLURM's #SBATCH --output cannot take a path with spaces")
    per_node = o.process_per == "node"
    tasks = 1 if per_node else o.gpus_per_node
    lines = [
        "#!/bin/bash",
        "# Generated by `rsclip launch slurm` (see docs/scaling.md).",
        f"# {o.nodes} node(s), " + (f"one process per node driving its {o.gpus_per_node} GPUs." if per_node
                                    else f"one process per GPU ({tasks} per node)."),
        "# jax.distributed.initialize() reads the SLURM environment (--distributed); srun --kill-on-bad-exit",
        "# ends every process when one fails. SIGTERM before the time limit (or on preemption) makes rsclip",
        "# save a checkpoint and exit 0" + ("; the job then requeues itself and resumes from the workdir."
                                           if o.requeue else "; rerun to resume from the workdir."),
        f"#SBATCH --job-name={o.job_name}",
        f"#SBATCH --nodes={o.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={o.gpus_per_node}",
    ]
    lines += [f"#SBATCH --{k}={v}" for k, v in (("cpus-per-task", o.cpus_per_task), ("time", o.time),
                                                ("partition", o.partition), ("account", o.account)) if v]
    lines.append(f"#SBATCH --signal=TERM@{o.signal_seconds}")
    if o.requeue:
        lines.append("#SBATCH --requeue")
    lines += ["#SBATCH --open-mode=append", f"#SBATCH --output={log_dir}/slurm-%j.out"]
    lines += [f"#SBATCH {a}" for a in o.sbatch_args]
    lines += [
        "set -euo pipefail",
        f"LOGS={shlex.quote(log_dir)}",
        'RUN="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"  # a requeued job keeps its id',
        'mkdir -p "$LOGS"',
        *o.setup,
    ]
    if per_node:
        lines.append("export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(o.gpus_per_node)))
                     + "  # every GPU of the node (JAX would otherwise give each process GPU $SLURM_LOCALID only)")
    lines += [
        'srun --kill-on-bad-exit=1 --output="$LOGS/process_%t.$RUN.log" \\',
        "  " + shlex.join(["rsclip", *command, "--distributed"]),
    ]
    if o.requeue:
        lines += [
            "# Process 0's summary says how the run ended: requeue to continue after a time-limit SIGTERM.",
            "if grep -q '\"ended\": \"preempted\"' \"$LOGS/process_0.$RUN.log\"; then",
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    return "\n".join(lines) + "\n"


# -- Cloud TPU ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TpuOptions:
    name: str
    zone: str
    project: str | None = None
    slice_count: int = 1
    sync: bool = True
    install: str = f'pip install -e ~/rsclip_jax "{JAX_TPU}"'
    remote_dir: str = "~/rsclip_jax"
    remote_log_dir: str = "~/rsclip_logs"


def tpu_command(command: Sequence[str], slice_count: int) -> list[str]:
    """The job's command with `--distributed`; several slices get the slice axis on the DCN mesh."""
    command = [*command, "--distributed"]
    if slice_count > 1 and option(command, "--config.mesh.dcn_shape") is None:
        command.append(f"--config.mesh.dcn_shape=({slice_count},1,1)")
    return command


def _gcloud(o: TpuOptions, verb: str, *args: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB` (one slice) or `... queued-resources VERB --node=all` (several)."""
    target = ["tpu-vm"] if o.slice_count == 1 else ["queued-resources"]
    where = [f"--zone={o.zone}", *([f"--project={o.project}"] if o.project else [])]
    nodes = ["--node=all"] if o.slice_count > 1 else []
    return ["gcloud", "compute", "tpus", *target, verb, *args, *where, *nodes, "--worker=all"]


def _remote_path(path: str) -> str:
    """Quotes a remote path for the shell but leaves a leading `~/` to expand."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def tpu_commands(command: Sequence[str], o: TpuOptions) -> list[list[str]]:
    """The argv of each step, run in order from the checkout's root: pack, copy, install, run."""
    steps: list[list[str]] = []
    remote = _remote_path(o.remote_dir)
    if o.sync:
        steps.append(["bash", "-c", f"mkdir -p dist && git ls-files -z | tar --null -czf {ARCHIVE} -T -"])
        steps.append(_gcloud(o, "scp", ARCHIVE, f"{o.name}:rsclip_jax.tar.gz"))
        steps.append(_gcloud(o, "ssh", o.name, "--command",
                             f"mkdir -p {remote} && tar -xzf ~/rsclip_jax.tar.gz -C {remote} && {o.install}"))
    logs = _remote_path(o.remote_log_dir)
    run = shlex.join(["rsclip", *tpu_command(command, o.slice_count)])
    script = (f"set -o pipefail; cd {remote} && mkdir -p {logs} && "
              f"W=$(curl -s -H Metadata-Flavor:Google {METADATA}) && "
              f'if [ "$W" = 0 ]; then {run} 2>&1 | tee -a {logs}/worker_$W.log; '
              f"else {run} >> {logs}/worker_$W.log 2>&1; fi")
    steps.append(_gcloud(o, "ssh", o.name, "--command", script))
    return steps


def shell_lines(steps: Sequence[Sequence[str]]) -> str:
    return "".join(shlex.join(s) + "\n" for s in steps)


def slurm_dry_run(script: str, log_dir: str, path: str) -> str:
    """What `rsclip launch slurm` does, as a shell script: make the log folder, write the script, submit it."""
    return (f"mkdir -p {shlex.quote(log_dir)}\n"
            f"cat > {shlex.quote(path)} <<'RSCLIP_EOF'\n{script}RSCLIP_EOF\n"
            f"sbatch {shlex.quote(path)}\n")
