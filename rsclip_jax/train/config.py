"""Training configuration: ml_collections ConfigDicts, big_vision style.

A config file `configs/NAME.py` defines `get_config(arg=None) -> ConfigDict`, normally starting
from `default_config()` and changing what it needs. On the command line:

    rsclip train --config configs/NAME.py[:ARG] --workdir DIR --config.optim.lr=1e-4 ...

`default_config()` is also the schema: a key it does not have, or a value of the wrong type, is an
error raised by `load_config`, before anything is built or compiled.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

REQUIRED_TOP_LEVEL = ("seed", "batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps")


class ConfigError(ValueError):
    """An invalid config: unknown key, wrong type, bad override or inconsistent values."""


def default_config() -> ml_collections.ConfigDict:
    """Every training option with its default; config files override what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, over all hosts and devices
    c.total_steps = 1000
    c.log_every_steps = 10
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3  # the last K; plus the best by `best_metric` when set
    c.best_metric = ""  # e.g. "retrieval/mean_recall"; empty keeps only the last K
    c.best_mode = "max"
    c.eval_every_steps = 0  # 0: evaluate only at the end
    c.nan_policy = "skip"  # skip: drop the update and go on; stop: end the run with an error

    c.model = ml_collections.ConfigDict()
    c.model.name = "RemoteCLIP-ViT-B-32"  # registry name (see `rsclip models`)
    c.model.init_from = ""  # "": from scratch; an OpenCLIP .pt/.safetensors; or an rsclip workdir
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.visual_scan = True
    c.model.text_scan = True
    c.model.visual_remat = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    c.model.text_remat = "none"

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # directory of ArrayRecord shards written by `rsclip data build`
    c.data.num_workers = 0  # grain worker processes (0 was fastest on 2 cores)
    c.data.crop_scale_min = 0.9  # RandomResizedCrop scale range, as OpenCLIP's train default
    c.data.crop_scale_max = 1.0
    c.data.hflip = True  # remote-sensing scenes have no canonical orientation
    c.data.vflip = True
    c.data.rot90 = True

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.end_lr_ratio = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.grad_clip_norm = 1.0  # 0 disables clipping
    c.optim.grad_accum_steps = 1
    c.optim.lr_mult = ml_collections.ConfigDict({"visual": 1.0, "text": 1.0, "logit": 1.0})
    c.optim.freeze = ""  # comma-separated towers: visual (LiT), text, logit

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "clip"  # clip | siglip
    c.loss.chunk_size = 0  # >0: chunked CLIP loss with this many columns per chunk

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, model) within a slice/node; -1 = the rest
    c.mesh.dcn_shape = (1, 1, 1)  # slices/nodes along each axis (multi-slice TPU, multi-node GPU)
    c.mesh.fsdp_min_size = 2**18  # parameters at least this large are sharded over fsdp
    c.mesh.rules = (("heads", "model"), ("mlp", "model"))  # logical axis -> mesh axis

    c.evals = ml_collections.ConfigDict()
    c.evals.retrieval_json = ""  # Karpathy JSON whose test split is evaluated during training
    c.evals.retrieval_images = ""  # image folder of that split
    c.evals.batch_size = 64
    return c


def _check_against_schema(config: Any, schema: Any, prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r}; known keys here: {', '.join(sorted(schema.keys()))}")
        value, default = config[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {name!r} must be a section (ConfigDict), got {type(value).__name__}")
            _check_against_schema(value, default, name + ".")
        elif not _same_type(value, default):
            raise ConfigError(f"config key {name!r} must be {type(default).__name__}, got {value!r} ({type(value).__name__})")


def _same_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks keys and types against `default_config()` and the values' consistency."""
    missing = [k for k in REQUIRED_TOP_LEVEL if k not in config]
    if missing:
        raise ConfigError(f"config is missing required top-level keys: {', '.join(missing)}")
    _check_against_schema(config, default_config())
    for key in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps"):
        if config[key] <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {config[key]}")
    if config.nan_policy not in ("skip", "stop"):
        raise ConfigError(f"nan_policy must be 'skip' or 'stop', got {config.nan_policy!r}")
    if config.get("loss", {}).get("name", "clip") not in ("clip", "siglip"):
        raise ConfigError(f"loss.name must be 'clip' or 'siglip', got {config.loss.name!r}")
    accum = config.get("optim", {}).get("grad_accum_steps", 1)
    if accum < 1 or config.batch_size % accum:
        raise ConfigError(f"optim.grad_accum_steps ({accum}) must be >= 1 and divide batch_size ({config.batch_size})")
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, e.g. --config.model.name=ViT-B-32


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `--config.a.b=value` overrides (values parsed as Python literals, else strings)."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"bad override {item!r}: expected --config.KEY=VALUE, e.g. --config.optim.lr=1e-4")
        dotted, text = item[len("--config.") :].split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"override {item!r}: no config section {'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {item!r}: unknown key {dotted!r}; known here: {', '.join(sorted(node.keys()))}")
        value, old = _parse_value(text), node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text  # e.g. --config.model.init_from=123 stays a string
        if not _same_type(value, old):
            raise ConfigError(f"override {item!r}: {dotted} must be {type(old).__name__}, got {type(value).__name__}")
        with node.unlocked():
            node[leaf] = value


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, applies overrides, validates, and returns the locked config."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    module_spec = importlib.util.spec_from_file_location(f"rsclip_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    assert module_spec.loader is not None
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    try:
        validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    apply_overrides(config, overrides)
    validate(config)
    config.lock()
    return config
