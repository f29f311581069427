"""The training loop: resume, step, log, evaluate, checkpoint, handle preemption.

`train(config, workdir)` is what `rsclip train` runs. Rerunning the same command with the same
workdir resumes from the latest checkpoint (train state and data iterator), so the metrics after
a resume equal those of an uninterrupted run. SIGTERM (preemption) makes the loop save a
checkpoint at the next step boundary and return cleanly; so does Ctrl-C (SIGINT, unless
`preempt_on_sigint=False`), reported as `ended: "interrupted"` (the command then exits 130), and a
second Ctrl-C exits at once. Process 0 holds the workdir lock (`train/workdir_lock.py`) for the
whole run, and the checkpointer and metric writer are closed on every exit path.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils
from tqdm import tqdm

from rsclip_jax.checkpoint.architecture import config_from_record
from rsclip_jax.checkpoint.workdir import CONFIG_ITEM, MODEL_ITEM, read_json_item
from rsclip_jax.data.pipeline import to_global_batch, trim_text_padding
from rsclip_jax.fileio import require_local_path
from rsclip_jax.models.flops import train_step_flops
from rsclip_jax.train import heartbeat
from rsclip_jax.train.checkpointing import Checkpointer
from rsclip_jax.train.config import check_resume_compatible
from rsclip_jax.train.evals import TrainingEvals
from rsclip_jax.train.metrics import MetricWriter, peak_flops_per_device
from rsclip_jax.train.setup import Run, apply_cpu_dispatch, build_run, fixed_caption_width, initial_state, train_data
from rsclip_jax.train.step import LossConfig, jit_train_step, make_train_step
from rsclip_jax.train.workdir_lock import WorkdirLock

# max_skipped_fraction is checked only after this many steps of a run (one early blow-up in a short
# run is not yet a trend).
SKIPPED_FRACTION_MIN_STEPS = 20


class NonFiniteLossError(RuntimeError):
    """Raised under nan_policy='stop' when a step's loss, gradient or update is NaN/Inf."""


class CorruptDataError(ValueError):
    """Raised when more than data.skip_corrupt corrupt training records were met."""


class TooManySkippedStepsError(NonFiniteLossError):
    """Raised under nan_policy='skip' when max_skipped_steps or max_skipped_fraction is exceeded."""


class _Preemption:
    """Turns SIGTERM (and SIGINT, when asked) into a stop that every process agrees on.

    One process: a Python handler sets a flag, read at the next step boundary. Several processes:
    JAX's preemption service (`jax.distributed`) owns SIGTERM. A notice on any process reaches
    all of them through the coordination service, which picks the next step every process can
    reach; `agreed(step)` is called every step and costs no collective, so a job saves within a
    step or two of the signal whatever the log interval. SIGINT is handed to the same service by
    raising SIGTERM. A second SIGINT calls `on_abort` and exits at once (status 130).
    """

    def __init__(self, sigint: bool = False, on_abort: Any = None) -> None:
        self.requested = False
        self.signal_name = "SIGTERM"
        self._on_abort = on_abort
        self._previous: dict[int, Any] = {}
        self.service = (jax.process_count() > 1
                        and getattr(distributed.global_state, "preemption_sync_manager", None) is not None)
        if not self.service:  # with the service, its C++ handler must keep SIGTERM
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        if sigint:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.requested and self.signal_name == "SIGINT":
                print("[train] second Ctrl-C: exiting at once, without waiting for the checkpoint "
                      "(the last complete one is kept)", file=sys.stderr, flush=True)
                if self._on_abort is not None:
                    self._on_abort()
                os._exit(130)
            _log("Ctrl-C: saving a checkpoint at the next step boundary, then exiting; press Ctrl-C again to "
                 "exit at once")
            if self.service and not self.requested:
                os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice to every process
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    @property
    def every_step(self) -> bool:
        """Whether `agreed` may be called at every step (no collective), not only at sync points."""
        return self.service or jax.process_count() == 1

    def agreed(self, step: int) -> bool:
        """Whether every process stops after `step`: each process calls it after the same steps."""
        if jax.process_count() == 1:
            return self.requested
        if self.service:
            return multihost_utils.reached_preemption_sync_point(step)
        # jax_enable_preemption_service off: a collective, so only at the loop's sync points
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> dict[str, Any]:
    """Trains to `config.total_steps`, resuming from `workdir` when it holds a checkpoint.

    The evaluations of `config.evals` run on the training mesh (see `train/evals.py`). Resuming
    with another architecture, batch size or loss is refused unless `allow_config_change`.
    Returns a summary: final step, last logged metrics, eval results and how the run ended.
    """
    require_local_path(workdir, "--workdir")
    apply_cpu_dispatch(config, _log)  # first: the next line creates JAX's backends
    os.makedirs(workdir, exist_ok=True)
    # Only process 0 locks: the others share its workdir (and would refuse each other).
    lock = WorkdirLock(workdir, log=_log).acquire() if jax.process_index() == 0 else None
    try:
        return _train(config, workdir, allow_config_change, lock)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool,
           lock: WorkdirLock | None) -> dict[str, Any]:
    heartbeat.background("setup")  # data build, weights, restore, first step: beats from a thread until stepping
    run = build_run(config)
    training_evals = TrainingEvals(config, run.mesh, run.graphdef)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints, config.best_metric, config.best_mode)
    opened: list[Any] = [checkpointer]  # closed, last opened first, on every exit path
    try:
        summary = _resume_and_loop(config, workdir, allow_config_change, lock, run, training_evals, checkpointer,
                                   opened)
        heartbeat.background("close")  # waits for the last asynchronous save
    except BaseException:
        # Closed on the error path too (no orbax thread may keep the process alive), without an
        # error from closing hiding the first one.
        for item in reversed(opened):
            try:
                item.close()
            except Exception as e:  # noqa: BLE001
                _log(f"while stopping after an error, closing {type(item).__name__} failed too: {e}")
        raise
    for item in reversed(opened):
        item.close()
    return summary


