"""The process environment rsclip runs JAX in: malloc backed by transparent huge pages on Linux.

Why: XLA on CPU allocates its scratch buffer afresh for every step (`mmap`, then `munmap`: 2.3 GiB
for a ViT-B/32 train step at batch 32), and with 4 KiB pages the kernel takes about 614,000 page
faults to hand it back, every step: 1.3-1.6 s of system CPU on 2 cores, and more when faults are
expensive (a VM whose host has reclaimed the memory). `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
makes malloc ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`), which takes the faults
down to about 1,500 per step and the system CPU to 0.3 s (docs/performance.md, "Optimisation log").

glibc reads its tunables only when a process starts, so the `rsclip` command (and
`python -m rsclip_jax`, which is what the launcher's processes run) restarts itself once with
them, before anything heavy is imported; bench/train_step.py starts both of its sides with them. A user's own
`glibc.malloc.hugetlb` setting is left alone, and `RSCLIP_HUGEPAGE_MALLOC=0` turns all of this off.
It changes nothing where the C library is not glibc (the tunable is then ignored) or where the
kernel has transparent huge pages set to `never`.

This module imports nothing beyond the standard library: it runs before JAX.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "RSCLIP_HUGEPAGE_MALLOC"  # "0": start processes with the C library's defaults


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES, unless opted out or already set.

    Other tunables in GLIBC_TUNABLES are kept; a `glibc.malloc.hugetlb` the user chose wins.
    """
    out = dict(env)
    if out.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return out
    tunables = out.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":")):
        return out
    out["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
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
