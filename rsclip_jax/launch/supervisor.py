"""Runs the processes of one job and takes them all down as soon as one fails or stops progressing.

Every process runs in its own process group (so its children, e.g. data workers, go with it) and
writes its output to `LOG_DIR/process_<i>.log` (appended, one header line per launch); process 0's
output is also streamed to this terminal. The supervisor waits for every process and:

- when one exits non-zero or is killed by a signal, it names that process, its exit code or signal
  and its log, sends SIGTERM to the others' groups, SIGKILL after `kill_grace` seconds, and returns
  that process's code (128 + signal for a signal), never a survivor's;
- when one's heartbeat file (`rsclip_jax.train.heartbeat`) is older than `heartbeat_timeout` (a
  process stopped by SIGSTOP, or stuck), it names it, kills its group and the others the same way,
  and returns 124;
- SIGTERM or SIGINT to the supervisor is forwarded to every process once (preemption: each saves a
  checkpoint and exits 0, or 130 after SIGINT, which the supervisor returns as a clean
  interruption); a second one takes the job down.

After any ending, every group is sent SIGKILL, so no process is left behind.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from rsclip_jax.train import INTERRUPTED_EXIT_CODE, heartbeat

HUNG_EXIT_CODE = 124  # as coreutils' `timeout`
POLL_SECONDS = 0.25


@dataclasses.dataclass
class Process:
    """One process of the job: what to run and where its log goes."""

    argv: list[str]
    env: dict[str, str]
    log: str
    popen: Any = None
    started: float = 0.0
    exited: float | None = None  # time.monotonic() of its exit, from its waiter thread
    returncode: int | None = None


def describe_exit(code: int) -> str:
    """'exited with code 3' or 'was killed by signal 9 (SIGKILL)'."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    """A process's return code as a shell exit status (128 + signal for a signal)."""
    return 128 - code if code < 0 else code


