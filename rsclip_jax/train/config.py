"""Training configuration: ml_collections ConfigDicts, big_vision style.

A config file `configs/NAME.py` defines `get_config(arg=None) -> ConfigDict`, normally starting
from `default_config()` and changing what it needs. On the command line:

    rsclip train --config configs/NAME.py[:ARG] --workdir DIR --config.optim.lr=1e-4 ...

`default_config()` is also the schema: a key it does not have, or a value of the wrong type, is an
error raised by `load_config`, before anything is built or compiled.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from rsclip_jax.models import CLIPConfig
from rsclip_jax.models.config import config_name
from rsclip_jax.models.layers import ATTENTION_IMPLEMENTATIONS
from rsclip_jax.train.evals import build_tasks
from rsclip_jax.train.optim import SCHEDULES
from rsclip_jax.train.sharding import MESH_AXES

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
    c.eval_every_steps = 0  # default cadence of config.evals entries; 0: evaluate only at the end
    c.eval_batch_size = 64  # global batch of the embedding passes of the evals
    c.nan_policy = "skip"  # skip: drop the update and go on; stop: end the run with an error
    # Under nan_policy=skip, the run stops with an error once more steps than this were skipped
    # (non-finite loss, gradient or update) since it started or resumed; 0: no absolute limit.
    c.max_skipped_steps = 10
    # ... or once skipped steps exceed this fraction of the steps run, checked after
    # SKIPPED_FRACTION_MIN_STEPS (20) steps; 0: no fractional limit.
    c.max_skipped_fraction = 0.1
    # Ctrl-C (SIGINT) as preemption: save at the next step boundary, then exit non-zero; a second
    # Ctrl-C exits at once. False: Ctrl-C raises KeyboardInterrupt as usual.
    c.preempt_on_sigint = True
    # Peak dense bf16 TFLOP/s of one device, for the logged mfu; 0: known from the device kind
    # (H100, A100, TPU v4/v5e/v5p/v6e, ...), else mfu is not logged (e.g. on CPU).
    c.peak_tflops_per_device = 0.0
    # A one-device CPU run: False runs each step on the calling thread, whose large buffers glibc
    # keeps in the heap under rsclip's malloc settings (rsclip_jax/hostenv.py), so XLA's scratch is
    # reused instead of mapped and faulted in afresh every step (docs/performance.md). True is JAX's
    # default (dispatch to a worker thread). JAX reads it when its CPU backend is created.
    c.cpu_async_dispatch = False

    c.model = ml_collections.ConfigDict()
    c.model.name = "RemoteCLIP-ViT-B-32"  # registry name (see `rsclip models`)
    c.model.init_from = ""  # "": from scratch; an OpenCLIP .pt/.safetensors; or an rsclip workdir
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.visual_scan = True
    c.model.text_scan = True
    c.model.visual_remat = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    c.model.text_remat = "none"
    # xla | cudnn (fused flash attention: NVIDIA GPU, bfloat16) | auto (cudnn where it runs, else xla)
    c.model.attention = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # directory of ArrayRecord shards written by `rsclip data build`
    c.data.build_from = ""  # captions CSV(s), comma-separated: build data.train from them if it has no shards
    c.data.num_workers = 0  # grain worker processes (0 was fastest on 2 cores)
    # Corrupt training records (unreadable, or an image that does not decode): 0 stops the run at
    # the first, naming its shard and index; N > 0 replaces each by the next readable record, logs
    # it, counts it (metric corrupt_records) and stops once more than N were met since the run started.
    c.data.skip_corrupt = 0
    # Cut each batch's captions after their last non-padding token, rounded up to a multiple of
    # this (0: keep the full context length); a multi-process run cuts every batch to one width,
    # from the shards' manifests (max_caption_tokens). Exact: the text tower is causal and pools
    # at a row's end-of-text token. Each width compiles the step once.
    c.data.trim_text_multiple = 8
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

    # Named evaluations run during training, any task of the evaluator (see train/evals.py):
    # c.evals.NAME = ConfigDict({"task": "retrieval", "every_steps": 500, "karpathy_json": ..., ...}).
    # Their metrics are logged as NAME/<metric>, which best_metric can name.
    c.evals = ml_collections.ConfigDict()
    return c


# Sections whose keys are chosen by the user (each entry is validated by its own rules).
FREE_FORM_SECTIONS = ("evals",)
BEST_MODES = ("max", "min")
# What a resumed run may not change silently: the weights' shapes and meaning, and the batches.
RESUME_KEYS = ("model.name", "batch_size", "loss.name", "loss.chunk_size", "data.train")


def _check_against_schema(config: Any, schema: Any, prefix: str = "") -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key {name!r}; known keys here: {', '.join(sorted(schema.keys()))}")
        value, default = config[key], schema[key]
        if not prefix and key in FREE_FORM_SECTIONS:
            continue
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
    if config.get("max_skipped_steps", 0) < 0:
        raise ConfigError(f"max_skipped_steps must be >= 0 (0: no limit), got {config.max_skipped_steps}")
    if not 0.0 <= config.get("max_skipped_fraction", 0.0) < 1.0:
        raise ConfigError(f"max_skipped_fraction must be in [0, 1) (0: no limit), got {config.max_skipped_fraction}")
    if config.get("data", {}).get("trim_text_multiple", 0) < 0:
        raise ConfigError(f"data.trim_text_multiple must be >= 0 (0: no trimming), got "
                          f"{config.data.trim_text_multiple}")
    if config.get("data", {}).get("skip_corrupt", 0) < 0:
        raise ConfigError(f"data.skip_corrupt must be >= 0 (0: stop at the first corrupt record), got "
                          f"{config.data.skip_corrupt}")
    if config.get("loss", {}).get("name", "clip") not in ("clip", "siglip"):
        raise ConfigError(f"loss.name must be 'clip' or 'siglip', got {config.loss.name!r}")
    accum = config.get("optim", {}).get("grad_accum_steps", 1)
    if accum < 1 or config.batch_size % accum:
        raise ConfigError(f"optim.grad_accum_steps ({accum}) must be >= 1 and divide batch_size ({config.batch_size})")
    _validate_choices(config)
    _validate_mesh(config)
    _validate_evals(config)
    return config


def _head_agnostic(config: CLIPConfig) -> CLIPConfig:
    """The architecture with initial values dropped: only the presence of a logit bias matters."""
    bias = None if config.init_logit_bias is None else 0.0
    return dataclasses.replace(config, init_logit_scale=0.0, init_logit_bias=bias)


def _describe(config: CLIPConfig) -> str:
    base = dataclasses.replace(config, init_logit_scale=CLIPConfig.init_logit_scale, init_logit_bias=None)
    name = config_name(base) or "a custom architecture"
    return name + (" with a SigLIP logit bias" if config.init_logit_bias is not None else "")


def _validate_choices(config: ml_collections.ConfigDict) -> None:
    if "optim" in config and config.optim.get("schedule", "cosine") not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {config.optim.schedule!r}")
    if config.get("best_mode", "max") not in BEST_MODES:
        raise ConfigError(f"best_mode must be 'max' or 'min', got {config.best_mode!r}")
    if config.get("model", {}).get("attention", "auto") not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got "
                          f"{config.model.attention!r}")
    if config.get("peak_tflops_per_device", 0.0) < 0:
        raise ConfigError(f"peak_tflops_per_device must be >= 0 (0: from the device kind), got "
                          f"{config.peak_tflops_per_device}")
    if config.get("eval_batch_size", 1) <= 0:
        raise ConfigError(f"eval_batch_size must be positive, got {config.eval_batch_size}")


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
    if "mesh" not in config:
        return
    mesh = config.mesh
    for key in ("shape", "dcn_shape"):
        shape = tuple(mesh.get(key, (1,) * len(MESH_AXES)))
        if len(shape) != len(MESH_AXES) or not all(isinstance(n, int) and (n > 0 or n == -1) for n in shape):
            raise ConfigError(f"mesh.{key} must give one size per mesh axis {MESH_AXES} (positive, or -1 for the "
                              f"rest), e.g. (-1, 1, 1); got {shape}")
    for rule in mesh.get("rules", ()):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"mesh.rules entries are (logical axis, mesh axis or None) pairs; got {rule!r}")
        if rule[1] is not None and rule[1] not in MESH_AXES:
            raise ConfigError(f"mesh.rules maps {rule[0]!r} to {rule[1]!r}, which is not a mesh axis; mesh axes are "
                              f"{', '.join(MESH_AXES)} (or None to replicate)")


def _validate_evals(config: ml_collections.ConfigDict) -> None:
    evals = config.get("evals", {})
    try:
        names = list(build_tasks(evals))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    metric = config.get("best_metric", "")
    if metric and ("/" not in metric or metric.split("/", 1)[0] not in names):
        known = ", ".join(f"{n}/..." for n in names) or "none: add one under config.evals"
        raise ConfigError(f"best_metric {metric!r} names no configured eval; metrics are <eval name>/<metric>, "
                          f"configured evals: {known}")


def check_resume_compatible(workdir: str, saved: dict[str, Any], config: ml_collections.ConfigDict,
                            allow_change: bool = False, saved_model: CLIPConfig | None = None,
                            model_config: CLIPConfig | None = None) -> None:
    """Refuses to resume `workdir` with another architecture, batch size, loss or data, naming what
    changed.

    `allow_change` accepts a new batch size, loss chunking or data folder. The architecture can
    never change, and neither can the loss between clip and siglip: SigLIP's head adds a learnable
    bias, so the checkpoint's weights (`saved_model`, its record) would not fit `model_config`.
    """
    def get(d: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, (dict, ml_collections.ConfigDict)) else None
        return d

    changed = [(k, get(saved, k), get(config, k)) for k in RESUME_KEYS
               if get(saved, k) is not None and get(saved, k) != get(config, k)]
    what = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in changed)
    if any(k in ("model.name", "loss.name") for k, _, _ in changed):
        raise ConfigError(f"{workdir}: cannot resume with another architecture or loss head ({what}); use a new "
                          f"--workdir, or start from these weights with --config.model.init_from={workdir}")
    if changed and not allow_change:
        raise ConfigError(f"{workdir}: the config changed since the checkpoint ({what}); use a new --workdir, or "
                          "pass --allow-config-change to resume with the new values")
    # Whatever the configs' names say, the checkpoint's own architecture record decides.
    if saved_model is not None and model_config is not None and _head_agnostic(saved_model) != _head_agnostic(model_config):
        raise ConfigError(f"{workdir}: cannot resume: the checkpoint holds {_describe(saved_model)}, this config "
                          f"builds {_describe(model_config)}; use a new --workdir with --config.model.init_from={workdir}")


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
        free_form = bool(parents) and parents[0] in FREE_FORM_SECTIONS
        for i, part in enumerate(parents):
            if free_form and i == 1 and part not in node:
                with node.unlocked():  # a new named eval: --config.evals.NAME.task=knn
                    node[part] = ml_collections.ConfigDict()
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"override {item!r}: no config section {'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if free_form and len(parents) == 2 and leaf not in node:  # options of a named eval
            with node.unlocked():
                node[leaf] = _parse_value(text)
            continue
        if not parents and leaf in FREE_FORM_SECTIONS:  # --config.evals={} replaces (here: drops) them all
            value = _parse_value(text)
            if not isinstance(value, dict):
                raise ConfigError(f"override {item!r}: {leaf} takes a dict literal, e.g. --config.{leaf}={{}}")
            with node.unlocked():
                node[leaf] = ml_collections.ConfigDict(value)
            continue
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


def python_module(path: str, prefix: str) -> Any:
    """Runs the Python file at `path` as a fresh module (a config or sweep file) and returns it."""
    module_spec = importlib.util.spec_from_file_location(f"{prefix}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    assert module_spec.loader is not None
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, applies overrides, validates, and returns the locked config."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    module = python_module(path, "rsclip_config")
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
