"""Metric output: `metrics.jsonl` (one JSON object per logged step) and TensorBoard.

Only process 0 writes. On resume, records past the restored step are dropped first: they were
logged after the last checkpoint by the interrupted run and will be produced again, identically.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices (e.g. CPUs) report no MFU.
_PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of this job's devices: `override_tflops` (config
    `peak_tflops_per_device`) when set, else the table's value for the device kind, else None."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for prefix, flops in _PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


class MetricWriter:
    """Appends metrics to `workdir/{metrics,eval_metrics}.jsonl` and TensorBoard (`workdir/tb`)."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.paths = {
            "train": os.path.join(workdir, "metrics.jsonl"),
            "eval": os.path.join(workdir, "eval_metrics.jsonl"),
        }
        self._tb = None
        if not self.active:
            return
        for path in self.paths.values():
            _truncate_after(path, resume_step)
        try:
            # tensorboardX is a listed dependency, but a trimmed install may lack it: jsonl suffices.
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard output is optional; jsonl is the record of truth
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.active:
            return
        with open(self.paths[kind], "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _record_step(line) <= step]  # a line cut short by kill -9: dropped
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _record_step(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not a complete record."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