def _is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (Linux /proc; False where it cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the supervisor dies (Linux), so a killed launcher
    leaves no orphans; elsewhere the process groups are the only guard."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


class Supervisor:
    """Starts `processes`, supervises them to the end, and returns the job's exit status."""

    def __init__(self, processes: Sequence[Process], heartbeat_dir: str | None = None,
                 heartbeat_timeout: float = 0.0, kill_grace: float = 10.0, stream: bool = True,
                 out: IO[str] | None = None) -> None:
        self.processes = list(processes)
        self.heartbeat_dir = heartbeat_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.kill_grace = kill_grace
        self.stream = stream
        self.out = out or sys.stderr
        self._changed = threading.Event()
        self._signals: list[int] = []
        self._threads: list[threading.Thread] = []

    def say(self, message: str) -> None:
        print(f"rsclip launch: {message}", file=self.out, flush=True)

    # -- starting -------------------------------------------------------------------------------

    def start(self) -> None:
        for i, p in enumerate(self.processes):
            os.makedirs(os.path.dirname(os.path.abspath(p.log)), exist_ok=True)
            log = open(p.log, "ab")
            log.write(f"==== rsclip launch {time.strftime('%Y-%m-%d %H:%M:%S')}: process {i}: "
                      f"{' '.join(p.argv)}\n".encode())
            log.flush()
            piped = self.stream and i == 0
            p.popen = subprocess.Popen(
                p.argv, env=p.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if piped else log, stderr=subprocess.PIPE if piped else subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
            p.started = time.monotonic()
            if piped:
                lock = threading.Lock()
                for pipe, echo in ((p.popen.stdout, sys.stdout), (p.popen.stderr, sys.stderr)):
                    self._thread(self._tee, pipe, log, echo, lock)
            else:
                log.close()  # the child holds its own descriptor
            self._thread(self._wait, p)

    def _thread(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    @staticmethod
    def _tee(pipe: IO[bytes], log: IO[bytes], echo: IO[str], lock: threading.Lock) -> None:
        """Copies process 0's output, line by line, to its log and to this terminal."""
        for line in iter(pipe.readline, b""):
            with lock:
                log.write(line)
                log.flush()
            try:
                echo.buffer.write(line)
                echo.flush()
            except (OSError, ValueError, AttributeError):
                pass  # the terminal went away; the log still gets everything
        pipe.close()

    def _wait(self, p: Process) -> None:
        p.returncode = p.popen.wait()
        p.exited = time.monotonic()
        self._changed.set()

    # -- supervising ----------------------------------------------------------------------------

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            return self._supervise()
        finally:
            self._kill_all_groups()
            for s, handler in previous.items():
                signal.signal(s, handler)
            for t in self._threads:
                t.join(timeout=5)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        self._changed.set()

    def _supervise(self) -> int:
        forwarded = 0
        while True:
            self._changed.wait(POLL_SECONDS)
            self._changed.clear()
            if len(self._signals) > forwarded:
                if forwarded == 0:
                    forwarded = len(self._signals)
                    name = signal.Signals(self._signals[0]).name
                    self.say(f"{name}: forwarded to every process (each saves a checkpoint and exits); "
                             "send it again to stop them now")
                    for p in self._running():  # the process only: its data workers keep feeding the save
                        p.popen.send_signal(self._signals[0])
                else:
                    signum = self._signals[-1]
                    self.say(f"{signal.Signals(signum).name} again: stopping every process")
                    self._stop(self._running())
                    return 128 + signum
            # After a forwarded Ctrl-C, `rsclip train` saves and exits 130 (interrupted): a clean stop.
            clean = (0, INTERRUPTED_EXIT_CODE) if forwarded and self._signals[0] == signal.SIGINT else (0,)
            failed = [p for p in self.processes if p.returncode not in (None, *clean)]
            if failed:
                first = min(failed, key=lambda p: p.exited)
                return self._fail(first)
            if all(p.returncode in clean for p in self.processes):
                codes = {p.returncode for p in self.processes}
                if codes != {0}:
                    self.say("interrupted: every process saved a checkpoint and stopped; rerun the same command "
                             "to resume")
                return max(codes)
            hung = self._hung()
            if hung is not None:
                return self._hang(*hung)

    def _running(self) -> list[Process]:
        return [p for p in self.processes if p.returncode is None]

    def _index(self, p: Process) -> int:
        return self.processes.index(p)

    def _fail(self, p: Process) -> int:
        i = self._index(p)
        self.say(f"process {i} {describe_exit(p.returncode)}; its log: {p.log}")
        self._tail(p)
        self._stop(self._running())
        self.say(f"exit status {exit_status(p.returncode)} (process {i}'s); every process's log is in "
                 f"{os.path.dirname(p.log)}")
        return exit_status(p.returncode)

    def _hung(self) -> tuple[Process, float, str] | None:
        """The process to blame when a heartbeat is older than the timeout: one stopped (SIGSTOP) if
        any, stale or not yet, else the stalest (the others are usually waiting for it in a
        collective). A process blocked in a collective can go stale before the stopped process it
        waits for: it stopped beating first, when the stopped one was still a step behind."""
        if not self.heartbeat_dir or self.heartbeat_timeout <= 0:
            return None
        now_wall, now = time.time(), time.monotonic()
        running = []
        for i, p in enumerate(self.processes):
            if p.returncode is not None:
                continue
            path = heartbeat.heartbeat_path(self.heartbeat_dir, i)
            try:
                age = now_wall - os.stat(path).st_mtime
                with open(path, encoding="utf-8") as f:
                    phase = f.read().strip() or "?"
            except OSError:
                age, phase = now - p.started, "starting (no heartbeat yet)"
            running.append((_is_stopped(p.popen.pid), age, p, phase))
        if not any(age > self.heartbeat_timeout for _, age, _, _ in running):
            return None
        stopped, age, p, phase = max(running, key=lambda s: (s[0], s[1]))
        return p, age, phase + ("; the process is stopped (SIGSTOP?)" if stopped else "")

    def _hang(self, p: Process, age: float, phase: str) -> int:
        i = self._index(p)
        self.say(f"process {i} made no progress for {age:.0f} s (--heartbeat-timeout {self.heartbeat_timeout:g}; "
                 f"last phase: {phase}): killing it; its log: {p.log}")
        self._signal_group(p, signal.SIGKILL)
        self._stop([q for q in self._running() if q is not p])
        self._tail(p)
        self.say(f"exit status {HUNG_EXIT_CODE} (process {i} hung); every process's log is in "
                 f"{os.path.dirname(p.log)}")
        return HUNG_EXIT_CODE

    def _tail(self, p: Process, lines: int = 8) -> None:
        if self.stream and p is self.processes[0]:
            return  # already on the terminal
        try:
            with open(p.log, "rb") as f:
                f.seek(max(0, os.path.getsize(p.log) - 8192))
                tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
        except OSError:
            return
        for line in tail:
            print(f"  [process {self._index(p)}] {line}", file=self.out)
        self.out.flush()

    def _stop(self, processes: list[Process]) -> None:
        """SIGTERM (and SIGCONT, so a stopped process can act on it), then SIGKILL after the grace."""
        if not processes:
            return
        for p in processes:
            self._signal_group(p, signal.SIGTERM)
            self._signal_group(p, signal.SIGCONT)
        deadline = time.monotonic() + self.kill_grace
        while any(p.returncode is None for p in processes) and time.monotonic() < deadline:
            self._changed.wait(POLL_SECONDS)
            self._changed.clear()
        late = [p for p in processes if p.returncode is None]
        for p in late:
            self._signal_group(p, signal.SIGKILL)
        stopped = ", ".join(f"{self._index(p)} ({'SIGKILL' if p in late else 'SIGTERM'})" for p in processes)
        self.say(f"stopped process{'es' if len(processes) > 1 else ''} {stopped}")
        for p in late:
            p.popen.wait()

    @staticmethod
    def _signal_group(p: Process, signum: int) -> None:
        try:
            os.killpg(p.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_all_groups(self) -> None:
        """Whatever is left in any process's group (its children) goes too."""
        for p in self.processes:
            if p.popen is None:
                continue
            self._signal_group(p, signal.SIGKILL)
            if p.returncode is None:
                p.popen.wait()
