"""Checkpoint import and export: OpenCLIP/RemoteCLIP state_dicts (.pt/.pth/.bin, .safetensors),
OpenCLIP hub folders, transformers CLIP folders and training workdirs.

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
from rsclip_jax.checkpoint.transformers_dir import (
    TransformersFormatError,
    is_transformers_dir,
    openclip_state_dict_of,
)
from rsclip_jax.checkpoint.transformers_export import save_transformers_dir
from rsclip_jax.checkpoint.transformers_tokenizer import FolderTokenizer, has_tokenizer_files
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
from rsclip_jax.tokenizer import Tokenizer, get_tokenizer


LAYOUTS = ("openclip-dir", "transformers", "rsclip-workdir")


def folder_layout(path: str | os.PathLike, step: int | None = None, best: bool = False) -> str:
    """Which checkpoint a folder is: `openclip-dir`, `transformers` or `rsclip-workdir`.

    A folder holding several (e.g. a workdir someone exported into) is read as its exported model,
    in that order, unless `--step`/`--best` ask for a workdir checkpoint; a warning names the one used.

    Raises:
        FileNotFoundError: for a folder that is none of them.
        ValueError: for `--step`/`--best` on a folder that is not a workdir.
    """
    found = [name for name, test in zip(LAYOUTS, (is_openclip_dir, is_transformers_dir, is_workdir)) if test(path)]
    if not found:
        raise FileNotFoundError(f"{path}: a directory but neither an rsclip training workdir (no checkpoints/ inside), "
                                "an OpenCLIP folder (no open_clip_config.json) nor a transformers folder (no "
                                "config.json); pass a .pt/.safetensors file or such a folder")
    if step is not None or best:
        if "rsclip-workdir" not in found:
            raise ValueError(f"--step/--best choose a checkpoint of a training workdir; {path} is a {found[0]} folder")
        chosen = "rsclip-workdir"
    else:
        chosen = found[0]
    if len(found) > 1:
        hint = "; pass --step N or --best to load the workdir's checkpoints" if chosen != "rsclip-workdir" else ""
        print(f"warning: {path} holds several checkpoints ({', '.join(found)}); loading the {chosen} one{hint}",
              file=sys.stderr)
    return chosen


def read_weights_source(path: str | os.PathLike, layout: str,
                        model: str | CLIPConfig | None = None) -> tuple[dict[str, Any], CLIPConfig | None, list[Path]]:
    """The weights of a file, OpenCLIP folder or transformers folder, under OpenCLIP's state_dict names.

    Returns:
        (state_dict, recorded architecture or None, the files read). An unreadable record stops
        the load only when no `model` says what the weights are.
    """
    if layout == "openclip-dir":
        weights = weights_file(path)
        recorded = _recorded_unless_overridden(lambda: read_model_cfg(path), model)
        return load_state_dict(weights), recorded, [weights]
    if layout == "transformers":
        return openclip_state_dict_of(path)
    metadata = load_safetensors_metadata(path) if is_safetensors(path) else None
    recorded = _recorded_unless_overridden(lambda: read_recorded_config(path, metadata), model)
    return load_state_dict(path), recorded, [Path(path)]


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
            folder (`open_clip_config.json` + weights), a transformers CLIP folder (`config.json` +
            weights) or an rsclip training workdir.
        model: registry name or config. Default: the architecture recorded with the weights, else
            inferred from the shapes (which has to guess the activation, and says so).
        step, best: for a workdir, which checkpoint (default: the latest).
        sharding: for a workdir, where the variables are restored (default: one local device).
        create_kwargs: `dtype`, `scan_layers`, `remat_policy` for the created model.

    Returns:
        (model, info): info has `checkpoint`, `format` (`openclip`, `openclip-dir`, `transformers` or
        `rsclip-workdir`), `model` (the architecture's name), `files` (the weight files read; none for
        a workdir) and, for a workdir, `step`.

    Raises:
        CheckpointMismatchError: naming the file, when weights and architecture disagree.
        FileNotFoundError: for a missing path, a folder of no known layout, or a missing step.
    """
    info: dict[str, Any] = {"checkpoint": os.path.abspath(path), "files": []}
    if os.path.isdir(path):
        layout = folder_layout(path, step, best)
    elif os.path.exists(path):
        if step is not None or best:
            raise ValueError(f"--step/--best choose a checkpoint of a training workdir; {path} is a single file")
        layout = "openclip"
    else:
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if layout == "rsclip-workdir":
        chosen = select_step(path, step, best)
        recorded = _recorded_unless_overridden(lambda: workdir_model_config(path, chosen), model)
        config = resolve_config(path, {}, model, recorded)
        if recorded is not None:
            _check_same_shapes(path, config, recorded, create_kwargs)
        clip, _ = load_workdir_model(path, chosen, config=config, sharding=sharding, **create_kwargs)
        info.update(step=chosen)
    else:
        state_dict, recorded, files = read_weights_source(path, layout, model)
        clip = _from_state_dict(path, state_dict, model, recorded, create_kwargs)
        info.update(files=[str(f) for f in files])
    info.update(format=layout, model=config_name(clip.config) or "custom architecture")
    return clip, info


def load_tokenizer(path: str | os.PathLike, layout: str) -> Tokenizer | FolderTokenizer:
    """The tokenizer of a checkpoint loaded as `layout` (`info["format"]` of `load_checkpoint_with_info`,
    so a folder of several layouts gets the tokenizer of the one whose weights were loaded): a
    transformers folder's own tokenizer files when it has them (as transformers uses them), else
    OpenAI's BPE with open_clip's cleaning."""
    if layout == "transformers" and has_tokenizer_files(path):
        return FolderTokenizer(path)
    return get_tokenizer()


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
    "FolderTokenizer",
    "TransformersFormatError",
    "UnsafeCheckpointError",
    "WorkdirError",
    "export_state_dict",
    "infer_config",
    "is_openclip_dir",
    "is_transformers_dir",
    "is_workdir",
    "list_steps",
    "load_checkpoint",
    "load_checkpoint_with_info",
    "load_tokenizer",
    "read_weights_source",
    "folder_layout",
    "load_state_dict",
    "load_state_dict_into",
    "model_from_state_dict",
    "save_checkpoint",
    "save_openclip_dir",
    "save_state_dict",
    "save_transformers_dir",
    "sidecar_path",
]