def _resume_and_loop(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool,
                     lock: WorkdirLock | None, run: Run, training_evals: TrainingEvals,
                     checkpointer: Checkpointer, opened: list[Any]) -> dict[str, Any]:
    data_iter = iter(train_data(config, run.model_config.vision.image_size))

    def check_step(step: int) -> None:
        try:
            saved = read_json_item(workdir, step, CONFIG_ITEM) or {}
            record = read_json_item(workdir, step, MODEL_ITEM)
        except (OSError, ValueError):
            return  # unreadable: the restore fails on it too, and falls back
        saved_model = config_from_record(record, workdir) if record is not None else None
        check_resume_compatible(workdir, saved, config, allow_config_change, saved_model, run.model_config)

    restored = checkpointer.restore_newest_valid(run.abstract_state, data_iter, check_step, _log)
    if restored is not None:
        start, state = restored
        _log(f"resumed from {checkpointer.directory} at step {start}")
    else:
        start, state = 0, initial_state(run)
        _log(f"started from {'scratch' if not config.model.init_from else config.model.init_from}")
    writer = MetricWriter(workdir, resume_step=start)
    opened.append(writer)
    step_fn = train_step_for(run)
    return _loop(run, config, state, start, data_iter, step_fn, checkpointer, writer, training_evals,
                 on_abort=lock.release if lock is not None else None)


def train_step_for(run: Run) -> Any:
    """The jitted train step `rsclip train` runs for `run` (loss, accumulation, shardings, donation)."""
    config = run.config
    loss = LossConfig(config.loss.name, config.loss.chunk_size or None)
    step = make_train_step(run.graphdef, run.tx, run.schedule, run.mesh, batch_axes=run.batch_axes, loss=loss,
                           grad_accum_steps=config.optim.grad_accum_steps)
    return jit_train_step(step, run.shardings, run.mesh, run.batch_axes)


