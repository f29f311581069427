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
* `checksums`: a checksum of every array of the state, computed on device when saving;
* `metrics` (orbax's own item): the step's eval metrics, when `best_metric` is set.

Resuming takes the newest checkpoint that verifies: orbax restores it (its own checks: metadata,
compressed chunks) and the restored arrays match their saved checksums (which catches a flipped
byte in an uncompressed chunk, restored silently otherwise). A checkpoint that fails is named with
the reason, moved to `workdir/checkpoints_rejected/`, and the next older one is tried.

A save that fails in the background (disk full, permissions) is raised by `check()`, which the loop
calls every step, as a `CheckpointSaveError` naming the step whose save failed.

Saves are asynchronous: the train loop continues while orbax writes. The last `keep` checkpoints
are kept, plus the best one by an eval metric when `best_metric` is set. Restoring takes an
abstract state carrying the *current* mesh's shardings, so a checkpoint written on 8 devices
restores onto 4 (or onto a different topology) without conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from rsclip_jax.checkpoint.architecture import model_record
from rsclip_jax.checkpoint.workdir import (CHECKSUMS_ITEM, CONFIG_ITEM, DATA_ITEM, MODEL_ITEM, STATE_ITEM,
                                           read_json_item, restore_variables)
from rsclip_jax.models import CLIPConfig


class NonFiniteStateError(RuntimeError):
    """Refusal to checkpoint parameters that contain NaN or Inf."""


REJECTED_DIR = "checkpoints_rejected"  # checkpoints that failed verification, kept for inspection


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (names the step and the reason)."""


class NoValidCheckpointError(OSError):
    """No checkpoint of a workdir verifies (names each one and why)."""


def all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.jit(lambda ls: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in ls])))(leaves))


def _array_checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of an array's bits: sum of (bits * (2i + 1)) mod 2**32 over its elements.

    Any change of one element changes it (the weight is odd, so invertible mod 2**32), and so does
    a swap of two elements; it runs on device over the sharded array, without gathering it.
    """
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = jnp.dtype(x.dtype).itemsize
        if width not in (1, 2, 4):
            raise ValueError(f"no checksum for {x.dtype} arrays")
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    flat = bits.reshape(-1)
    weights = jnp.arange(flat.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(flat * weights, dtype=jnp.uint32)


@jax.jit
def _checksums_and_finite(state: Any) -> tuple[dict[str, jax.Array], jax.Array]:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    sums = {jax.tree_util.keystr(path): _array_checksum(x) for path, x in leaves}
    params = [x for x in jax.tree.leaves(state.params) if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in params])) if params else jnp.bool_(True)
    return sums, finite


def state_checksums(state: Any) -> tuple[dict[str, int], bool]:
    """Checksums of every array of a TrainState, by tree path, and whether its params are all finite."""
    sums, finite = jax.device_get(_checksums_and_finite(state))
    return {k: int(v) for k, v in sums.items()}, bool(finite)


