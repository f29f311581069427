"""The architecture that travels with the weights: recorded when written, read back when loaded.

Shapes cannot tell GELU from QuickGELU (nor a SigLIP head's initial values), so every file this
project writes records its model:

* `.safetensors`: in the header's `__metadata__` (string to string), under `rsclip_jax.model`;
  OpenCLIP, `safetensors` and transformers ignore the key.
* `.pt`/`.pth`/`.bin`: in a sidecar JSON beside the file, `<file>.json` (e.g. `model.pt.json`),
  so `torch.load` + `open_clip` `load_state_dict(strict=True)` see only the weights. The sidecar
  also records the weights file's size and sha256: a sidecar left beside a file that was since
  overwritten by another tool is ignored, with a warning (copying both files keeps it valid).
* training workdirs: in each checkpoint's `model` item (see `workdir.py`).

The record is `{"name": <registry name or null>, "config": CLIPConfig.to_dict()}`. Loading resolves
the architecture in this order (`resolve_config`): an explicit `--model`, the recorded config, then
inference from the shapes, which must guess the activation and says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rsclip_jax.checkpoint.openclip import infer_config
from rsclip_jax.checkpoint.torch_format import sidecar_path
from rsclip_jax.fileio import atomic_write_text
from rsclip_jax.models.config import CLIPConfig, config_name, get_model_config

METADATA_KEY = "rsclip_jax.model"


class ArchitectureRecordError(ValueError):
    """A recorded architecture that cannot be read (names the file and what to do)."""


def model_record(config: CLIPConfig) -> dict[str, Any]:
    """The JSON-able record of an architecture: its registry name (if any) and full config."""
    return {"name": config_name(config), "config": config.to_dict()}


def config_from_record(record: Mapping[str, Any], where: str) -> CLIPConfig:
    """The CLIPConfig of a record; `where` names the file for the error message."""
    try:
        return CLIPConfig.from_dict(dict(record["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArchitectureRecordError(
            f"{where}: the recorded model architecture is unreadable ({type(e).__name__}: {e}); "
            "pass --model NAME to choose the architecture yourself"
        ) from None


def safetensors_metadata(config: CLIPConfig) -> dict[str, str]:
    """The `__metadata__` entries a `.safetensors` file gets (string values, as the format requires)."""
    # "format": "pt" is what transformers/safetensors' torch helpers write; some readers expect it.
    return {METADATA_KEY: json.dumps(model_record(config), sort_keys=True), "format": "pt"}


def write_sidecar(weights_path: str | os.PathLike, config: CLIPConfig) -> Path:
    """Writes `<weights>.json` for a torch-format file (after the weights, so it can record their size)."""
    record = {**model_record(config), "weights_file": Path(weights_path).name,
              "weights_size": os.path.getsize(weights_path), "weights_sha256": _sha256(weights_path)}
    out = sidecar_path(weights_path)
    atomic_write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def read_recorded_config(path: str | os.PathLike, metadata: Mapping[str, str] | None) -> CLIPConfig | None:
    """The architecture recorded with a weights file, or None when it records none.

    `metadata` is a safetensors file's `__metadata__` (None for torch files, whose sidecar is read).
    """
    if metadata is not None:
        if METADATA_KEY not in metadata:
            return None
        try:
            record = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise ArchitectureRecordError(f"{path}: __metadata__[{METADATA_KEY!r}] is not JSON ({e}); "
                                          "pass --model NAME") from None
        return config_from_record(record, str(path))
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchitectureRecordError(f"{side}: not a valid JSON sidecar ({e}); fix or delete it, "
                                      "or pass --model NAME") from None
    size, digest = record.get("weights_size"), record.get("weights_sha256")
    if (size is not None and size != os.path.getsize(path)) or (digest is not None and digest != _sha256(path)):
        _warn(f"{side} describes other weights than {path} holds (overwritten since?); ignoring the sidecar")
        return None
    return config_from_record(record, str(side))


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    return a.to_dict() == b.to_dict()


def resolve_config(
    path: str | os.PathLike,
    state_dict: Mapping[str, np.ndarray],
    model: str | CLIPConfig | None,
    recorded: CLIPConfig | None,
) -> CLIPConfig:
    """The architecture to load `path` with: `model`, else the recorded one, else inferred.

    An explicit `model` that disagrees with the record wins, with a warning. Inference names its
    guess of the activation and the flag that settles it.
    """
    if model is not None:
        chosen = get_model_config(model) if isinstance(model, str) else model
        if recorded is not None and not _same_architecture(chosen, recorded):
            _warn(f"{path} records the architecture {_describe(recorded)}; using {_describe(chosen)} as asked")
        return chosen
    if recorded is not None:
        return recorded
    inferred = infer_config(state_dict, quick_gelu=True)
    name = config_name(inferred)
    gelu = f"--model {_base_name(inferred)} for GELU" if name else "--model NAME of a GELU architecture for GELU"
    _warn(f"{path} records no architecture: inferred {name or 'a custom architecture'} from the shapes, guessing "
          f"the QuickGELU activation (right for OpenAI CLIP and RemoteCLIP weights); {gelu}")
    return inferred


def _describe(config: CLIPConfig) -> str:
    name = config_name(config)
    act = "QuickGELU" if config.quick_gelu else "GELU"
    return f"{name} ({act})" if name else f"a custom architecture ({act})"


def _base_name(config: CLIPConfig) -> str:
    """The GELU registry name of an architecture (`RemoteCLIP-ViT-B-32` -> `ViT-B-32`)."""
    return (config_name(config) or "NAME").removeprefix("RemoteCLIP-").removesuffix("-quickgelu")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
