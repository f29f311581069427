"""The one atomic write of the project: write a temporary file beside the target, fsync, rename.

A reader (another process, a resumed run, a user's tool) sees either the old file or the new one,
never half of one, and a crash leaves no partial file behind under the target name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["require_local_path", "atomic_files", "atomic_write", "atomic_write_folder", "atomic_write_text",
           "atomic_write_json", "atomic_write_npz", "temporary_name"]


def require_local_path(path: str | os.PathLike, what: str) -> None:
    """Refuses a URL (gs://, s3://, ...) where the project writes with the local filesystem.

    A training workdir holds a file lock, metrics and logs written with `open()`; given
    `gs://bucket/run`, `os.makedirs` would silently make a local folder named `gs:` instead.
    """
    if "://" in os.fspath(path):
        raise ValueError(
            f"{what} {os.fspath(path)}: a URL, but this is written with the local filesystem (lock, metrics, "
            "logs, checkpoints). Use a POSIX filesystem every host mounts (Filestore/NFS, Lustre) and pass its "
            "path; gcsfuse lacks the file locks the workdir needs")


def temporary_name(path: str | os.PathLike) -> Path:
    """A unique hidden name in `path`'s folder (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yields a fresh temporary name beside each of `paths`; when the block succeeds, each is
    fsynced and renamed onto its path, otherwise all are removed and no path is touched.

    For outputs written over a long job, several at once (`rsclip map`'s class map, probabilities
    and polygons). Missing parent folders are created (the rule of every rsclip output path).
    """
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmps = [temporary_name(path) for path in paths]
    try:
        yield tmps
        for tmp in tmps:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` for a fresh temporary file next to `path`, fsyncs it, then renames it."""
    with atomic_files(path) as (tmp,):
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically writes UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """Atomically writes `obj` as JSON (indent 2 unless given), with a final newline."""
    dump_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Atomically writes `np.savez(path, **arrays)` (at exactly `path`: no `.npz` is appended)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy appends no second .npz to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


def atomic_write_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> list[Path]:
    """Calls `write(staging)` for a fresh folder beside `folder`, then moves its files into `folder`.

    A new `folder` appears whole (one rename). Into an existing folder each file is renamed over
    its old version, so a reader sees every file old or new, never half written; files of the
    folder that `write` did not produce are left alone. If `write` fails nothing is published.
    Returns the published files.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(folder)
    staging.mkdir()
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
        if any((staging / n).is_dir() for n in names):
            raise ValueError(f"{folder}: atomic_write_folder publishes files only, not sub-folders")
        for name in names:
            fd = os.open(staging / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if not folder.exists():
            os.replace(staging, folder)
        else:
            for name in names:
                os.replace(staging / name, folder / name)
        return [folder / n for n in names]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
