"""The model to evaluate, with a description of where it came from (for the report)."""

from __future__ import annotations

from typing import Any

from rsclip_jax.checkpoint import load_checkpoint_with_info
from rsclip_jax.models import CLIP


def load_model(checkpoint: str, model: str | None = None, dtype: str = "float32", step: int | None = None,
               best: bool = False) -> tuple[CLIP, dict[str, Any]]:
    """Loads weights for evaluation (see `rsclip_jax.checkpoint.load_checkpoint_with_info`).

    Args:
        checkpoint: an OpenCLIP/RemoteCLIP `.pt`/`.pth`/`.bin`/`.safetensors` file, or an rsclip
            training workdir.
        model: architecture name; None uses the recorded architecture, else infers it.
        dtype: compute dtype.
        step, best: for a workdir, which checkpoint (default: the latest).

    Returns:
        (model, description: checkpoint path, format, architecture, step for a workdir).
    """
    clip, info = load_checkpoint_with_info(checkpoint, model, step=step, best=best, dtype=dtype)
    info["dtype"] = dtype
    return clip, info
