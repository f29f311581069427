"""One live `rsclip train` per workdir: an exclusive lock naming its owner.

`WORKDIR/.lock` is locked with `fcntl.flock` for the life of the run; the kernel (or the NFS
server) drops the lock when the process dies in any way, kill -9 included, so a lock can never be
left held by a dead run. Who holds it (host, pid, start time) is recorded beside it, atomically,
in `WORKDIR/.lock.owner.json`, for the message a second run prints when it is refused. A record
left behind with no lock held is the trace of a run that died without releasing: the next run
takes the lock over and says whose it was. The `.lock` file itself is never removed (removing a
flocked file lets two runs lock two different files under one name).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from rsclip_jax.fileio import atomic_write_json

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner.json"


class WorkdirLockedError(OSError):
    """Another live run holds the workdir."""


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "an unknown process (no owner record)"
    started = owner.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {when}"


def _read_owner(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """`acquire()` or raise `WorkdirLockedError`; `release()` is idempotent."""

    def __init__(self, workdir: str, log: Any = None) -> None:
        self.workdir = workdir
        self.lock_path = os.path.join(workdir, LOCK_NAME)
        self.owner_path = os.path.join(workdir, OWNER_NAME)
        self._fd: int | None = None
        self._log = log or (lambda msg: None)

    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = _read_owner(self.owner_path)
            raise WorkdirLockedError(
                f"{self.workdir} is in use by another live run ({_describe(owner)}); wait for it to finish or stop "
                f"it (its pid on its host), or use another --workdir") from None
        self._fd = fd
        previous = _read_owner(self.owner_path)
        if previous is not None:
            same_host = previous.get("host") == socket.gethostname()
            pid = previous.get("pid")
            state = ("not alive" if isinstance(pid, int) and not _pid_alive(pid) else "no longer holding it") \
                if same_host else "no longer holding it"
            self._log(f"taking over the stale lock of {self.workdir} left by {_describe(previous)} ({state})")
        atomic_write_json(self.owner_path, {"host": socket.gethostname(), "pid": os.getpid(),
                                            "started_at": time.time()})
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.owner_path)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
