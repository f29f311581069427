"""Planning a run without running it: `rsclip train --compile-only`.

Compiles, ahead of time, the exact jitted step `rsclip train` runs (`build_run` + `train_step_for`)
for the configured mesh, from abstract shapes only: no parameter is allocated, no training data is
read and no workdir is touched, so a ViT-L/14 plan fits in a laptop's memory. The devices are the
local ones, `--simulate-devices N` CPU devices, or a TPU topology (`--topology`, needs libtpu).

Reported per device:
* memory: parameters, optimizer state and other state (exact, from each array's shard shape under
  the state's sharding), the batch, XLA's temporaries (the activations kept for the backward pass
  and every intermediate buffer; XLA does not split them), the outputs not aliased to donated
  inputs, and their total, checked against `--device-memory`;
* FLOPs: XLA's count of the step lowered with the layer scans unrolled (a compiled `while` body is
  counted once by `cost_analysis()`, whatever its trip count) next to the analytic model FLOPs of
  `models/flops.py`; XLA also counts elementwise work and rematerialised recomputation;
* collectives: the bytes each kind moves per step (`hlo_collectives`), split into parameter-,
  embedding- and activation-sized payloads, in the dtypes the SPMD partitioner chose (a CPU compile
  widens bfloat16 collectives to float32 afterwards, a GPU or TPU one does not: counted as bfloat16).

The numbers are compile-time facts of the backend that compiled: a CPU compile of simulated devices
makes other fusion and scheduling choices than a GPU or TPU compile (e.g. gradients appear as
all-reduces there; XLA turns them into reduce-scatters on GPU/TPU), so temporaries are indicative
while parameter, optimizer and collective bytes hold. See docs/scaling.md.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from rsclip_jax.models.flops import train_step_flops
from rsclip_jax.tokenizer import padded_width
from rsclip_jax.train.hlo_collectives import collectives
from rsclip_jax.train.loop import train_step_for
from rsclip_jax.train.setup import Run, build_run

GIB = 2**30
# `rsclip train --compile-only` exits with this status when the plan exceeds --device-memory.
EXCEEDS_EXIT_CODE = 3


def use_simulated_devices(n: int) -> list[jax.Device]:
    """`n` CPU devices for planning. Must run before JAX initialises its backends in this process."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # already initialised: fine if it already has enough devices
        pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(f"--simulate-devices {n}: JAX was already started with {len(devices)} CPU device(s) in this "
                         "process; plan in a fresh process (e.g. the rsclip command)")
    return devices[:n]


def topology_devices(name: str) -> list[Any]:
    """The devices of a TPU topology such as `v5e:4x4`, for compiling without the hardware.

    Untested here: it needs libtpu (`pip install 'jax[tpu]'`), which provides the TPU compiler.
    """
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--topology {name}: JAX cannot describe this TPU topology here ({str(e).splitlines()[0]}); "
                         "it needs libtpu (pip install 'jax[tpu]'), or plan on CPU with --simulate-devices N") from None


