"""orbax checkpoints holding the train state, the grain iterator state and the config together.

Each checkpoint is one step directory written atomically by orbax (to a temporary name, renamed
when complete), with three items:

* `state`: the TrainState (params, optimiser state, BatchNorm statistics, step), saved sharded;
* `data`: the grain iterator state (`get_state()`, taken synchronously at save time: orbax writes
  in the background while the iterator moves on), so a resumed run sees exactly the batches it
  would have seen;
* `config`: the full config as JSON, for provenance.

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


class NonFiniteStateError(RuntimeError):
    """Refusal to checkpoint parameters that contain NaN or Inf."""


def all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.jit(lambda ls: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in ls])))(leaves))


class Checkpointer:
    """Saves and restores (state, data iterator, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, best_metric: str = "", best_mode: str = "max", use_async: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        policies: list[Any] = [pp.LatestN(n=keep)]
        if best_metric:
            policies.append(
                pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                         keep_checkpoints_without_metrics=False)
            )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "config"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                preservation_policy=pp.AnyPreservationPolicy(policies),
                enable_async_checkpointing=use_async,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Starts an (asynchronous) save; refuses a state with non-finite parameters."""
        if not all_finite(state.params):
            raise NonFiniteStateError(f"step {step}: parameters contain NaN/Inf; not saving a checkpoint")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iterator.get_state()),
                config=ocp.args.JsonSave(json.loads(json.dumps(config, default=_jsonable))),
            ),
            metrics={k: float(v) for k, v in (metrics or {}).items()} or None,
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
        """Only the model variables (params, BatchNorm statistics) of a checkpoint.

        The optimiser state is not read, so this works whatever optimiser, freezing or loss the
        checkpoint was trained with (for init_from, evaluation and export).
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        target = {"params": abstract_params, "rest": abstract_rest}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
        # A plain PyTree reader allows a partial restore of the state item written by StandardSave.
        reader = ocp.CheckpointManager(self.directory, item_names=("state",),
                                       item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                       options=ocp.CheckpointManagerOptions(read_only=True))
        args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
        restored = reader.restore(step, args=ocp.args.Composite(state=args)).state
        reader.close()
        return restored["params"], restored["rest"]

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
