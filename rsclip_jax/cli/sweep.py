"""`rsclip sweep FILE [--launcher local|slurm|tpu] [--max-parallel K] [--dry-run] [--collect]`.

    rsclip sweep configs/sweeps/demo_lr.py --max-parallel 2        # 4 tiny runs, 2 at a time, here
    rsclip sweep configs/sweeps/demo_lr.py --collect               # results.csv/.md/.png, best run
    rsclip sweep configs/sweeps/remoteclip_lr.py --launcher slurm --launcher-args="--nodes 2" --dry-run

FILE's get_sweep() names a config and a list of override dicts (rsclip_jax/launch/sweep.py). Each
run trains in ROOT/NAME (ROOT: runs/<sweep name>); a rerun skips finished runs and relaunches the
others, which resume from their checkpoints. `--config.KEY=VALUE` applies to every run.
`--launcher-args` are `rsclip launch LAUNCHER`'s options, e.g. "--nodes 2 --time 24:00:00" for
slurm or "--name my-tpu --zone us-central2-b" for tpu; for local, they run each run as an
`rsclip launch local` job of several processes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from rsclip_jax.argtypes import positive_int
from rsclip_jax.cli import launch as launch_cli
from rsclip_jax.cli.commands import COMMAND_HELP
from rsclip_jax.launch import sweep_collect
from rsclip_jax.launch.supervisor import Process
from rsclip_jax.launch.sweep import (LOG, Run, Sweep, check_records, load_sweep, run_status, train_command,
                                     write_record, write_status)
from rsclip_jax.launch.sweep_queue import JobQueue

LAUNCHERS = ("local", "slurm", "tpu")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help=COMMAND_HELP["sweep"],
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="sweep file defining get_sweep(), e.g. configs/sweeps/demo_lr.py")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: a queue on this machine (default); slurm: one sbatch job per run; tpu: the runs one "
                   "after another on a Cloud TPU slice")
    p.add_argument("--max-parallel", type=positive_int, default=None, metavar="K",
                   help="local: runs at once (default 1); slurm: at most K jobs running (job names cycle through K "
                   "slots with --dependency=singleton; default: no limit)")
    p.add_argument("--launcher-args", default="", metavar="'OPTIONS'",
                   help="options of `rsclip launch LAUNCHER`, as one string (after the sweep file's launcher_args)")
    p.add_argument("--root", default=None, help="the runs' parent folder (default runs/<sweep name>)")
    p.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    p.add_argument("--fail-fast", action="store_true", help="local: on the first failed run, stop the others")
    p.add_argument("--collect", action="store_true",
                   help="write ROOT/results.csv, .md and .png from the runs' metrics, and name the best run")
    p.add_argument("--metric", default=None, help="--collect: rank by this metric (default: the sweep's, else the "
                   "config's best_metric, else the final train loss)")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="--collect: whether lower or higher is better")
    p.set_defaults(func=run_sweep, accepts_overrides=True)


def say(message: str) -> None:
    print(f"rsclip sweep: {message}", file=sys.stderr, flush=True)


def run_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.file, args.root, args.overrides, recorded=args.collect)
    check_records(sweep)
    if args.collect:
        return collect(sweep, args)
    launcher_args = shlex.split(sweep.launcher_args.get(args.launcher, "")) + shlex.split(args.launcher_args)
    statuses = [run_status(r) for r in sweep.runs]
    todo = [r for r, s in zip(sweep.runs, statuses) if s.state != "completed"]
    say(f"{sweep.name}: {len(sweep.runs)} runs of {sweep.config} in {sweep.root}: "
        f"{len(sweep.runs) - len(todo)} finished, {len(todo)} to run")
    for run, status in zip(sweep.runs, statuses):
        if status.state in ("failed", "unfinished"):
            say(f"{run.name}: {status}; relaunching (it resumes from its checkpoint)")
    if not todo:
        return 0
    if args.launcher == "local":
        return run_local(sweep, todo, launcher_args, args)
    return run_cluster(sweep, todo, launcher_args, args)


# -- local ------------------------------------------------------------------------------------------


def local_argv(sweep: Sweep, run: Run, launcher_args: Sequence[str]) -> list[str]:
    """`python -m rsclip_jax train ...`, or `... launch local OPTIONS -- train ...` for several processes."""
    launch = ["launch", "local", *launcher_args, "--"] if launcher_args else []
    return [sys.executable, "-m", "rsclip_jax", *launch, *train_command(sweep, run)]


def run_local(sweep: Sweep, todo: list[Run], launcher_args: list[str], args: argparse.Namespace) -> int:
    if launcher_args:
        _launch_args("local", launcher_args, train_command(sweep, todo[0]))  # bad options fail before anything runs
    parallel = args.max_parallel or 1
    jobs = [(run.name, Process(local_argv(sweep, run, launcher_args), dict(os.environ), os.path.join(run.workdir, LOG)))
            for run in todo]
    if args.dry_run:
        sys.stdout.write("".join(f"{shlex.join(p.argv)} >> {shlex.quote(p.log)} 2>&1\n" for _, p in jobs))
        return 0
    _build_shared_data(sweep, todo)
    say(f"running {len(todo)} run(s), {parallel} at a time; each run's log: ROOT/NAME/{LOG}")
    start = time.monotonic()
    code = JobQueue(jobs, parallel, args.fail_fast,
                    on_start=lambda i: write_record(sweep, todo[i], ["rsclip", *jobs[i][1].argv[3:]]),
                    on_exit=lambda i, rc, stopped: write_status(todo[i], rc, stopped)).run()
    return _report(sweep, code, time.monotonic() - start)


# Runs ensure_train_data in a fresh interpreter: JAX must not start in this process, which forks the runs.
_PREPARE = """import sys
from rsclip_jax.train.config import load_config
from rsclip_jax.train.setup import ensure_train_data
try:
    ensure_train_data(load_config(sys.argv[1], sys.argv[2:]))
