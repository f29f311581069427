"""Checkpoint import and export: OpenCLIP/RemoteCLIP state_dicts as .pt/.pth/.bin or .safetensors.

Torch is never needed, and loading never executes code from the file (see `torch_format`).
"""

from __future__ import annotations

import os
from typing import Any

from rsclip_jax.checkpoint.openclip import (
    CheckpointMismatchError,
    export_state_dict,
    infer_config,
    load_state_dict_into,
    model_from_state_dict,
)
from rsclip_jax.checkpoint.torch_format import UnsafeCheckpointError, load_state_dict, save_state_dict
from rsclip_jax.models import CLIP, CLIPConfig


def load_checkpoint(path: str | os.PathLike, model: str | CLIPConfig | None = None, **create_kwargs: Any) -> CLIP:
    """Loads an OpenCLIP-format checkpoint file into a CLIP model.

    Args:
        path: `.pt`/`.pth`/`.bin` (torch zip pickle, read safely) or `.safetensors`.
        model: registry name or config; None infers the architecture from the shapes (QuickGELU).
        create_kwargs: `dtype`, `scan_layers`, `remat_policy` for the created model.
    """
    try:
        return model_from_state_dict(load_state_dict(path), model, **create_kwargs)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from None


def save_checkpoint(model: CLIP, path: str | os.PathLike) -> None:
    """Writes the model as an OpenCLIP-loadable state_dict (`.pt` or `.safetensors`, by suffix)."""
    save_state_dict(export_state_dict(model), path)


__all__ = [
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "export_state_dict",
    "infer_config",
    "load_checkpoint",
    "load_state_dict",
    "load_state_dict_into",
    "model_from_state_dict",
    "save_checkpoint",
    "save_state_dict",
]
