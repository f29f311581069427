"""OpenCLIP state_dict <-> rsclip_jax parameters.

OpenCLIP's `state_dict` names are the interchange format: RemoteCLIP releases its weights that way,
and any model trained here can be handed back to PyTorch users the same way. The mapping is derived
from our own parameter paths, so it cannot drift from the model definition:

* transformer blocks are stacked along a leading `layers` axis here, one key per layer there;
* torch Linear weights are (out, in), ours (in, out); conv kernels OIHW there, HWIO here;
* attention in/out projections are split into heads here ((d, 3, H, hd) and (H, hd, d)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx, traverse_util

from rsclip_jax.models.clip import CLIP, create_model
from rsclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig, config_name, get_model_config

Path = tuple[Any, ...]

# Per-layer transformer parameters: our stacked name -> (OpenCLIP name inside resblocks.{i}, kind).
_BLOCK = {
    "ln_1_scale": ("ln_1.weight", "id"),
    "ln_1_bias": ("ln_1.bias", "id"),
    "qkv_kernel": ("attn.in_proj_weight", "qkv"),
    "qkv_bias": ("attn.in_proj_bias", "reshape"),
    "out_kernel": ("attn.out_proj.weight", "out"),
    "out_bias": ("attn.out_proj.bias", "id"),
    "ln_2_scale": ("ln_2.weight", "id"),
    "ln_2_bias": ("ln_2.bias", "id"),
    "fc_kernel": ("mlp.c_fc.weight", "linear"),
    "fc_bias": ("mlp.c_fc.bias", "id"),
    "proj_kernel": ("mlp.c_proj.weight", "linear"),
    "proj_bias": ("mlp.c_proj.bias", "id"),
}
_ATTNPOOL = {f"{n}_kernel": (f"{n}_proj.weight", "linear") for n in "qkvc"} | {
    f"{n}_bias": (f"{n}_proj.bias", "id") for n in "qkvc"
}
_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var", "kernel": "weight"}
_MODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# Keys some exporters add that carry no weights (OpenAI JIT metadata).
_IGNORED = {"input_resolution", "context_length", "vocab_size"}


class CheckpointMismatchError(ValueError):
    """A state_dict does not fit the architecture: lists missing/unexpected keys and bad shapes."""


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "linear":
        return shape[::-1]
    if kind == "conv":  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "qkv":  # (d, 3, H, hd) -> (3d, d)
        return (shape[1] * shape[2] * shape[3], shape[0])
    if kind == "reshape":
        return (int(np.prod(shape)),)
    if kind == "out":  # (H, hd, d) -> (d_out, d_in)
        return (shape[2], shape[0] * shape[1])
    return shape


def _to_ours(kind: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "qkv":
        _, three, h, hd = shape
        return a.reshape(three, h, hd, a.shape[1]).transpose(3, 0, 1, 2)
    if kind == "out":
        return a.T.reshape(shape)
    return a.reshape(shape)


def _to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if kind == "qkv":
        return a.transpose(1, 2, 3, 0).reshape(-1, a.shape[0])
    if kind == "reshape":
        return a.reshape(-1)
    if kind == "out":
        return a.reshape(-1, a.shape[-1]).T
    return a


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path  # our flattened parameter path
    keys: tuple[str, ...]  # OpenCLIP key, or one per layer for stacked parameters
    kind: str
    stacked: bool


def _entry(path: Path, layers: int) -> _Entry:
    name, parent = path[-1], [str(p) for p in path[:-1]]
    if parent and parent[-1] == "transformer" and name in _BLOCK:
        tname, kind = _BLOCK[name]
        prefix = ".".join(parent)
        return _Entry(path, tuple(f"{prefix}.resblocks.{i}.{tname}" for i in range(layers)), kind, True)
    if parent and parent[-1] == "attnpool" and name in _ATTNPOOL:
        tname, kind = _ATTNPOOL[name]
        return _Entry(path, (".".join(parent + [tname]),), kind, False)
    if name in _LEAF and parent:
        kind = "conv" if name == "kernel" else "id"
        return _Entry(path, (".".join([_MODULE.get(p, p) for p in parent] + [_LEAF[name]]),), kind, False)
    if path in (("visual", "conv1"), ("token_embedding",)):
        return _Entry(path, (".".join(map(str, path)) + ".weight",), "conv" if path[0] == "visual" else "id", False)
    return _Entry(path, (".".join(map(str, path)),), "id", False)


def _entries(model: CLIP) -> tuple[dict[Path, Any], list[_Entry]]:
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    cfg = model.config
    out = []
    for path in flat:
        layers = cfg.vision.layers if path[0] == "visual" else cfg.text.layers
        out.append(_entry(path, layers if isinstance(layers, int) else 0))
    return flat, out


def _bn_counters(entries: list[_Entry]) -> list[str]:
    """OpenCLIP BatchNorm layers also store `num_batches_tracked`; we keep no such counter."""
    return [e.keys[0].rsplit(".", 1)[0] + ".num_batches_tracked" for e in entries if e.path[-1] == "mean"]


def load_state_dict_into(
    model: CLIP, state_dict: Mapping[str, np.ndarray], keep_missing: tuple[str, ...] = ()
) -> CLIP:
    """Returns `model` (possibly abstract) with its parameters replaced by `state_dict`'s.

    `keep_missing` names parameters the state_dict may lack, which then keep the model's initial
    value: e.g. `logit_bias`, to start SigLIP training from CLIP weights.

    Raises:
        CheckpointMismatchError: listing every missing key, unexpected key and shape mismatch.
    """
    flat, entries = _entries(model)
    expected = {k for e in entries for k in e.keys} | set(_bn_counters(entries))
    defaults = {k: _initial_value(model, k) for k in keep_missing if k in expected and k not in state_dict}
    state_dict = {**state_dict, **defaults}
    missing = sorted(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in expected and k not in _IGNORED)
    bad_shapes = []
    for e in entries:
        want = _torch_shape(e.kind, tuple(flat[e.path].shape[1:] if e.stacked else flat[e.path].shape))
        for k in e.keys:
            if k in state_dict and tuple(np.shape(state_dict[k])) != want:
                bad_shapes.append(f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, model {want}")
    if missing or unexpected or bad_shapes:
        lines = [f"state_dict does not fit the architecture {config_name(model.config) or model.config}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad_shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        lines.append("  Pass the right --model, or omit it to infer the architecture from the shapes.")
        raise CheckpointMismatchError("\n".join(lines))

    new_flat = {}
    for e in entries:
        target = flat[e.path]
        shape = tuple(target.shape[1:] if e.stacked else target.shape)
        arrays = [_to_ours(e.kind, np.asarray(state_dict[k], dtype=np.float32), shape) for k in e.keys]
        new_flat[e.path] = np.stack(arrays) if e.stacked else arrays[0]
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(new_flat))
    return nnx.merge(graphdef, state)


def _initial_value(model: CLIP, key: str) -> np.ndarray:
    """The value a freshly built model gives a top-level scalar parameter (from its config)."""
    initial = {"logit_scale": model.config.init_logit_scale, "logit_bias": model.config.init_logit_bias}
    if key not in initial or initial[key] is None:
        raise ValueError(f"no initial value known for {key!r}")
    return np.asarray(initial[key], np.float32)


def export_state_dict(model: CLIP) -> dict[str, np.ndarray]:
    """The model's parameters as an OpenCLIP `CLIP.state_dict()` of float32 numpy arrays."""
    flat, entries = _entries(model)
    out: dict[str, np.ndarray] = {}
    for e in entries:
        a = np.asarray(flat[e.path], dtype=np.float32)
        for i, k in enumerate(e.keys):
            out[k] = np.array(_to_torch(e.kind, a[i] if e.stacked else a), order="C")
    for k in _bn_counters(entries):
        out[k] = np.zeros((), np.int64)
    return out


