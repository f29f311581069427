"""orbax checkpoints holding the train state, the grain iterator state and the config together.

Each checkpoint is one step directory written atomically by orbax (to a temporary name, renamed
when complete), with these items (names in `rsclip_jax.checkpoint.workdir`, which reads them back
for inference without any of the training machinery):

* `state`: the TrainState (params, optimiser state, BatchNorm statistics, step), saved sharded;
* `model`: the architecture record, so the weights load back as the model they are;
* `data`: the grain iterator state (`get_state()`, taken synchronously at save time: orbax writes
  in the background while the iterator moves on), so a resumed run sees exactly the batches it
  would have seen;
* `config`: the full config as JSON, for provenance and for the resume checks;
* `metrics` (orbax's own item): the step's eval metrics, when `best_metric` is set.

Saves are asynchronous: the train loop continues while orbax writes. The last `keep` checkpoints
are kept, plus the best one by an eval metric when `best_metric` is set. Restoring takes an
abstract state carrying the *current* mesh's shardings, so a checkpoint written on 8 devices
restores onto 4 (or onto a different topology) without conversion.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from rsclip_jax.checkpoint.architecture import model_record
from rsclip_jax.checkpoint.workdir import CONFIG_ITEM, DATA_ITEM, MODEL_ITEM, STATE_ITEM, restore_variables
from rsclip_jax.models import CLIPConfig


class NonFiniteStateError(RuntimeError):
    """Refusal to checkpoint parameters that contain NaN or Inf."""


def all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.jit(lambda ls: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in ls])))(leaves))


class Checkpointer:
    """Saves and restores (state, model record, data iterator, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, best_metric: str = "", best_mode: str = "max", use_async: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.best_metric = best_metric
        self.directory = os.path.join(self.workdir, "checkpoints")
        policies: list[Any] = [pp.LatestN(n=keep)]
        if best_metric:
            policies.append(
                pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                         keep_checkpoints_without_metrics=False)
            )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE_ITEM, MODEL_ITEM, DATA_ITEM, CONFIG_ITEM),
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                MODEL_ITEM: ocp.JsonCheckpointHandler(),
                DATA_ITEM: ocp.JsonCheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                preservation_policy=pp.AnyPreservationPolicy(policies),
                # best_fn makes orbax write each step's metrics to disk, so the best checkpoint is
                # still known after a resume (and to `--best`); the policy above decides deletion.
                best_fn=(lambda m: m[best_metric]) if best_metric else None,
                best_mode=best_mode,
                enable_async_checkpointing=use_async,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any], model_config: CLIPConfig,
             metrics: dict[str, float] | None = None) -> None:
        """Starts an (asynchronous) save; refuses a state with non-finite parameters."""
        if not all_finite(state.params):
            raise NonFiniteStateError(f"step {step}: parameters contain NaN/Inf; not saving a checkpoint")
        items = {
            STATE_ITEM: ocp.args.StandardSave(state),
            MODEL_ITEM: ocp.args.JsonSave(model_record(model_config)),
            DATA_ITEM: ocp.args.JsonSave(data_iterator.get_state()),
            CONFIG_ITEM: ocp.args.JsonSave(json.loads(json.dumps(config, default=_jsonable))),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(**items),
            # Only a step whose evals produced the tracked metric competes for "best".
            metrics={k: float(v) for k, v in metrics.items()} if metrics and self.best_metric in metrics else None,
            force=True,
        )

    def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> tuple[int, Any]:
        """Restores `step` (default: latest) onto the shardings in `abstract_state`.

        `data_iterator` is updated in place to continue where the checkpointed run stopped.
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        data_iterator.set_state(restored.data)
        return step, restored.state

    def restore_weights(self, abstract_params: Any, abstract_rest: Any, step: int | None = None) -> tuple[Any, Any]:
        """Only the model variables (params, BatchNorm statistics) of a checkpoint (default: latest)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        return restore_variables(self.workdir, step, abstract_params, abstract_rest)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, the restore target for orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