def abstract_batch(run: Run, width: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `rsclip train` feeds, as shapes with the batch sharding (no data needed);
    captions `width` tokens wide (default: the model's full context length)."""
    b, size = run.config.batch_size, run.model_config.vision.image_size
    width = width or run.model_config.text.context_length
    rows = NamedSharding(run.mesh, P(run.batch_axes))
    return {"images": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=rows),
            "tokens": jax.ShapeDtypeStruct((b, width), jnp.int32, sharding=rows)}


def caption_width(config: ml_collections.ConfigDict, context_length: int, longest: int | None) -> int:
    """The width a run's steps take when its longest caption takes `longest` tokens: rounded up as
    `data.trim_text_multiple` rounds (docs/training.md, Caption padding); the full context length
    when `longest` is None.

    Raises:
        ValueError: `longest` given while the config keeps every token (trim_text_multiple=0).
    """
    if longest is None:
        return context_length
    multiple = config.data.get("trim_text_multiple", 0)
    if not multiple:
        raise ValueError(f"--caption-tokens {longest}: this config keeps all {context_length} caption tokens "
                         "(data.trim_text_multiple=0); drop the flag, or set --config.data.trim_text_multiple=8")
    return padded_width(longest, multiple, context_length)


def per_device_bytes(tree: Any) -> int:
    """Bytes of the largest shard of every array of `tree` (ShapeDtypeStructs with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _parameter_sizes(run: Run) -> set[int]:
    """Element counts of every parameter, and of one layer of each stacked (scanned) parameter, whole
    and as FSDP gathers it under tensor parallelism (still split over the `model` axis)."""
    sizes: set[int] = set()
    variables = jax.tree.leaves(run.shardings.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for variable, leaf in zip(variables, jax.tree.leaves(run.abstract_state.params)):
        axes = variable.get_metadata().get("logical_axes") if isinstance(variable, nnx.Variable) else None
        split = math.prod(run.mesh.shape[a] for a in jax.tree.leaves(tuple(leaf.sharding.spec)) if a != "fsdp")
        for n in (math.prod(leaf.shape), math.prod(leaf.shape[1:]) if axes and axes[0] == "layers" else None):
            if n is not None:
                sizes.update({n, n // split})
    return sizes


def _xla_flops(config: ml_collections.ConfigDict, devices: Any, batch: dict[str, Any]) -> float:
    """XLA's FLOPs of the whole step: lowered (not compiled) with the layer scans unrolled."""
    unrolled = ml_collections.ConfigDict(config.to_dict())
    unrolled.model.visual_scan = unrolled.model.text_scan = False
    run = build_run(unrolled, devices=devices)
    cost = train_step_for(run).lower(run.abstract_state, batch).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))


