"""Everything a run builds before its first step: mesh, model, optimiser, sharded state, data.

Kept apart from the loop so tests and tools (e.g. a reshape test, an eval of a workdir) can build
the same objects the trainer uses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax._src import xla_bridge  # backends_are_initialized: whether the CPU client exists yet
from jax.experimental import multihost_utils

from rsclip_jax.checkpoint import FolderTokenizer, folder_layout, load_state_dict_into, read_weights_source
from rsclip_jax.checkpoint.transformers_tokenizer import has_tokenizer_files
from rsclip_jax.checkpoint.workdir import restore_variables, select_step, workdir_model_config
from rsclip_jax.data import shards
from rsclip_jax.data.augment import AugmentConfig
from rsclip_jax.data.build import BuildConfig, build
from rsclip_jax.data.pipeline import LoaderConfig, train_dataset
from rsclip_jax.models import CLIPConfig, create_model, get_model_config
from rsclip_jax.models.config import config_name, with_sigmoid_head
from rsclip_jax.tokenizer import padded_width
from rsclip_jax.train.checkpointing import abstract_with_shardings
from rsclip_jax.train.optim import learning_rate_schedule, make_optimizer
from rsclip_jax.train.sharding import BATCH_AXES, make_mesh, state_shardings
from rsclip_jax.train.step import TrainState, init_train_state


@dataclasses.dataclass
class Run:
    """The objects of one training run (built by `build_run`)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    model_config: CLIPConfig
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract_state: Any  # ShapeDtypeStructs with the target shardings
    shardings: Any
    batch_axes: tuple[str, ...]


def apply_cpu_dispatch(config: ml_collections.ConfigDict, log: Any = None) -> None:
    """Sets JAX's `jax_cpu_enable_async_dispatch` from `config.cpu_async_dispatch`.

    Call it before anything creates JAX's backends (`jax.devices()`, `jax.process_index()`, the
    first array): the CPU client reads the flag once, when it is created. Where the backends
    exist already (JAX used earlier in the same process), it changes nothing and says so through
    `log` when the setting would have differed on CPU. The flag only concerns computations on one
    CPU device: a multi-device or multi-process CPU step and every GPU or TPU step are unaffected.
    """
    want = bool(config.get("cpu_async_dispatch", False))  # default_config()'s
    if "jax_cpu_enable_async_dispatch" not in jax.config.values:
        return  # a JAX without the option (it is JAX's, not an API promise): its default dispatch
    initialized = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
    if not initialized:
        jax.config.update("jax_cpu_enable_async_dispatch", want)
    elif log is not None and jax.default_backend() == "cpu" and \
            bool(jax.config.values["jax_cpu_enable_async_dispatch"]) != want:
        log(f"cpu_async_dispatch={want} not applied: JAX's CPU backend was created before training started (the "
            "setting takes effect in a fresh process)")


def model_config_from(config: ml_collections.ConfigDict) -> CLIPConfig:
    """The architecture; the SigLIP loss adds a learnable bias with SigLIP's initial values."""
    model_config = get_model_config(config.model.name)
    return with_sigmoid_head(model_config) if config.loss.name == "siglip" else model_config


def _create(config: ml_collections.ConfigDict, model_config: CLIPConfig, abstract: bool = False) -> nnx.Module:
    m = config.model
    return create_model(
        model_config,
        seed=config.seed,
        dtype=m.dtype,
        scan_layers=(m.visual_scan, m.text_scan),
        remat_policy=(m.visual_remat, m.text_remat),
        attention=m.attention,
        abstract=abstract,
    )


