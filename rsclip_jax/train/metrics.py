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


def _transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Matmul FLOPs of `layers` pre-LN blocks on one sequence (q/k/v/out, scores, values, MLP)."""
    t, w, m = tokens, width, int(width * mlp_ratio)
    return layers * (8 * t * w * w + 4 * t * w * m + 4 * t * t * w)


def _resnet_flops(v: Any, embed_dim: int) -> float:
    conv = lambda r, k, cin, cout: 2 * r * r * k * k * cin * cout  # noqa: E731
    w, r = v.width, v.image_size // 2
    total = conv(r, 3, 3, w // 2) + conv(r, 3, w // 2, w // 2) + conv(r, 3, w // 2, w)
    r, cin = r // 2, w
    for stage, (blocks, mult) in enumerate(zip(v.layers, (1, 2, 4, 8))):
        planes = w * mult
        for j in range(blocks):
            stride = 2 if (j == 0 and stage > 0) else 1
            r_out = r // stride
            total += conv(r, 1, cin, planes) + conv(r, 3, planes, planes) + conv(r_out, 1, planes, 4 * planes)
            if j == 0:
                total += conv(r_out, 1, cin, 4 * planes)  # downsample branch
            r, cin = r_out, 4 * planes
    tokens, c = r * r + 1, cin
    return total + 2 * tokens * c * c * 2 + 2 * c * c + 4 * tokens * c + 2 * c * embed_dim


def model_flops_per_step(config: Any, batch_size: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), counted analytically.

    XLA's cost analysis counts a `lax.scan` body once, not once per layer, so it cannot be used with
    scanned layers. Rematerialisation and the GradCache re-embedding are not counted (the usual
    MFU convention).
    """
    v, t = config.vision, config.text
    text = _transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * config.embed_dim
    if v.is_resnet:
        vision = _resnet_flops(v, config.embed_dim)
    else:
        grid = v.image_size // v.patch_size
        vision = (2 * grid * grid * 3 * v.patch_size**2 * v.width
                  + _transformer_flops(grid * grid + 1, v.width, v.layers, v.mlp_ratio) + 2 * v.width * config.embed_dim)
    return 3.0 * batch_size * (vision + text)


def peak_flops_per_device() -> float | None:
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