def infer_config(state_dict: Mapping[str, np.ndarray], quick_gelu: bool = True) -> CLIPConfig:
    """Reads the architecture off an OpenCLIP state_dict's shapes.

    The activation cannot be seen in the weights; it defaults to QuickGELU because every
    RemoteCLIP and OpenAI CLIP checkpoint needs it. Name the model to choose otherwise.
    """
    sd = state_dict
    try:
        width = sd["ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=width,
            heads=width // 64,
            layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}),
        )
        embed_dim = sd["text_projection"].shape[1]
        if "visual.proj" in sd:
            vw, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vlayers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
            vision = VisionConfig(image_size=grid * patch, layers=vlayers, width=vw, patch_size=patch)
        else:
            counts = tuple(
                len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
            )
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                image_size=grid * 32, layers=counts, width=sd["visual.layer1.0.conv1.weight"].shape[0], patch_size=None
            )
    except KeyError as e:
        raise CheckpointMismatchError(
            f"cannot infer the architecture: key {e} is missing; this does not look like an OpenCLIP CLIP "
            "state_dict. Pass --model NAME to check it against a known architecture."
        ) from None
    # A SigLIP-trained model has a learned logit bias; its value comes from the checkpoint.
    bias = 0.0 if "logit_bias" in sd else None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu, init_logit_bias=bias).validate()


def model_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model: str | CLIPConfig | None = None,
    **create_kwargs: Any,
) -> CLIP:
    """Builds a CLIP holding `state_dict`'s weights; `model` None infers the architecture."""
    if model is None:
        config = infer_config(state_dict)
    else:
        config = get_model_config(model) if isinstance(model, str) else model
    return load_state_dict_into(create_model(config, abstract=True, **create_kwargs), state_dict)
