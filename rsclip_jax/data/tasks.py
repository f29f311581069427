"""One rule for splitting work across hosts: `--task-index I --task-count N`.

`rsclip data build` and `rsclip embed` both take these flags, so a SLURM array, the tasks of one
srun step or every host of a TPU slice can each process a disjoint share of the same inputs. Every
task reads the same input list and takes the contiguous block `task_share` gives it, so the shares
concatenated in task order are the inputs in their original order, each exactly once.

`auto` (for either flag) reads the SLURM environment: an array job's SLURM_ARRAY_TASK_ID minus
SLURM_ARRAY_TASK_MIN out of SLURM_ARRAY_TASK_COUNT, else one step's SLURM_PROCID out of
SLURM_NTASKS. Explicit numbers always win over the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

TASK_FLAGS_HELP = ("split the work into N disjoint shares (by input position) and do share I (0 <= I < N); "
                   "'auto' reads SLURM_ARRAY_TASK_ID/_MIN/_COUNT or SLURM_PROCID/SLURM_NTASKS")


def add_task_args(p: argparse.ArgumentParser, merge_help: str) -> None:
    """Adds --task-index and --task-count (numbers or 'auto', checked by `resolve_run`) and --merge."""
    p.add_argument("--task-index", default=None, metavar="I|auto", help=TASK_FLAGS_HELP + " (default 0)")
    p.add_argument("--task-count", default=None, metavar="N|auto", help="how many tasks share the work (default 1)")
    p.add_argument("--merge", action="store_true", help="after all --task-count N tasks finished: " + merge_help)


def _slurm_task(environ: Mapping[str, str]) -> tuple[int, int]:
    """(index, count) of this process in a SLURM array or step; ValueError when there is none."""
    def number(name: str) -> int:
        try:
            return int(environ[name])
        except ValueError:
            raise ValueError(f"--task-index auto: ${name}={environ[name]!r} is not a number") from None

    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task_id, count = number("SLURM_ARRAY_TASK_ID"), number("SLURM_ARRAY_TASK_COUNT")
        low = number("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
        if not 0 <= task_id - low < count:
            # e.g. --array=0-10:2 (ids 0,2,...): ids minus the minimum are not 0..count-1
            raise ValueError(f"--task-index auto: SLURM array task {task_id} (min {low}, count {count}) is not one "
                             "of a contiguous range; submit the array as --array=0-(N-1) or give --task-index/"
                             "--task-count as numbers")
        return task_id - low, count
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return number("SLURM_PROCID"), number("SLURM_NTASKS")
    raise ValueError("--task-index/--task-count auto: no SLURM array or step in the environment "
                     "(SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or SLURM_PROCID/SLURM_NTASKS); give numbers")


def resolve_task(index: str | int | None, count: str | int | None,
                 environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(I, N) from the flags' values: numbers, 'auto', or None (absent: 0 of 1).

    Raises:
        ValueError: naming the flag, for a value that is not a number or 'auto', N < 1, I outside
            0..N-1, an index without a count (or the reverse), or 'auto' outside SLURM.
    """
    if index is None and count is None:
        return 0, 1
    if "auto" in (index, count):
        env_index, env_count = _slurm_task(os.environ if environ is None else environ)
        index = env_index if index in (None, "auto") else index
        count = env_count if count in (None, "auto") else count
    if index is None or count is None:
        given, missing = ("--task-index", "--task-count") if count is None else ("--task-count", "--task-index")
        raise ValueError(f"{given} needs {missing} too (or 'auto' for both under SLURM)")
    values = []
    for flag, value in (("--task-index", index), ("--task-count", count)):
        try:
            values.append(int(value))
        except (TypeError, ValueError):
            raise ValueError(f"{flag} {value!r}: expected a whole number or 'auto'") from None
    i, n = values
    if n < 1:
        raise ValueError(f"--task-count {n}: must be 1 or more")
    if not 0 <= i < n:
        raise ValueError(f"--task-index {i}: must be from 0 to {n - 1} for --task-count {n} (tasks count from 0)")
    return i, n


def resolve_run(index: str | int | None, count: str | int | None, merge: bool,
                environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(I, N) of a run of a command with --task-index/--task-count/--merge: a task's own, or for
    `--merge`, which combines all N tasks' work, (0, N).

    Raises:
        ValueError: as `resolve_task`; for --merge without --task-count or with --task-index.
    """
    if not merge:
        return resolve_task(index, count, environ)
    if index is not None:
        raise ValueError("--merge combines the work of every task; leave out --task-index")
    if count is None:
        raise ValueError("--merge needs --task-count N, the number of tasks the work was split into")
    return 0, resolve_task(0, count, environ)[1]


def task_share(total: int, index: int, count: int) -> range:
    """Positions of the `total` inputs that task `index` of `count` handles: a contiguous block,
    sizes differing by at most one, so the blocks in task order are 0..total-1 exactly once."""
    return range(index * total // count, (index + 1) * total // count)


def task_label(index: int, count: int) -> str:
    """The name a task's files carry, e.g. ``task-00001-of-00003``."""
    return f"task-{index:05d}-of-{count:05d}"
