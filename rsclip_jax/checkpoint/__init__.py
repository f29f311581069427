"""Checkpoint import and export: OpenCLIP/RemoteCLIP state_dicts (.pt/.pth/.bin, .safetensors) and
training workdirs.

Torch is never needed, and loading never executes code from the file (see `torch_format`). Every
file written here records its architecture (see `architecture`), so it loads back as written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from rsclip_jax.checkpoint.architecture import (
    ArchitectureRecordError,
    read_recorded_config,
    resolve_config,
    safetensors_metadata,
    write_sidecar,
)
from rsclip_jax.checkpoint.openclip import (
    CheckpointMismatchError,
    export_state_dict,
    infer_config,
    load_state_dict_into,
    model_from_state_dict,
)
from rsclip_jax.checkpoint.openclip_dir import is_openclip_dir, read_model_cfg, save_openclip_dir, weights_file
from rsclip_jax.checkpoint.torch_format import (
    UnsafeCheckpointError,
    is_safetensors,
    load_safetensors_metadata,
    load_state_dict,
    save_state_dict,
    sidecar_path,
)
from rsclip_jax.checkpoint.workdir import (
    WorkdirError,
    is_workdir,
    list_steps,
    load_workdir_model,
    select_step,
    workdir_model_config,
)
from rsclip_jax.models import CLIP, CLIPConfig, create_model
from rsclip_jax.models.config import config_name


def load_checkpoint_with_info(
    path: str | os.PathLike,
    model: str | CLIPConfig | None = None,
    *,
    step: int | None = None,
    best: bool = False,
    sharding: jax.sharding.Sharding | None = None,
    **create_kwargs: Any,
) -> tuple[CLIP, dict[str, Any]]:
    """Loads a checkpoint into a CLIP model, and says what was loaded.

    Args:
        path: `.pt`/`.pth`/`.bin` (torch zip pickle, read safely), `.safetensors`, an OpenCLIP hub
            folder (`open_clip_config.json` + weights), or an rsclip training workdir.
        model: registry name or config. Default: the architecture recorded with the weights, else
            inferred from the shapes (which has to guess the activation, and says so).
        step, best: for a workdir, which checkpoint (default: the latest).
        sharding: for a workdir, where the variables are restored (default: one local device).
        create_kwargs: `dtype`, `scan_layers`, `remat_policy` for the created model.

    Returns:
        (model, info): info has `checkpoint`, `format` (`openclip`, `openclip-dir` or `rsclip-workdir`), `model`
        (the architecture's name) and, for a workdir, `step`.

    Raises:
        CheckpointMismatchError: naming the file, when weights and architecture disagree.
        FileNotFoundError: for a missing path, a folder that is not a workdir, or a missing step.
    """
    info: dict[str, Any] = {"checkpoint": os.path.abspath(path)}
    if os.path.isdir(path) and is_openclip_dir(path):
        if step is not None or best:
            raise ValueError(f"--step/--best choose a checkpoint of a training workdir; {path} is an OpenCLIP folder")
        if is_workdir(path):
            print(f"warning: {path} is both an OpenCLIP folder and a training workdir; loading the OpenCLIP folder "
                  f"({weights_file(path).name})", file=sys.stderr)
        weights = weights_file(path)
        recorded = _recorded_unless_overridden(lambda: read_model_cfg(path), model)
        clip = _from_state_dict(path, load_state_dict(weights), model, recorded, create_kwargs)
        info.update(format="openclip-dir", weights=str(weights))
    elif os.path.isdir(path):
        if not is_workdir(path):
            raise FileNotFoundError(f"{path}: a directory but neither an rsclip training workdir (no checkpoints/ "
                                    "inside) nor an OpenCLIP folder (no open_clip_config.json); pass a "
                                    ".pt/.safetensors file or such a folder")
        chosen = select_step(path, step, best)
        recorded = _recorded_unless_overridden(lambda: workdir_model_config(path, chosen), model)
        config = resolve_config(path, {}, model, recorded)
        if recorded is not None:
            _check_same_shapes(path, config, recorded, create_kwargs)
        clip, _ = load_workdir_model(path, chosen, config=config, sharding=sharding, **create_kwargs)
        info.update(format="rsclip-workdir", step=chosen)
    elif os.path.exists(path):
        if step is not None or best:
            raise ValueError(f"--step/--best choose a checkpoint of a training workdir; {path} is a single file")
        metadata = load_safetensors_metadata(path) if is_safetensors(path) else None
        recorded = _recorded_unless_overridden(lambda: read_recorded_config(path, metadata), model)
        clip = _from_state_dict(path, load_state_dict(path), model, recorded, create_kwargs)
        info.update(format="openclip")
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or workdir")
    info["model"] = config_name(clip.config) or "custom architecture"
    return clip, info


def _from_state_dict(path: str | os.PathLike, state_dict: dict[str, Any], model: str | CLIPConfig | None,
                     recorded: CLIPConfig | None, create_kwargs: dict[str, Any]) -> CLIP:
    config = resolve_config(path, state_dict, model, recorded)
    try:
        return load_state_dict_into(create_model(config, abstract=True, **create_kwargs), state_dict)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{path}: {e}") from None


def _recorded_unless_overridden(read: Any, model: str | CLIPConfig | None) -> CLIPConfig | None:
    """The recorded architecture; an unreadable record stops the load only when no --model says
    what the weights are (e.g. a record from a newer rsclip, or a damaged sidecar)."""
    try:
        return read()
    except ArchitectureRecordError as e:
        if model is None:
            raise
        print(f"warning: {e}; using --model as given", file=sys.stderr)
        return None


def load_checkpoint(path: str | os.PathLike, model: str | CLIPConfig | None = None, **kwargs: Any) -> CLIP:
    """`load_checkpoint_with_info(...)`'s model alone."""
    return load_checkpoint_with_info(path, model, **kwargs)[0]


def _check_same_shapes(path: str | os.PathLike, chosen: CLIPConfig, recorded: CLIPConfig,
                       create_kwargs: dict[str, Any]) -> None:
    """A --model for a workdir may change what shapes cannot see (the activation), not the shapes."""
    def shapes(config: CLIPConfig) -> list[tuple[str, tuple[int, ...]]]:
        state = nnx.state(create_model(config, abstract=True, **create_kwargs))
        return [(jax.tree_util.keystr(k), v.shape) for k, v in jax.tree.leaves_with_path(state)]

    if chosen != recorded and shapes(chosen) != shapes(recorded):
        raise CheckpointMismatchError(f"{path}: trained as {config_name(recorded) or recorded}, whose weights do "
                                      f"not fit {config_name(chosen) or chosen}; omit --model to use the trained one")


def save_checkpoint(model: CLIP, path: str | os.PathLike) -> None:
    """Writes the model as an OpenCLIP-loadable state_dict (`.pt` or `.safetensors`, by suffix),
    recording its architecture (safetensors metadata, or a `<file>.json` sidecar for torch files)."""
    state_dict = export_state_dict(model)
    if Path(path).suffix.lower() == ".safetensors":
        save_state_dict(state_dict, path, safetensors_metadata(model.config))
    else:
        save_state_dict(state_dict, path)
        write_sidecar(path, model.config)


__all__ = [
    "ArchitectureRecordError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "WorkdirError",
    "export_state_dict",
    "infer_config",
    "is_workdir",
    "list_steps",
    "load_checkpoint",
    "load_checkpoint_with_info",
    "load_state_dict",
    "load_state_dict_into",
    "model_from_state_dict",
    "save_checkpoint",
    "save_openclip_dir",
    "save_state_dict",
    "sidecar_path",
]