def _loop(run: Run, config: ml_collections.ConfigDict, state: Any, start: int, data_iter: Any, step_fn: Any,
          checkpointer: Checkpointer, writer: MetricWriter, training_evals: TrainingEvals,
          on_abort: Any = None) -> dict[str, Any]:
    config_dict = config.to_dict()
    preemption = _Preemption(sigint=config.get("preempt_on_sigint", True), on_abort=on_abort)
    step_flops = train_step_flops(run.model_config, config.batch_size)
    peak = peak_flops_per_device(config.peak_tflops_per_device)
    trim = config.data.get("trim_text_multiple", 0)
    fixed_width, longest = fixed_caption_width(config, run.model_config.text.context_length)
    if trim and jax.process_count() > 1:
        _log(f"one caption width for every process: the shards' longest caption takes {longest} tokens" if longest
             else "captions keep every token in a multi-process run: a training manifest does not record its longest "
                  "caption (max_caption_tokens); rebuild the shards with `rsclip data build` to trim their padding")
    flops_by_width: dict[int, float] = {}  # model FLOPs per device of a step, by its captions' width
    _log(f"model FLOPs per step at the full context length: {step_flops.total:.3e} (image tower "
         f"{step_flops.image_tower:.3e}, text tower {step_flops.text_tower:.3e}, loss {step_flops.loss:.3e}; a step "
         f"whose captions were trimmed counts its own); peak per device: "
         + (f"{peak / 1e12:g} TFLOP/s, so metrics log mfu" if peak else
            "unknown for this device kind, so no mfu (set --config.peak_tflops_per_device)"))
    # Redraw often on a terminal; in logs (not a TTY) every redraw is a line, so only every 30 s.
    bar = tqdm(total=config.total_steps, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=jax.process_index() != 0, dynamic_ncols=True,
               mininterval=0.2 if sys.stderr.isatty() else 30.0)
    # The host reads metrics only at sync points, so steps are dispatched ahead of the device.
    # Between them, non-finite steps are counted on the device (the step already dropped their
    # updates, so the state stays finite either way).
    sync_every = min(config.log_every_steps, 10)
    nonfinite, first_nonfinite = jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)
    corrupt = jnp.zeros((), jnp.int32)  # records replaced under data.skip_corrupt, summed on the device
    skip_corrupt = config.data.get("skip_corrupt", 0)
    last: dict[str, float] = {}
    evals: dict[str, float] = {}
    skipped, ended, saved_step = 0, "completed", None
    window_start, window_steps, window_flops, window_tokens = time.perf_counter(), 0, 0.0, 0
    window_input = 0.0  # seconds the loop spent getting batches ready (see input_wait_fraction)
    step = start
    try:
        while step < config.total_steps:
            input_start = time.perf_counter()
            host_batch = next(data_iter)
            if trim:
                host_batch = trim_text_padding(host_batch, trim, fixed_width)
            width = host_batch["tokens"].shape[1]
            if width not in flops_by_width:
                flops_by_width[width] = train_step_flops(run.model_config, config.batch_size, width).total \
                    / run.mesh.devices.size
                if width < run.model_config.text.context_length:  # a new width compiles the step once more
                    _log(f"captions trimmed to {width} tokens (data.trim_text_multiple={trim}): the step compiles "
                         "for this width once")
            window_flops += flops_by_width[width]
            window_tokens += width
            batch = to_global_batch(host_batch, run.mesh, run.batch_axes)
            window_input += time.perf_counter() - input_start
            state, metrics = step_fn(state, batch)
            if step == start:  # first batch, compile, first run (collectives connect): minutes for a large model
                jax.block_until_ready(metrics)
                heartbeat.foreground("train")
            heartbeat.beat()  # from here on only steps beat: a process stopped, or stuck in a collective, stops
            checkpointer.check()  # a background save that failed (disk full) stops the run now, naming its step
            step += 1
            window_steps += 1
            first_nonfinite = jnp.where(metrics["nonfinite"] & (first_nonfinite < 0), step, first_nonfinite)
            nonfinite = nonfinite + metrics["nonfinite"].astype(jnp.int32)
            if "corrupt_records" in metrics:
                corrupt = corrupt + metrics["corrupt_records"]
            bar.update(1)
            log = step % config.log_every_steps == 0 or step == config.total_steps
            due_evals = training_evals.due(step)
            evaluate = bool(due_evals)
            save = step == config.total_steps or step % config.checkpoint_every_steps == 0
            # Sync points fall on the same steps on every process. Preemption is agreed at every
            # step (without a collective) where JAX's preemption service runs, else at sync points.
            stop = preemption.agreed(step) if preemption.every_step else False
            if not (log or evaluate or save or stop or step % sync_every == 0):
                continue
            stop = stop or (not preemption.every_step and preemption.agreed(step))
            fetched = jax.device_get((metrics, nonfinite, first_nonfinite, corrupt))
            metrics, new_nonfinite, first, corrupt_total = fetched
            if skip_corrupt and corrupt_total > skip_corrupt:
                raise CorruptDataError(
                    f"{int(corrupt_total)} corrupt training records met by step {step} since this run started, more "
                    f"than data.skip_corrupt={skip_corrupt}; stopping. The log names each one: rebuild those shards "
                    "with `rsclip data build`, or raise the limit")
            if new_nonfinite:
                skipped += int(new_nonfinite)
                msg = (f"{int(new_nonfinite)} step(s) with a non-finite loss, gradient or updated parameters, first "
                       f"at step {int(first)}")
                if config.nan_policy == "stop":
                    raise NonFiniteLossError(msg + "; stopping (nan_policy='stop'). Lower the learning rate or "
                                             "check the data; the last checkpoint holds finite parameters.")
                _log(msg + "; their updates were skipped (nan_policy='skip')")
                _check_skip_limits(config, skipped, step - start)
                nonfinite, first_nonfinite = jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32)
            bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
            if log:
                elapsed = time.perf_counter() - window_start
                last = _step_metrics(metrics, step, window_steps, elapsed, config.batch_size, window_flops, peak,
                                     skipped)
                last["text_tokens"] = window_tokens / window_steps
                # Near 0: the input pipeline keeps up. Near 1: the devices wait on the host's batches.
                last["input_wait_fraction"] = min(1.0, window_input / max(elapsed, 1e-9))
                if skip_corrupt:
                    last["corrupt_records"] = int(corrupt_total)
                writer.write(step, last)
                window_start, window_steps, window_flops, window_tokens = time.perf_counter(), 0, 0.0, 0
                window_input = 0.0
            step_evals = None
            if evaluate:
                with heartbeat.keepalive("eval"):
                    step_evals = _run_evals(training_evals, due_evals, step, state, writer)
            evals = step_evals or evals
            if save:
                # Only metrics computed at this step: "best" must never credit a stale evaluation.
                with heartbeat.keepalive("save"):
                    checkpointer.save(step, state, data_iter, config_dict, run.model_config, step_evals)
                saved_step = step
            if stop:
                if saved_step != step:
                    checkpointer.save(step, state, data_iter, config_dict, run.model_config, step_evals)
                checkpointer.wait()
                ended = "interrupted" if preemption.signal_name == "SIGINT" else "preempted"
                cause = preemption.signal_name if preemption.requested else "preemption notice from another process"
                _log(f"{cause}: checkpoint saved at step {step}; rerun the same command to resume")
                break
    finally:
        bar.close()
        preemption.restore()
    return {"step": step, "ended": ended, "metrics": last, "evals": evals, "skipped_steps": skipped}


