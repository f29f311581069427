"""bench/gpu_suite.sh --dry-run: the GPU suite's every step, on CPU with tiny shapes; and bench/refault.py.

The suite is the one prepared script a GPU session runs; this keeps it working between those
sessions. Nothing here is timed: the assertions are on what the suite writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_writes_every_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run on CPU" in summary
    side_by_side = json.loads((tmp_path / "train_step_cpu_tiny-ViT_bfloat16_b8.json").read_text())
    assert set(side_by_side["sides"]) == {"rsclip_jax", "open_clip"}
    assert len(side_by_side["ratios"]) == 2 and side_by_side["median_ratio"] > 0
    assert "median" in summary and "open_clip" in summary
    for remat in ("none", "dots_saveable", "full"):
        sweep = json.loads((tmp_path / f"train_step_cpu_tiny-ViT_bfloat16_b8_remat-{remat}.json").read_text())
        assert sweep["remat"] == [remat, remat] and list(sweep["sides"]) == ["rsclip_jax"]
        assert sweep["model_flops_per_step"] > 0 and sweep["sides"]["rsclip_jax"]["samples_per_s"] > 0
    assert sweep["scan"] == [True, True] and sweep["loss"] == "clip" and sweep["loss_chunk_size"] == 0
    for label, key, value in (("unrolled", "scan", [False, False]), ("loss-chunked", "loss_chunk_size", 4),
                              ("loss-siglip", "loss", "siglip")):
        run = json.loads((tmp_path / f"train_step_cpu_tiny-ViT_bfloat16_b8_{label}.json").read_text())
        assert list(run["sides"]) == ["rsclip_jax"] and run["sides"]["rsclip_jax"]["samples_per_s"] > 0
        assert run[key] == value
    extraction = json.loads((tmp_path / "eval_throughput.json").read_text())
    assert extraction["batch"] == 8 and extraction["ratio"] > 0
    assert "## Evaluation throughput" in summary and "extraction time / pure" in summary
    assert "## Input pipeline" in summary and "| LoaderConfig | images/s |" in summary


def test_refault_probe_measures_every_round_and_rejects_bad_gaps(tmp_path):
    out = tmp_path / "refault.json"
    proc = subprocess.run([sys.executable, "bench/refault.py", "--mib", "16", "--gaps", "0,0,0.2", "--no-huge",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["gap_s"] for r in result["rounds"]] == [0, 0, 0.2] and result["huge"] is False
    # every round maps fresh memory, so it faults at least once per 2 MiB, whatever the page size
    assert all(r["seconds"] > 0 and r["minor_faults"] >= 8 for r in result["rounds"])
    assert "| idle gap s | touch s |" in proc.stdout and "median touch after an idle gap" in proc.stdout
    bad = subprocess.run([sys.executable, "bench/refault.py", "--gaps", "0,soon"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "--gaps '0,soon'" in bad.stderr
