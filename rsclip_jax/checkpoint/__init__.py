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
from rsclip_jax.models import CLIP, CLIPConfig, get_model_config


def load_checkpoint(path: str | os.PathLike, model: str | CLIPConfig | None = None, **create_kwargs: Any) -> CLIP:
    """Loads a checkpoint into a CLIP model.

    Args:
        path: `.pt`/`.pth`/`.bin` (torch zip pickle, read safely), `.safetensors`, or an rsclip
            training workdir (its latest checkpoint, architecture from the saved config).
        model: registry name or config; None infers the architecture from the shapes (QuickGELU).
            For a workdir it is checked against the saved architecture.
        create_kwargs: `dtype`, `scan_layers`, `remat_policy` for the created model.
    """
    if os.path.isdir(path):
        from rsclip_jax.train.export import model_from_workdir  # lazy: training imports this module

        loaded = model_from_workdir(path)
        if model is not None:
            want = get_model_config(model) if isinstance(model, str) else model
            if want != loaded.config:
                raise CheckpointMismatchError(f"{path}: trained as {loaded.config}, not {model}")
        return loaded
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