except (ValueError, OSError) as e:
    sys.exit(f"rsclip sweep: error: {e}")
"""


def _build_shared_data(sweep: Sweep, todo: list[Run]) -> None:
    """Builds each `data.build_from` dataset once, before the runs would all build it at the same time."""
    done = set()
    for run in todo:
        data = run.config.data
        if data.build_from and data.train not in done:
            if subprocess.run([sys.executable, "-c", _PREPARE, sweep.config, *run.args]).returncode:
                raise ValueError(f"{run.name}: could not build config.data.train={data.train} from "
                                 f"config.data.build_from (see above); nothing was launched")
            done.add(data.train)


def _report(sweep: Sweep, code: int, seconds: float) -> int:
    """The sweep's ending: every run's status; non-zero unless every run finished."""
    statuses = [run_status(r) for r in sweep.runs]
    done = sum(s.state == "completed" for s in statuses)
    say(f"{sweep.name}: {done} of {len(statuses)} runs finished ({seconds:.0f} s)")
    for run, status in zip(sweep.runs, statuses):
        if status.state != "completed":
            say(f"  {run.name}: {status}")
    if code:
        return code
    if done < len(statuses):
        say("rerun the same command to run or resume the others")
        return 1
    say(f"collect the results with: rsclip sweep {sweep.path} --collect"
        + (f" --root {sweep.root}" if sweep.root != os.path.join("runs", sweep.name) else ""))
    return 0


# -- SLURM and TPU: the `rsclip launch` launchers, once per run -------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, raised, not argparse's usage + exit 2
        raise ValueError(f"--launcher-args: {message}")


def _launch_args(launcher: str, options: Sequence[str], command: Sequence[str]) -> argparse.Namespace:
    """`rsclip launch LAUNCHER OPTIONS -- COMMAND` parsed by that command's own parser."""
    parser = _Parser(prog="rsclip")
    launch_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["launch", launcher, *options, "--", *command])


def run_cluster(sweep: Sweep, todo: list[Run], launcher_args: list[str], args: argparse.Namespace) -> int:
    if args.launcher == "tpu" and (args.max_parallel or 1) > 1:
        raise ValueError("--max-parallel: a TPU slice runs the sweep's runs one after another; leave it out")
    if args.fail_fast:
        raise ValueError("--fail-fast is for --launcher local (SLURM jobs and TPU runs are started one by one)")
    runs = [(run, _launch_args(args.launcher, launcher_args, train_command(sweep, run))) for run in todo]
    records = not args.dry_run
    failed = []
    for i, (run, largs) in enumerate(runs):
        largs.dry_run = args.dry_run
        if args.launcher == "slurm":
            if args.max_parallel:
                slot = run.index % args.max_parallel
                base = sweep.name if largs.job_name == "rsclip" else largs.job_name
                largs.job_name = f"{base}-{slot}"
                largs.sbatch_arg = [*largs.sbatch_arg, "--dependency=singleton"]
            elif largs.job_name == "rsclip":
                largs.job_name = sweep.name
        elif i > 0:
            largs.no_sync = True  # the code was copied to the workers for the first run
        if args.dry_run:
            sys.stdout.write(f"# run {i + 1}/{len(runs)}: {run.name}\n")
            sys.stdout.flush()
        elif records:
            write_record(sweep, run, ["rsclip", *train_command(sweep, run)])
        code = largs.func(largs)
        if code:
            say(f"{run.name}: the launcher exited with code {code}")
            failed.append(run.name)
    if failed:
        say(f"{len(failed)} of {len(runs)} run(s) not launched: {', '.join(failed)}")
        return 1
    return 0


# -- collect ------------------------------------------------------------------------------------------


def collect(sweep: Sweep, args: argparse.Namespace) -> int:
    collected = sweep_collect.collect(sweep, args.metric, args.mode)
    paths = sweep_collect.write_results(sweep, collected)
    sys.stdout.write(sweep_collect.markdown(sweep, collected))
    say(f"wrote {', '.join(paths)}")
    say(sweep_collect.best_line(sweep, collected))
    return 0
