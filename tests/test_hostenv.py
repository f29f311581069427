"""The process environment `rsclip` restarts itself in: glibc's malloc on transparent huge pages.

The speed it buys is measured in bench/train_step.py (docs/performance.md); these tests check the
mechanism: the environment rule, the single restart, and that glibc then really backs a large
allocation with huge pages (far fewer page faults), which is what the speed comes from.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from rsclip_jax.hostenv import OPT_OUT, process_env

linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                 reason="GLIBC_TUNABLES is glibc's, on Linux")


@linux_glibc
def test_process_env_adds_the_tunable_and_keeps_the_users_choices():
    assert process_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert process_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", "PATH": "/bin"}
    assert process_env(mine) == mine
    assert "GLIBC_TUNABLES" not in process_env({OPT_OUT: "0"})


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


RESTART = ("import os; print('start', flush=True); from rsclip_jax import hostenv; "
           "hostenv.restart_with_process_env(); print('tunables', os.environ.get('GLIBC_TUNABLES'))")


@linux_glibc
def test_restart_happens_once_and_only_when_needed():
    out = subprocess.run([sys.executable, "-c", RESTART], env=_clean_env(), capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out.count("start") == 2 and out.count("tunables glibc.malloc.hugetlb=1") == 1, out
    out = subprocess.run([sys.executable, "-c", RESTART], env=_clean_env(**{OPT_OUT: "0"}), capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out.count("start") == 1 and "tunables None" in out, out


TOUCH = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
p = libc.malloc(ctypes.c_size_t(size))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(p, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env: dict[str, str]) -> int:
    return int(subprocess.run([sys.executable, "-c", TOUCH], env=env, capture_output=True, text=True,
                              check=True).stdout)


@linux_glibc
def test_the_tunable_backs_large_allocations_with_huge_pages():
    mode_file = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = mode_file.read_text() if mode_file.exists() else "[never]"
    if "[never]" in mode:
        pytest.skip(f"transparent huge pages are off on this kernel ({mode_file}: {mode.strip()})")
    # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages, 128
    assert _faults(process_env(_clean_env())) < 5_000
    if "[madvise]" in mode:  # where the kernel only gives huge pages on request, the tunable is the difference
        assert _faults(_clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")) > 30_000