def build_run(config: ml_collections.ConfigDict, devices: Any = None) -> Run:
    """Mesh, optimiser and the abstract sharded state; nothing is allocated yet."""
    mesh = make_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    data_parallel = math.prod(mesh.shape[a] for a in batch_axes)
    accum = config.optim.grad_accum_steps
    if config.batch_size % (data_parallel * accum):
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by the data-parallel size {data_parallel} "
            f"times grad_accum_steps {accum}"
        )
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.process_count()} processes")
    _check_batch_split_by_process(mesh, batch_axes, config.batch_size)
    model_config = model_config_from(config)
    schedule = learning_rate_schedule(
        config.optim.lr, config.total_steps, config.optim.warmup_steps, config.optim.schedule, config.optim.end_lr_ratio
    )
    freeze = tuple(t.strip() for t in config.optim.freeze.split(",") if t.strip())
    tx = make_optimizer(
        schedule,
        b1=config.optim.b1,
        b2=config.optim.b2,
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        grad_clip_norm=config.optim.grad_clip_norm or None,
        lr_mult=dict(config.optim.lr_mult),
        freeze=freeze,
    )
    graphdef, abstract = nnx.eval_shape(lambda: init_train_state(_create(config, model_config), tx))
    shardings = state_shardings(abstract, mesh, [tuple(r) for r in config.mesh.rules], config.mesh.fsdp_min_size)
    return Run(config, mesh, model_config, schedule, tx, graphdef, abstract_with_shardings(abstract, shardings),
               shardings, batch_axes)


def _check_batch_split_by_process(mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...], batch_size: int) -> None:
    """Each process feeds its own rows, so no batch slice may live on devices of two processes.

    That happens when a non-batch axis (e.g. `model`) spans processes: the replicas would receive
    different data and the global batch would be wrong, silently.
    """
    if jax.process_count() == 1:
        return
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
    owners: dict[tuple[Any, Any], set[int]] = {}
    for device, index in sharding.devices_indices_map((batch_size,)).items():
        owners.setdefault((index[0].start, index[0].stop), set()).add(device.process_index)
    if any(len(procs) > 1 for procs in owners.values()):
        raise ValueError(
            f"mesh {dict(mesh.shape)}: a non-batch axis spans processes, so one batch slice would be fed by "
            "several processes; keep the 'model' axis within a process (mesh.shape), and put only data/fsdp "
            "in mesh.dcn_shape"
        )


def initial_state(run: Run) -> TrainState:
    """A fresh sharded state: from scratch, from OpenCLIP weights (a file or a hub folder), from a
    transformers CLIP folder, or from an rsclip workdir's params."""
    config, tx = run.config, run.tx
    source = config.model.init_from
    if not source:
        fresh = lambda: init_train_state(_create(config, run.model_config), tx)[1]  # noqa: E731
        return jax.jit(fresh, out_shardings=run.shardings)()
    if not os.path.exists(source):
        raise FileNotFoundError(f"config.model.init_from={source}: no such file or folder")
    layout = folder_layout(source) if os.path.isdir(source) else "openclip"
    if layout == "rsclip-workdir":
        step = select_step(source)
        _check_init_architecture(source, workdir_model_config(source, step), run.model_config)
        params, rest = restore_variables(source, step, run.abstract_state.params, run.abstract_state.rest)
    else:
        # a weights file, an OpenCLIP hub folder (its model_cfg is the record) or a transformers folder
        state_dict, recorded, _ = read_weights_source(source, layout)
        _check_init_architecture(source, recorded, run.model_config)
        if layout == "transformers":
            _check_training_tokenizer(source)
        model = load_state_dict_into(_create(config, run.model_config, abstract=True), state_dict,
                                     keep_missing=("logit_bias",))
        _, params, rest = nnx.split(model, nnx.Param, ...)

    def from_weights(params: Any, rest: Any) -> TrainState:
        return TrainState(jax.numpy.zeros((), jax.numpy.int32), params, tx.init(params), rest)

    return jax.jit(from_weights, out_shardings=run.shardings)(params, rest)


