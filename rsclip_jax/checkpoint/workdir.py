"""Reading models out of training workdirs, with only the model config and the weights.

A workdir written by `rsclip train` holds `checkpoints/<step>/`, one orbax checkpoint per step with
the items (see `rsclip_jax.train.checkpointing`, which writes them):

* `state`: the TrainState pytree (`params`, `opt_state`, `rest`, `step`);
* `model`: the architecture record (`architecture.model_record`);
* `config`: the training config as JSON; `data`: the input pipeline's state;
* `metrics`: the eval metrics of that step, when the run tracks a best checkpoint.

Loading for inference reads `model` and restores only `params` and `rest` from `state`: no
optimiser, no training mesh, no training config. Checkpoints written before the `model` item
existed fall back to the training config's model name (and its SigLIP head).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from rsclip_jax.checkpoint.architecture import ArchitectureRecordError, config_from_record
from rsclip_jax.models import CLIP, CLIPConfig, create_model
from rsclip_jax.models.config import get_model_config, with_sigmoid_head

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM, DATA_ITEM, CONFIG_ITEM, MODEL_ITEM, METRICS_ITEM = "state", "data", "config", "model", "metrics"
CHECKSUMS_ITEM = "checksums"  # per-array checksums of the state, verified on resume


class WorkdirError(FileNotFoundError):
    """A workdir without the requested checkpoint (names the workdir and the steps it has)."""


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` is an rsclip training workdir (it has a `checkpoints/` folder)."""
    return os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))


def checkpoints_dir(workdir: str | os.PathLike) -> Path:
    return Path(os.path.abspath(workdir)) / CHECKPOINTS_DIR


def list_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished checkpoints' steps, ascending (orbax renames a step folder only when complete)."""
    root = checkpoints_dir(workdir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def read_json_item(workdir: str | os.PathLike, step: int, item: str) -> Any | None:
    """A JSON item of a checkpoint (`config`, `model`, `data`), or None if the step lacks it."""
    path = checkpoints_dir(workdir) / str(step) / item / "metadata"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def step_metrics(workdir: str | os.PathLike, step: int) -> dict[str, float] | None:
    """The eval metrics saved with a checkpoint (only runs with a `best_metric` save them)."""
    path = checkpoints_dir(workdir) / str(step) / METRICS_ITEM / METRICS_ITEM
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def select_step(workdir: str | os.PathLike, step: int | None = None, best: bool = False) -> int:
    """The checkpoint to load: `step`, the best by the run's `best_metric`, or the latest.

    Raises:
        WorkdirError: naming the workdir, the steps it has and, for `best`, why none qualifies.
    """
    steps = list_steps(workdir)
    if not steps:
        raise WorkdirError(f"{workdir}: no checkpoint in {checkpoints_dir(workdir)}")
    if step is not None and best:
        raise ValueError("choose either --step or --best, not both")
    if step is not None:
        if step not in steps:
            raise WorkdirError(f"{workdir}: no checkpoint at step {step}; it has steps {_steps_text(steps)}")
        return step
    if not best:
        return steps[-1]
    config = read_json_item(workdir, steps[-1], CONFIG_ITEM) or {}
    metric, mode = config.get("best_metric", ""), config.get("best_mode", "max")
    if not metric:
        raise WorkdirError(f"{workdir}: --best needs a run trained with best_metric set; this one kept only "
                           f"the latest checkpoints (steps {_steps_text(steps)}): use --step N")
    scored = [(m[metric], s) for s in steps if (m := step_metrics(workdir, s)) and metric in m]
    if not scored:
        raise WorkdirError(f"{workdir}: no checkpoint has a saved {metric!r}; steps {_steps_text(steps)}")
    # Ties go to the earlier step: the first checkpoint to reach a score is the one that earned it.
    best_value = (max if mode == "max" else min)(v for v, _ in scored)
    return min(s for v, s in scored if v == best_value)


def workdir_model_config(workdir: str | os.PathLike, step: int) -> CLIPConfig:
    """The architecture of a checkpoint: its `model` item, else the training config's model name."""
    record = read_json_item(workdir, step, MODEL_ITEM)
    if record is not None:
        return config_from_record(record, str(checkpoints_dir(workdir) / str(step) / MODEL_ITEM))
    config = read_json_item(workdir, step, CONFIG_ITEM)
    if not config or "model" not in config:
        raise ArchitectureRecordError(f"{workdir}: checkpoint {step} records neither its model nor its training "
                                      "config; pass --model NAME")
    model_config = get_model_config(config["model"]["name"])
    if config.get("loss", {}).get("name") == "siglip":
        model_config = with_sigmoid_head(model_config)
    return model_config


def restore_variables(workdir: str | os.PathLike, step: int, abstract_params: Any, abstract_rest: Any) -> tuple[Any, Any]:
    """Only the model variables (`params`, `rest`) of a checkpoint, onto the targets' shardings.

    The optimiser state is never read, so this works whatever optimiser, freezing or loss the
    checkpoint was trained with (for init_from, evaluation and export).
    """
    target = {"params": abstract_params, "rest": abstract_rest}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
    path = checkpoints_dir(workdir) / str(step) / STATE_ITEM
    with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(path, args=args)
    return restored["params"], restored["rest"]


def load_workdir_model(
    workdir: str | os.PathLike,
    step: int | None = None,
    best: bool = False,
    config: CLIPConfig | None = None,
    sharding: jax.sharding.Sharding | None = None,
    **create_kwargs: Any,
) -> tuple[CLIP, int]:
    """(model, step) of a workdir checkpoint, its variables placed with `sharding`.

    Args:
        workdir: an `rsclip train` workdir.
        step, best: which checkpoint (default: the latest); see `select_step`.
        config: the architecture; default: the one recorded with the checkpoint.
        sharding: where the variables go; default: the first local device.
        create_kwargs: `dtype`, `scan_layers`, `remat_policy` of the created model.
    """
    step = select_step(workdir, step, best)
    config = config or workdir_model_config(workdir, step)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    graphdef, params, rest = nnx.split(create_model(config, abstract=True, **create_kwargs), nnx.Param, ...)
    place = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)  # noqa: E731
    params, rest = restore_variables(workdir, step, place(params), place(rest))
    return nnx.merge(graphdef, params, rest), step


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps[-10:])) + (f" (and {len(steps) - 10} earlier)" if len(steps) > 10 else "")
