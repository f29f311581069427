"""Per-device memory and collective traffic of the train step, by sharding, on simulated devices.

    python bench/scaling.py                          # ViT-B-16 and ViT-L-14, 8 devices, markdown table
    python bench/scaling.py --models tiny-ViT --devices 4 --batch 16

Compiles (never runs) the step `rsclip train` builds, for replicated (data 8), FSDP (fsdp 8) and
FSDP + tensor parallel (fsdp 4 x model 2) meshes of simulated CPU devices, and reads:

* XLA's `memory_analysis()`: arguments (parameters, optimizer state, the batch), outputs and
  temporaries per device;
* the bytes of each collective per device per step, summed over the compiled HLO: the result of
  an all-gather, all-reduce, all-to-all or collective-permute, the operand of a reduce-scatter.
  Collectives inside a `while` (the scan over layers, gradient accumulation) are multiplied by
  the loop's known trip count, which XLA records on the instruction.

The numbers are compile-time facts of XLA's CPU backend; a GPU or TPU compile makes different
fusion choices, so treat temporaries as indicative and parameter/optimizer bytes and collective
bytes as exact. docs/performance.md turns them into expected step times.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDINGS = {"replicated": "({n}, 1, 1)", "fsdp": "(1, {n}, 1)", "fsdp+tp": "(1, {half}, 2)"}
ARCHS = {"ViT-B-16": ("ViT-B-32", "ViT-B-16-quickgelu"), "ViT-L-14": ("ViT-L-14", None),
         "ViT-B-32": ("ViT-B-32", None), "tiny-ViT": ("ViT-B-32", "tiny-ViT-quickgelu")}
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string, e.g. `(f32[8,16]{1,0}, bf16[4])`."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            total += n * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str) -> int:
    """Devices per replica group of a collective: `replica_groups=[2,4]<=[8]` or `{{0,1,2,3},...}`."""
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
    if iota:
        return int(iota.group(1))
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    return len(explicit.group(1).split(",")) if explicit else 1


def collective_bytes(hlo: str) -> Counter:
    """Bytes per collective kind in one execution of the compiled module's entry computation."""
    computations: dict[str, list[str]] = {}
    name, entry = None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(2)
            computations[name] = []
            if header.group(1):
                entry = name
        elif name is not None and line.strip() and line.strip() != "}":
            computations[name].append(line)

    def count(comp: str, seen: tuple[str, ...] = ()) -> Counter:
        out: Counter = Counter()
        for line in computations.get(comp, []):
            op = re.search(r"=\s*(.*?)\s([a-z\-]+)\(", line)
            if not op:
                continue
            result_type, kind = op.group(1), op.group(2)
            base = kind.removesuffix("-start").removesuffix("-done")
            if base in _COLLECTIVES and not kind.endswith("-done"):
                # compiled HLO prints operands by name only: sizes come from the result type
                # (a reduce-scatter's operand is its result times the group size)
                scale = _group_size(line) if base == "reduce-scatter" else 1
                out[base] += _shape_bytes(result_type) * scale
            if kind == "while":
                body = re.search(r"body=%?([\w.\-]+)", line)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                if body and body.group(1) not in seen:
                    inner = count(body.group(1), seen + (body.group(1),))
                    out.update({k: v * (int(trips.group(1)) if trips else 1) for k, v in inner.items()})
            for called in re.findall(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line):
                if called not in seen and kind in ("call", "conditional", "fusion", "async-start"):
                    out.update(count(called, seen + (called,)))
        return out

    return count(entry) if entry else Counter()


def measure(model: str, sharding: str, devices: int, batch: int, dtype: str) -> dict:
    import jax

    from rsclip_jax.train.config import load_config
    from rsclip_jax.train.loop import train_step_for
    from rsclip_jax.train.setup import build_run

    arch, name = ARCHS[model]
    shape = SHARDINGS[sharding].format(n=devices, half=devices // 2)
    overrides = [f"--config.batch_size={batch}", f"--config.model.dtype={dtype}", f"--config.mesh.shape={shape}"]
    if name:
        overrides.append(f"--config.model.name={name}")
    config = load_config(f"{REPO / 'configs' / 'remoteclip.py'}:{arch}", overrides)
    run = build_run(config, devices=jax.devices()[:devices])
    size, ctx = run.model_config.vision.image_size, run.model_config.text.context_length
    batch_sharding = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(run.batch_axes))
    abstract_batch = {
        "images": jax.ShapeDtypeStruct((batch, size, size, 3), jax.numpy.uint8, sharding=batch_sharding),
        "tokens": jax.ShapeDtypeStruct((batch, ctx), jax.numpy.int32, sharding=batch_sharding),
    }
    compiled = train_step_for(run).lower(run.abstract_state, abstract_batch).compile()
    memory = compiled.memory_analysis()
    traffic = collective_bytes(compiled.as_text())
    return {"model": model, "sharding": sharding, "mesh": shape, "devices": devices, "batch": batch,
            "argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes, "collectives": dict(traffic),
            "collective_bytes": sum(traffic.values())}


def markdown(rows: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| model | sharding (data, fsdp, model) | batch | arguments GiB | temporaries GiB | all-gather GiB | "
             "reduce-scatter GiB | all-reduce GiB | total collective GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["collectives"]
        lines.append(f"| {r['model']} | {r['sharding']} {r['mesh']} | {r['batch']} | {gib(r['argument_bytes'])} | "
                     f"{gib(r['temp_bytes'])} | {gib(c.get('all-gather', 0))} | {gib(c.get('reduce-scatter', 0))} | "
                     f"{gib(c.get('all-reduce', 0))} | {gib(r['collective_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"], choices=sorted(ARCHS))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--shardings", nargs="+", default=list(SHARDINGS), choices=list(SHARDINGS))
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax

    jax.config.update("jax_platforms", "cpu")
    rows = []
    for model in args.models:
        for sharding in args.shardings:
            rows.append(measure(model, sharding, args.devices, args.batch, args.dtype))
            print(f"[scaling] {model} {sharding}: temporaries {rows[-1]['temp_bytes'] / 2**30:.2f} GiB, collectives "
                  f"{rows[-1]['collective_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
