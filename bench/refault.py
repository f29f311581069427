"""What touching freshly mapped memory costs on this host, right after a free and after an idle gap.

    python bench/refault.py                      # 2 GiB, gaps 0 0 0 10 0 0 10 s
    python bench/refault.py --mib 512 --gaps 0,5,0 --no-huge

Why: XLA on CPU maps its scratch buffer afresh for every step and unmaps it afterwards (2 GiB for
a ViT-B/32 step at batch 32). On bare metal the kernel hands those pages back for the cost of
zeroing them. In a VM that returns freed memory to its host (virtio-balloon free page reporting;
`/sys/module/page_reporting` exists), pages freed a few seconds ago are gone from the guest, and
touching them again costs a fault on the host as well. A training step that runs right after
another process's step (bench/train_step.py alternates ours with open_clip) pays that; steps back
to back do not. docs/performance.md ("Why the alternating series is slower") has the numbers.

Each round sleeps its gap, maps `--mib` MiB (with `MADV_HUGEPAGE` unless `--no-huge`, as
`rsclip`'s malloc does, rsclip_jax/hostenv.py), writes one byte per 4 KiB page, and unmaps it;
it reports the seconds, the minor page faults, the system CPU and, where the kernel reports free
pages to a host, how many KiB its `page_reporting` counter rose meanwhile (a host can also reclaim
free guest memory by other paths this counter does not see: the touch time is the measurement).
"""

from __future__ import annotations

import argparse
import mmap
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")  # free page reporting, where present


def _reported_kib() -> int | None:
    try:
        return int(REPORTED.read_text())
    except (OSError, ValueError):
        return None


def touch_round(mib: int, huge: bool) -> dict[str, Any]:
    """Maps `mib` MiB, writes one byte per 4 KiB page, unmaps it; returns the time and faults it took."""
    region = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            region.madvise(mmap.MADV_HUGEPAGE)
        pages = np.frombuffer(region, dtype=np.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        pages[::4096] = 1
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        del pages  # the buffer export must end before the map can close
    finally:
        region.close()
    return {"seconds": seconds, "minor_faults": after.ru_minflt - before.ru_minflt,
            "system_cpu_s": after.ru_stime - before.ru_stime}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=2048, help="MiB mapped and touched per round")
    p.add_argument("--gaps", default="0,0,0,10,0,0,10", help="comma-separated idle seconds before each round")
    p.add_argument("--no-huge", action="store_true", help="4 KiB pages (no MADV_HUGEPAGE)")
    p.add_argument("--json", default=None, help="also write the rounds as JSON here")
    args = p.parse_args(argv)
    try:
        gaps = [float(g) for g in args.gaps.split(",")]
    except ValueError:
        p.error(f"--gaps {args.gaps!r}: give idle seconds separated by commas, e.g. 0,0,10")
    if args.mib < 1 or any(g < 0 for g in gaps):
        p.error("--mib must be >= 1 and every gap >= 0")
    rounds = []
    for gap in gaps:
        time.sleep(gap)
        reported = _reported_kib()
        row = {"gap_s": gap, **touch_round(args.mib, not args.no_huge)}
        if reported is not None:
            row["reported_kib"] = _reported_kib() - reported  # during the gap and the round
        rounds.append(row)
    print(f"{args.mib} MiB per round, {'4 KiB pages' if args.no_huge else 'MADV_HUGEPAGE'}; free page reporting "
          f"to a host: {'yes' if _reported_kib() is not None else 'not found'} ({REPORTED})\n")
    reporting = "reported_kib" in rounds[0]
    print("| idle gap s | touch s | minor faults | system CPU s |" + (" KiB reported to the host |" if reporting else ""))
    print("|---|---|---|---|" + ("---|" if reporting else ""))
    for r in rounds:
        print(f"| {r['gap_s']:g} | {r['seconds']:.3f} | {r['minor_faults']} | {r['system_cpu_s']:.2f} |"
              + (f" {r['reported_kib']} |" if reporting else ""))
    # the first round also pays for growing the process, so it is left out of both medians
    warm, idle = [r["seconds"] for r in rounds[1:] if r["gap_s"] == 0], [r["seconds"] for r in rounds if r["gap_s"]]
    if warm and idle:
        print(f"\nmedian touch after an idle gap / back to back: {statistics.median(idle):.3f} s / "
              f"{statistics.median(warm):.3f} s = {statistics.median(idle) / statistics.median(warm):.1f}x")
    result = {"mib": args.mib, "huge": not args.no_huge, "rounds": rounds}
    if args.json:
        from rsclip_jax.fileio import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
