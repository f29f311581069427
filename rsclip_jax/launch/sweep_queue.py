"""A local queue of independent jobs, at most K at once: how `rsclip sweep --launcher local` runs.

Unlike the `Supervisor` (the processes of ONE job, which stand or fall together), the jobs here are
separate runs: one failing does not stop the others (unless `fail_fast`). Each job runs in its own
process group (a new session, killed with this process, as the supervisor starts its processes)
with its output appended to its own log after a header line. SIGINT or SIGTERM
to the queue is forwarded once to every running job (each saves a checkpoint and exits); no new
job starts; a second one kills them. Whatever is left in a job's group is killed at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from rsclip_jax.launch.supervisor import POLL_SECONDS, Process, Supervisor, _die_with_parent, describe_exit

TAIL_LINES = 8


def spawn(p: Process, header: str) -> None:
    """Starts `p` in its own session, its output appended to its log after one header line."""
    os.makedirs(os.path.dirname(os.path.abspath(p.log)), exist_ok=True)
    with open(p.log, "ab") as log:  # the child keeps its own descriptor
        log.write(f"==== {header} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(p.argv)}\n".encode())
        log.flush()
        p.popen = subprocess.Popen(p.argv, env=p.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_die_with_parent)
    p.started = time.monotonic()


def tail(path: str, lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a log (empty when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            return f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


class JobQueue:
    """Runs `jobs` (name, process) at most `max_parallel` at once; `on_start(index)` is called just
    before each one starts, `on_exit(index, code, stopped)` as it exits (`stopped`: the queue had
    told it to stop)."""

    def __init__(self, jobs: Sequence[tuple[str, Process]], max_parallel: int, fail_fast: bool = False,
                 on_start: Callable[[int], None] | None = None,
                 on_exit: Callable[[int, int, bool], None] | None = None, out: IO[str] | None = None) -> None:
        self.jobs = list(jobs)
        self.max_parallel = max_parallel
        self.fail_fast = fail_fast
        self.on_start = on_start
        self.on_exit = on_exit
        self.out = out or sys.stderr
        self._signals: list[int] = []
        self._stopped: set[int] = set()

    def say(self, message: str) -> None:
        print(f"rsclip sweep: {message}", file=self.out, flush=True)

    def run(self) -> int:
        """0 when every job was run (whatever their exit codes), 128 + signal after SIGINT/SIGTERM,
        1 when `fail_fast` stopped the queue at a failure."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for _, p in self.jobs:
                if p.popen is not None:
                    Supervisor._signal_group(p, signal.SIGKILL)
                    if p.returncode is None:
                        p.returncode = p.popen.wait()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _running(self) -> list[int]:
        return [i for i, (_, p) in enumerate(self.jobs) if p.popen is not None and p.returncode is None]

    def _run(self) -> int:
        pending = list(range(len(self.jobs)))
        forwarded, failed, stopping = 0, False, False
        while pending or self._running():
            if len(self._signals) > forwarded:
                if forwarded == 0:
                    name = signal.Signals(self._signals[0]).name
                    self.say(f"{name}: forwarded to the {len(self._running())} running run(s) (each saves a "
                             f"checkpoint and exits); {len(pending)} not started; send it again to stop them now")
                    self._stop(self._signals[0], group=False)
                    pending = []
                else:
                    self.say(f"{signal.Signals(self._signals[-1]).name} again: killing the running runs")
                    self._stop(signal.SIGKILL, group=True)
                forwarded = len(self._signals)
            while pending and len(self._running()) < self.max_parallel:
                i = pending.pop(0)
                name, p = self.jobs[i]
                if self.on_start is not None:
                    self.on_start(i)
                spawn(p, f"rsclip sweep: {name}")
                self.say(f"started {name} ({i + 1}/{len(self.jobs)}); log: {p.log}")
            for i in self._running():
                code = self.jobs[i][1].popen.poll()
                if code is not None:
                    failed |= self._exited(i, code) and self.fail_fast
            if failed and not stopping:
                stopping = True
                self.say(f"--fail-fast: stopping the {len(self._running())} running run(s) (each saves a checkpoint); "
                         f"{len(pending)} not started")
                pending = []
                self._stop(signal.SIGTERM, group=False)
            time.sleep(POLL_SECONDS)
        if self._signals:
            return 128 + self._signals[0]
        return 1 if failed else 0

    def _exited(self, i: int, code: int) -> bool:
        """Reports a job's exit; whether it failed."""
        name, p = self.jobs[i]
        p.returncode, p.exited = code, time.monotonic()
        stopped = i in self._stopped
        if self.on_exit is not None:
            self.on_exit(i, code, stopped)
        seconds = p.exited - p.started
        if code == 0 or stopped:
            self.say(f"{name} {describe_exit(code)} after {seconds:.0f} s")
            return False
        self.say(f"{name} {describe_exit(code)} after {seconds:.0f} s; its log: {p.log}")
        for line in tail(p.log):
            if line.startswith("==== "):
                continue  # the header: the command, already known
            print(f"  [{name}] {line}", file=self.out)
        self.out.flush()
        return True

    def _stop(self, signum: int, group: bool) -> None:
        """Sends `signum` to every running job: to the process only (it saves, and its data
        workers keep feeding the save), or to its whole group."""
        for i in self._running():
            self._stopped.add(i)
            p = self.jobs[i][1]
            if group:
                Supervisor._signal_group(p, signum)
            else:
                try:
                    p.popen.send_signal(signum)
                except ProcessLookupError:
                    pass