def _check_skip_limits(config: ml_collections.ConfigDict, skipped: int, steps: int) -> None:
    """Stops a run under nan_policy='skip' that skips too many steps: it is no longer training."""
    limit, fraction = config.get("max_skipped_steps", 0), config.get("max_skipped_fraction", 0.0)
    over = None
    if limit and skipped > limit:
        over = f"more than max_skipped_steps={limit}"
    elif fraction and steps >= SKIPPED_FRACTION_MIN_STEPS and skipped > fraction * steps:
        over = f"more than max_skipped_fraction={fraction:g} of the steps"
    if over:
        raise TooManySkippedStepsError(
            f"{skipped} of {steps} steps skipped for a non-finite loss, gradient or update since this run started, "
            f"{over}; stopping. Lower the learning rate or check the data (the last checkpoint holds finite "
            f"parameters), or raise the limit (0 disables it).")


def _step_metrics(metrics: dict[str, Any], step: int, steps: int, seconds: float, batch_size: int,
                  window_flops: float, peak: float | None, skipped: int) -> dict[str, float]:
    """The metrics.jsonl record of a log window of `steps` steps; `window_flops`: their model FLOPs per device."""
    out = {k: float(metrics[k]) for k in ("loss", "grad_norm", "lr", "logit_scale")}
    out["step"] = step
    out["samples_per_sec"] = batch_size * steps / max(seconds, 1e-9)
    out["skipped_steps"] = skipped
    if window_flops:
        out["tflops_per_device"] = window_flops / max(seconds, 1e-9) / 1e12
        if peak:
            out["mfu"] = window_flops / max(seconds, 1e-9) / peak
    return out


def _run_evals(evals: TrainingEvals, names: list[str], step: int, state: Any, writer: MetricWriter) -> dict[str, float]:
    results = evals(state, names)
    if evals.best_metric:
        evals.check_metric(evals.best_metric, results)
    writer.write(step, {"step": step, **results}, kind="eval")
    return results


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[train] {msg}", file=sys.stderr, flush=True)


def read_metrics(workdir: str, kind: str = "train") -> list[dict[str, Any]]:
    """The records of `workdir/metrics.jsonl` (or `eval_metrics.jsonl`), in order."""
    path = os.path.join(workdir, "metrics.jsonl" if kind == "train" else f"{kind}_metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
