"""The model to evaluate, with a description of where it came from (for the report)."""

from __future__ import annotations

import os
from typing import Any

from rsclip_jax.models import CLIP


def load_model(checkpoint: str, model: str | None = None, dtype: str = "float32") -> tuple[CLIP, dict[str, Any]]:
    """Loads weights for evaluation with `rsclip_jax.checkpoint.load_checkpoint`.

    Args:
        checkpoint: an OpenCLIP/RemoteCLIP `.pt`/`.pth`/`.bin`/`.safetensors` file, or an rsclip
            training workdir (its latest checkpoint; the architecture comes from its config).
        model: architecture name; None infers it (from the shapes, or the workdir's config).
        dtype: compute dtype (files only; a workdir keeps its training dtype).

    Returns:
        (model, description: checkpoint path, format, architecture, step for a workdir).

    Raises:
        CheckpointMismatchError: naming the checkpoint, when weights and architecture disagree.
        FileNotFoundError: for a missing path, or a directory that is not a training workdir.
    """
    from rsclip_jax.checkpoint import load_checkpoint
    from rsclip_jax.models.config import config_name

    info: dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint)}
    if os.path.isdir(checkpoint):
        if not os.path.isdir(os.path.join(checkpoint, "checkpoints")):
            raise FileNotFoundError(f"{checkpoint}: a directory but not an rsclip training workdir (no checkpoints/)")
        from rsclip_jax.train.checkpointing import Checkpointer

        checkpointer = Checkpointer(checkpoint, use_async=False)
        info.update(format="rsclip-workdir", step=checkpointer.latest_step())
        checkpointer.close()
        clip = load_checkpoint(checkpoint, model=model)
    elif os.path.exists(checkpoint):
        info.update(format="openclip", dtype=dtype)
        clip = load_checkpoint(checkpoint, model=model, dtype=dtype)
    else:
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint file or workdir")
    info["model"] = model or config_name(clip.config) or "inferred from the weights"
    return clip, info
