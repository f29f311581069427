"""The process environment rsclip runs JAX in: glibc's malloc tuned for XLA's per-step scratch.

Why: XLA on CPU allocates its scratch buffer afresh for every step (2 GiB for a ViT-B/32 train
step at batch 32). Left to glibc's defaults, a block that large is `mmap`ed and `munmap`ed every
step, and the kernel hands it back page by page:
- with 4 KiB pages, about 614,000 page faults per step, 1.3-1.6 s of system CPU on 2 cores;
  `glibc.malloc.hugetlb=1` (malloc asks for transparent huge pages) takes that to about 1,500;
- on a VM that returns free memory to its host (free page reporting), even those cost seconds
  once the memory has lain free for a moment (`bench/refault.py` measures it).
  `glibc.malloc.mmap_max=0` with a `trim_threshold` no heap reaches keeps large blocks in the
  heap of the thread that asks, and keeps the heap from shrinking: a step that runs on the
  process's main thread (`rsclip train`'s default on CPU, config key `cpu_async_dispatch`) reuses
  the same scratch every step, with no faults at all (docs/performance.md, "Optimisation log").
Secondary threads (XLA's own) still get blocks that large from `mmap`, whatever the setting.

glibc reads its tunables only when a process starts, so the `rsclip` command (and
`python -m rsclip_jax`, which is what the launcher's processes run) restarts itself once with
them, before anything heavy is imported; bench/train_step.py starts both of its sides with them.
Each tunable a user set in GLIBC_TUNABLES is left alone, and `RSCLIP_HUGEPAGE_MALLOC=0` turns all
of this off. It changes nothing where the C library is not glibc (the tunables are then ignored);
huge pages need the kernel's transparent huge pages not set to `never`.

This module imports nothing beyond the standard library: it runs before JAX.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

# name -> value; a step's memory kept in the heap is never given back to the system (its peak stays)
TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
OPT_OUT = "RSCLIP_HUGEPAGE_MALLOC"  # "0": start processes with the C library's defaults


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with rsclip's `TUNABLES` added to GLIBC_TUNABLES, unless opted out.

    Other tunables in GLIBC_TUNABLES are kept, and one of `TUNABLES` the user set wins over ours.
    """
    out = dict(env)
    if out.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return out
    tunables = out.get("GLIBC_TUNABLES", "")
    chosen = {item.split("=", 1)[0] for item in tunables.split(":")}
    ours = [f"{name}={value}" for name, value in TUNABLES.items() if name not in chosen]
    if ours:
        out["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *ours]))
    return out


def restart_with_process_env() -> None:
    """Re-executes this very command line under `process_env(os.environ)`, if that differs.

    Call it first thing in an entry point, before JAX (or anything that allocates much) is
    imported: the restart costs one interpreter start. It happens at most once, since the new
    environment already holds the tunable; it never happens off glibc.
    """
    env = process_env(os.environ)
    if (env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES") or platform.libc_ver()[0] != "glibc"
            or not sys.executable):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv replays the command exactly as started: interpreter options, -m or -c, script path
    os.execve(sys.executable, sys.orig_argv, env)
