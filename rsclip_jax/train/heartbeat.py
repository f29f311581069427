"""A per-process heartbeat file, so a launcher can tell a stopped or stuck process from a slow one.

`rsclip launch local` sets `RSCLIP_HEARTBEAT_DIR`; each process then keeps the file
`$RSCLIP_HEARTBEAT_DIR/process_<i>` fresh (its text: the phase it is in), and the launcher takes the
job down when one grows older than `--heartbeat-timeout`. Without the variable every call here does
nothing.

Two ways of beating:
- in the background, from a thread every couple of seconds, through phases the process cannot
  interrupt: joining the job, building data, restoring, the first step's compilation, evaluations,
  saves (`background(phase)`, or `keepalive(phase)` for a block). A stopped process's threads stop
  too, so SIGSTOP is still seen; a deadlock inside such a phase is left to JAX's own heartbeat;
- in the foreground: once training steps (`foreground()`), only `beat()`, at every step, counts, so a
  process stopped or stuck in a collective stops beating. One `os.utime` per step.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

ENV_DIR = "RSCLIP_HEARTBEAT_DIR"
INTERVAL_SECONDS = 2.0

_path: str | None = None
_thread: threading.Thread | None = None
_stop = threading.Event()


def heartbeat_path(directory: str, process_id: int) -> str:
    """The heartbeat file of process `process_id`."""
    return os.path.join(directory, f"process_{process_id}")


def configure(process_id: int) -> str | None:
    """Starts this process's heartbeat when the launcher asked for one; returns its path."""
    global _path
    directory = os.environ.get(ENV_DIR)
    _path = heartbeat_path(directory, process_id) if directory else None
    beat("start")
    return _path


def beat(phase: str | None = None) -> None:
    """Marks progress; with `phase`, also records what the process is doing (for the launcher's message)."""
    if _path is None:
        return
    try:
        if phase is None:
            os.utime(_path)
        else:
            with open(_path, "w", encoding="utf-8") as f:
                f.write(phase)
    except OSError:
        pass  # a heartbeat must never stop training; a missing beat is what the launcher reports


def _run() -> None:
    while not _stop.wait(INTERVAL_SECONDS):
        beat()


def background(phase: str) -> None:
    """Beats from a thread from now on (until `foreground`), through a phase without steps."""
    global _thread
    if _path is None:
        return
    beat(phase)
    if _thread is None:
        _stop.clear()
        _thread = threading.Thread(target=_run, name="rsclip-heartbeat", daemon=True)
        _thread.start()


def foreground(phase: str) -> None:
    """Stops the background beats: from now on only `beat()` calls count."""
    global _thread
    if _thread is not None:
        _stop.set()
        _thread.join()
        _thread = None
    beat(phase)


@contextlib.contextmanager
def keepalive(phase: str) -> Iterator[None]:
    """Background beats while the block runs; afterwards back to how it was."""
    if _path is None:
        yield
        return
    was_background = _thread is not None
    background(phase)
    try:
        yield
    finally:
        if was_background:
            beat(f"after {phase}")
        else:
            foreground(f"after {phase}")