def _check_init_architecture(source: str, recorded: CLIPConfig | None, model_config: CLIPConfig) -> None:
    """init_from weights must be the configured architecture, activation included (shapes cannot
    tell GELU from QuickGELU); only the temperature/bias initial values may differ (CLIP -> SigLIP)."""
    if recorded is None:
        return  # an unrecorded OpenCLIP file: the shapes are checked when it is loaded
    same = lambda c: dataclasses.replace(c, init_logit_scale=0.0, init_logit_bias=None)  # noqa: E731
    if same(recorded) != same(model_config):
        raise ValueError(
            f"config.model.init_from={source} holds {config_name(recorded) or recorded}, but config.model.name builds "
            f"{config_name(model_config) or model_config}; set --config.model.name to the checkpoint's architecture"
        )


def _check_training_tokenizer(source: str) -> None:
    """Training tokenizes with OpenAI's BPE; a transformers folder trained with another vocabulary
    would be fed ids it never saw."""
    if has_tokenizer_files(source) and not FolderTokenizer(source).is_openai_bpe:
        raise ValueError(f"config.model.init_from={source}: the folder's tokenizer is not OpenAI CLIP's BPE, which "
                         "rsclip training tokenizes with; fine-tuning it here would feed the text tower other ids")


def ensure_train_data(config: ml_collections.ConfigDict) -> None:
    """Builds `data.train` from `data.build_from` when it holds no shards yet (e.g. configs/demo.py).

    Process 0 decides and builds, on a filesystem every process reads; every process learns the
    outcome, so none waits at a barrier for a build that failed.
    """
    d = config.data
    if not d.train:
        raise ValueError("config.data.train is empty: point it at a directory built by `rsclip data build`")
    missing = not os.path.isfile(os.path.join(d.train, shards.MANIFEST_NAME))
    if jax.process_count() > 1:
        missing = bool(multihost_utils.broadcast_one_to_all(np.array(missing)))
    if not missing:
        return
    if not d.build_from:
        raise ValueError(f"config.data.train={d.train} holds no shards (no {shards.MANIFEST_NAME}); build them with "
                         f"`rsclip data build --csv CAPTIONS.csv --out {d.train}`, or set config.data.build_from")
    error = ""
    if jax.process_index() == 0:
        csvs = tuple(c.strip() for c in d.build_from.split(",") if c.strip())
        print(f"[train] building {d.train} from {', '.join(csvs)} (config.data.build_from)", file=sys.stderr)
        try:
            build(BuildConfig(csvs=csvs, out_dir=d.train))
        except (ValueError, OSError) as e:
            error = f"config.data.build_from: {e}"
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.array(bool(error))))
        error = error or ("process 0 could not build config.data.train; see its log" if failed else "")
    if error:
        raise ValueError(error)


def fixed_caption_width(config: ml_collections.ConfigDict, context_length: int) -> tuple[int | None, int | None]:
    """(width, longest) for a multi-process run that trims caption padding (`data.trim_text_multiple`).

    Every process must cut its batches to the same width, so the width is fixed at start from the
    longest caption the training shards' manifests record, rounded up as `trimmed_length` rounds.
    `longest` is that caption's token count; both are None where a manifest predates the record
    (the run then keeps every token), and (None, None) for a single process, which trims each batch
    to its own longest caption instead.
    """
    multiple = config.data.get("trim_text_multiple", 0)
    if not multiple or jax.process_count() == 1:
        return None, None
    longest = shards.max_caption_tokens(config.data.train)
    return (None, None) if longest is None else (padded_width(longest, multiple, context_length), longest)


def train_data(config: ml_collections.ConfigDict, image_size: int) -> Any:
    """This process's grain training dataset (iterate it for a checkpointable iterator)."""
    ensure_train_data(config)
    d = config.data
    augment = AugmentConfig(image_size=image_size, scale=(d.crop_scale_min, d.crop_scale_max),
                            hflip=d.hflip, vflip=d.vflip, rot90=d.rot90)
    return train_dataset(
        shards.shard_paths(d.train),
        batch_size=config.batch_size // jax.process_count(),
        seed=config.seed,
        augment=augment,
        loader=LoaderConfig(worker_count=d.num_workers),
        skip_corrupt=d.get("skip_corrupt", 0),
    )