def plan(config: ml_collections.ConfigDict, devices: Any = None, device_memory: int | None = None,
         caption_tokens: int | None = None) -> dict[str, Any]:
    """Compiles the train step of `config` on `devices` (default: all local ones) and reports its costs.

    `caption_tokens`: the longest caption of the training data, in tokens (its manifest's
    `max_caption_tokens`); the step is then planned at the width the run trims its captions to,
    instead of the full context length, the most a step can take.
    """
    run = build_run(config, devices=devices)
    n = run.mesh.devices.size
    width = caption_width(config, run.model_config.text.context_length, caption_tokens)
    batch = abstract_batch(run, width)
    platform = run.mesh.devices.flat[0].platform
    compiled = train_step_for(run).lower(run.abstract_state, batch).compile()
    stats = compiled.memory_analysis()
    state = run.abstract_state
    memory = {
        "parameters": per_device_bytes(state.params),
        "optimizer": per_device_bytes(state.opt_state),
        "other_state": per_device_bytes((state.step, state.rest)),
        "batch": per_device_bytes(batch),
        "xla_arguments": int(stats.argument_size_in_bytes),
        "xla_temporaries": int(stats.temp_size_in_bytes),
        "xla_outputs_not_aliased": int(stats.output_size_in_bytes - stats.alias_size_in_bytes),
        "xla_generated_code": int(stats.generated_code_size_in_bytes),
    }
    memory["total"] = (memory["xla_arguments"] + memory["xla_temporaries"] + memory["xla_outputs_not_aliased"]
                       + memory["xla_generated_code"])
    embed_dim, accum = run.model_config.embed_dim, config.optim.grad_accum_steps
    traffic = collectives(compiled.as_text(), _parameter_sizes(run),
                          {config.batch_size * embed_dim, config.batch_size // accum * embed_dim},
                          widened_bf16=platform == "cpu")  # XLA CPU widens bf16 collectives to f32
    analytic = train_step_flops(run.model_config, config.batch_size, width)
    xla = _xla_flops(config, run.mesh.devices.flatten().tolist(), batch)
    result = {
        "model": config.model.name, "dtype": config.model.dtype, "batch_size": config.batch_size,
        "grad_accum_steps": accum, "mesh": dict(run.mesh.shape), "devices": n,
        "caption_width": width, "context_length": run.model_config.text.context_length,
        "platform": platform,
        "memory_per_device_bytes": memory,
        "flops_per_step": {
            "analytic": analytic.total, "analytic_image_tower": analytic.image_tower,
            "analytic_text_tower": analytic.text_tower, "analytic_loss": analytic.loss,
            "xla_unrolled": xla, "xla_over_analytic": xla / analytic.total if analytic.total else None,
            # what cost_analysis() of the compiled (scanned) step says, per device: loop bodies counted once
            "xla_compiled_per_device_loop_bodies_once": _compiled_flops(compiled),
            "note": ("XLA counts one micro-batch of the accumulation loops" if accum > 1 else ""),
        },
        "collectives_per_device_bytes": dict(traffic.by_kind),
        "collectives_by_payload_bytes": {f"{k}/{c}": v for (k, c), v in sorted(traffic.by_class.items())},
        "collective_counts": dict(traffic.count),
        "collectives_total_bytes": traffic.total,
        "while_loops_without_trip_count": traffic.unknown_trip_counts,
        "collectives_counted_in_bf16_as_partitioned": traffic.narrowed,  # widened to f32 by XLA CPU only
        "largest_collectives": traffic.largest,
        "device_memory": device_memory,
        "exceeds_device_memory": bool(device_memory is not None and memory["total"] > device_memory),
    }
    return result


def _compiled_flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable table `rsclip train --compile-only` prints."""
    gib = lambda b: f"{b / GIB:8.3f} GiB"  # noqa: E731
    m, f, c = p["memory_per_device_bytes"], p["flops_per_step"], p["collectives_per_device_bytes"]
    mesh = " x ".join(f"{k} {v}" for k, v in p["mesh"].items())
    width, context = p["caption_width"], p["context_length"]
    captions = (f"captions trimmed to {width} of {context} tokens (--caption-tokens)" if width < context else
                f"captions at all {context} tokens (--caption-tokens N plans at the width a run trims them to)")
    lines = [f"plan: {p['model']} ({p['dtype']}), global batch {p['batch_size']}, grad_accum_steps "
             f"{p['grad_accum_steps']}, {p['devices']} {p['platform']} devices, mesh {mesh}",
             captions,
             "", "memory per device"]
    rows = [("parameters", m["parameters"]), ("optimizer state", m["optimizer"]),
            ("other state (step, batch statistics)", m["other_state"]), ("batch", m["batch"]),
            ("  = XLA arguments", m["xla_arguments"]),
            ("activations + temporaries (XLA temp)", m["xla_temporaries"]),
            ("outputs not aliased to donated inputs", m["xla_outputs_not_aliased"]),
            ("total", m["total"])]
    lines += [f"  {name:<40}{gib(v)}" for name, v in rows]
    if p["device_memory"]:
        verdict = "EXCEEDS" if p["exceeds_device_memory"] else "fits in"
        lines.append(f"  {verdict} --device-memory {p['device_memory'] / GIB:.3f} GiB "
                     f"({m['total'] / p['device_memory']:.0%} of it)")
    ratio = f["xla_over_analytic"]
    lines += ["", "FLOPs per step (all devices)",
              f"  {'analytic model FLOPs (models/flops.py)':<40}{f['analytic']:.4e}",
              f"  {'XLA, layer scans unrolled':<40}{f['xla_unrolled']:.4e}"
              + (f"  ({ratio:.3f} x analytic)" if ratio else "")]
    if f["note"]:
        lines.append(f"  note: {f['note']}")
    lines += ["", "collectives per device per step (payload bytes)"]
    for kind in sorted(c, key=c.get, reverse=True):
        parts = ", ".join(f"{cls} {v / GIB:.3f}" for key, v in p["collectives_by_payload_bytes"].items()
                          for k, cls in [key.split("/", 1)] if k == kind)
        lines.append(f"  {kind:<40}{gib(c[kind])}  x{p['collective_counts'].get(kind, 0)}  ({parts} GiB)")
    lines.append(f"  {'total':<40}{gib(p['collectives_total_bytes'])}")
    if p["largest_collectives"]:
        lines.append("  largest: bytes per step, executions, payload, source")
        for e in p["largest_collectives"][:5]:
            lines.append(f"    {e['bytes'] / GIB:8.3f} GiB  x{e['executions']:<4} {e['kind']} {e['payload'][:60]}  "
                         f"{e['source'][-70:]}")
    if p.get("collectives_counted_in_bf16_as_partitioned"):
        lines.append(f"  note: {p['collectives_counted_in_bf16_as_partitioned']} collective(s) counted in bfloat16, as "
                     "partitioned: XLA CPU widens them to float32, a GPU or TPU does not")
    if p["while_loops_without_trip_count"]:
        lines.append(f"  note: {p['while_loops_without_trip_count']} loop(s) without a known trip count were counted "
                     "once")
    return "\n".join(lines)
