"""The one atomic write of the project: write a temporary file beside the target, fsync, rename.

A reader (another process, a resumed run, a user's tool) sees either the old file or the new one,
never half of one, and a crash leaves no partial file behind under the target name.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "temporary_name"]


def temporary_name(path: str | os.PathLike) -> Path:
    """A unique hidden name in `path`'s folder (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` for a fresh temporary file next to `path`, fsyncs it, then renames it.

    Missing parent folders are created (the rule of every rsclip output path).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically writes UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """Atomically writes `obj` as JSON (indent 2 unless given), with a final newline."""
    dump_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")
