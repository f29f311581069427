"""Models out of training workdirs: load the latest (or a given) checkpoint as a CLIP model.

This is what lets `rsclip embed/classify/eval/convert --checkpoint WORKDIR` use a model trained
here, and `rsclip convert WORKDIR model.safetensors` hand it to PyTorch users as an OpenCLIP
state_dict.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from rsclip_jax.models import CLIP
from rsclip_jax.train.checkpointing import Checkpointer
from rsclip_jax.train.config import validate
from rsclip_jax.train.setup import build_run


def is_workdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def model_from_workdir(workdir: str | os.PathLike, step: int | None = None) -> CLIP:
    """The CLIP model of a training workdir's checkpoint (default: the latest), on local devices."""
    checkpointer = Checkpointer(os.fspath(workdir), use_async=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint in {checkpointer.directory}")
    saved = checkpointer.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    config = ml_collections.ConfigDict(saved)
    # Inference needs no training mesh: replicate over this host's devices.
    config.mesh.shape, config.mesh.dcn_shape = (-1, 1, 1), (1, 1, 1)
    # Any batch size the inference mesh accepts; nothing is trained.
    config.batch_size = len(jax.local_devices()) * jax.process_count() * config.optim.grad_accum_steps
    validate(config)
    run = build_run(config, devices=jax.local_devices())
    params, rest = checkpointer.restore_weights(run.abstract_state.params, run.abstract_state.rest, step)
    checkpointer.close()
    return nnx.merge(run.graphdef, params, rest)