def _reason(e: BaseException, head: int = 200, tail: int = 300) -> str:
    """The first line of an exception, for a one-line report. tensorstore's run long, with the
    cause (e.g. "No space left on device") at the end, so a long line keeps its start and end."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if len(text) > head + tail:
        text = f"{text[:head]} ... {text[-tail:]}"
    return f"{type(e).__name__}: {text}"


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
            item_names=(STATE_ITEM, MODEL_ITEM, DATA_ITEM, CONFIG_ITEM, CHECKSUMS_ITEM),
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                MODEL_ITEM: ocp.JsonCheckpointHandler(),
                DATA_ITEM: ocp.JsonCheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(),
                CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(),
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
        self._last_save: int | None = None  # the step of the newest save started
        self._unconfirmed = False  # whether that save's outcome is still to be checked

    def _save_failed(self, e: Exception, step: int | None) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} to {self.directory} failed: {_reason(e)}. The run stops here; "
            "the last complete checkpoint is kept. Free space or fix the permissions there, then rerun the same "
            "command to resume")

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict[str, Any], model_config: CLIPConfig,
             metrics: dict[str, float] | None = None) -> None:
        """Starts an (asynchronous) save; refuses a state with non-finite parameters.

        Raises CheckpointSaveError when this save cannot start or the previous one failed.
        """
        checksums, finite = state_checksums(state)
        if not finite:
            raise NonFiniteStateError(f"step {step}: parameters contain NaN/Inf; not saving a checkpoint")
        self.check()
        items = {
            STATE_ITEM: ocp.args.StandardSave(state),
            MODEL_ITEM: ocp.args.JsonSave(model_record(model_config)),
            DATA_ITEM: ocp.args.JsonSave(data_iterator.get_state()),
            CONFIG_ITEM: ocp.args.JsonSave(json.loads(json.dumps(config, default=_jsonable))),
            CHECKSUMS_ITEM: ocp.args.JsonSave(checksums),
        }
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(**items),
                # Only a step whose evals produced the tracked metric competes for "best".
                metrics={k: float(v) for k, v in metrics.items()} if metrics and self.best_metric in metrics else None,
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            raise self._save_failed(e, step) from e
        self._last_save, self._unconfirmed = step, True

    def check(self) -> None:
        """Raises CheckpointSaveError if an asynchronous save failed since the last call (cheap: the
        loop calls it every step, so a failure is reported while the run is still at that save)."""
        if self._last_save is None:
            return
        try:
            self.manager.check_for_errors()
            # A save ends in orbax's finalize thread, which keeps its error until joined: join it
            # (at once, it is done) as soon as the save is no longer in progress, once per save.
            if self._unconfirmed and not self.manager.is_saving_in_progress():
                self._unconfirmed = False
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e, self._last_save) from e

    def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> tuple[int, Any]:
        """Restores `step` (default: latest) onto the shardings in `abstract_state`, verified.

        `data_iterator` is updated in place to continue where the checkpointed run stopped.
        Raises NoValidCheckpointError when it does not verify (see `restore_newest_valid`).
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        state, data = self._restore_verified(step, abstract_state)
        data_iterator.set_state(data)
        return step, state

    def restore_newest_valid(self, abstract_state: Any, data_iterator: Any, check_step: Callable[[int], None],
                             log: Callable[[str], None]) -> tuple[int, Any] | None:
        """Restores the newest checkpoint that verifies; None when the workdir has no checkpoint.

        `check_step(step)` runs first for each candidate and may raise to refuse the resume (e.g.
        another architecture): that is the user's error, never a reason to fall back. A checkpoint
        that fails to restore or to verify is logged with the reason, moved to
        `checkpoints_rejected/` (by process 0), and the next older one is tried. When none is left,
        NoValidCheckpointError lists each one and why.
        """
        problems = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            check_step(step)
            try:
                state, data = self._restore_verified(step, abstract_state)
            except NoValidCheckpointError as e:
                problems.append(f"step {step}: {e}")
                log(f"checkpoint {self.directory}/{step} does not verify, skipping it: {e}")
                self._reject(step, log)
                continue
            data_iterator.set_state(data)
            if problems:
                log(f"resuming from step {step}, the newest checkpoint that verifies ({len(problems)} newer one(s) "
                    f"moved to {os.path.join(self.workdir, REJECTED_DIR)})")
            return step, state
        if problems:
            raise NoValidCheckpointError(
                f"{self.directory}: no checkpoint verifies ({'; '.join(problems)}). They were moved to "
                f"{os.path.join(self.workdir, REJECTED_DIR)}; rerun to start from scratch, or restore them from a "
                "backup")
        return None

    def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """orbax's restore plus the saved checksums; NoValidCheckpointError (one line) on any failure,
        agreed by every process."""
        reason = ""
        state = data = None
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                              data=ocp.args.JsonRestore()))
            state, data = restored.state, restored.data
            saved = read_json_item(self.workdir, step, CHECKSUMS_ITEM)
            if saved is not None:  # checkpoints written before checksums restore unverified
                actual, _ = state_checksums(state)
                bad = sorted(k for k in set(saved) | set(actual) if saved.get(k) != actual.get(k))
                if bad:
                    reason = (f"{len(bad)} array(s) differ from their saved checksums: {', '.join(bad[:3])}"
                              + (" ..." if len(bad) > 3 else ""))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            reason = _reason(e)
        if jax.process_count() > 1:  # every process restores the same step, or none does
            failed = multihost_utils.process_allgather(np.array(bool(reason)))
            if np.any(failed) and not reason:
                reason = f"failed on process(es) {', '.join(str(i) for i in np.flatnonzero(failed))}; see their logs"
        if reason:
            raise NoValidCheckpointError(reason)
        return state, data

    def _reject(self, step: int, log: Callable[[str], None]) -> None:
        """Moves a checkpoint that does not verify out of orbax's sight (a later save of the same
        step must not collide with it), keeping it for inspection."""
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, REJECTED_DIR, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                shutil.move(os.path.join(self.directory, str(step)), target)
            except OSError as e:
                log(f"could not move the rejected checkpoint {self.directory}/{step} aside: {e}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rsclip_reject_checkpoint_{step}")
        self.manager.reload()

    def restore_weights(self, abstract_params: Any, abstract_rest: Any, step: int | None = None) -> tuple[Any, Any]:
        """Only the model variables (params, BatchNorm statistics) of a checkpoint (default: latest)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        return restore_variables(self.workdir, step, abstract_params, abstract_rest)

    def wait(self) -> None:
        """Waits for the pending save; CheckpointSaveError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(e, self._last_save) from e
        self.check()

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
