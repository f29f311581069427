"""Per-device memory and collective traffic of the train step, by sharding, on simulated devices.

    python bench/scaling.py                          # ViT-B-16 and ViT-L-14, 8 devices, markdown table
    python bench/scaling.py --models ViT-B-32 --batch 64 --json plans.json

A thin driver over `rsclip train --compile-only` (rsclip_jax/train/compile_plan.py, which holds the
HLO accounting): it plans replicated (data 8), FSDP (fsdp 8) and FSDP + tensor parallel
(fsdp 4 x model 2) meshes of simulated CPU devices in one process and prints one table. The
numbers are compile-time facts of XLA's CPU backend (see the module docstring there);
docs/performance.md shows the table and what it means.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDINGS = {"replicated": "({n}, 1, 1)", "fsdp": "(1, {n}, 1)", "fsdp+tp": "(1, {half}, 2)"}
# (configs/remoteclip.py argument, model.name override): ViT-B-16 has no RemoteCLIP config of its own
ARCHS = {"ViT-B-16": ("ViT-B-32", "ViT-B-16-quickgelu"), "ViT-L-14": ("ViT-L-14", None),
         "ViT-B-32": ("ViT-B-32", None), "tiny-ViT": ("ViT-B-32", "tiny-ViT-quickgelu")}


def markdown(rows: list[dict]) -> str:
    """One row per plan: memory per device and collective payload per device per step, in GiB."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| model | sharding (data, fsdp, model) | params + optimizer GiB | temporaries GiB | total GiB | "
             "all-gather GiB (of it parameters) | all-reduce GiB (of it parameters) | reduce-scatter GiB | "
             "all-to-all GiB | XLA / analytic FLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, c, by = r["memory_per_device_bytes"], r["collectives_per_device_bytes"], r["collectives_by_payload_bytes"]
        lines.append(
            f"| {r['label']} | {r['sharding']} {r['mesh_shape']} | {gib(m['parameters'] + m['optimizer'])} | "
            f"{gib(m['xla_temporaries'])} | {gib(m['total'])} | {gib(c.get('all-gather', 0))} "
            f"({gib(by.get('all-gather/parameters', 0))}) | {gib(c.get('all-reduce', 0))} "
            f"({gib(by.get('all-reduce/parameters', 0))}) | {gib(c.get('reduce-scatter', 0))} | "
            f"{gib(c.get('all-to-all', 0))} | {r['flops_per_step']['xla_over_analytic']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-16", "ViT-L-14"], choices=sorted(ARCHS))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--shardings", nargs="+", default=list(SHARDINGS), choices=list(SHARDINGS))
    p.add_argument("--json", help="also write every plan to this JSON file")
    args = p.parse_args(argv)

    from rsclip_jax.fileio import atomic_write_json
    from rsclip_jax.train.compile_plan import plan, use_simulated_devices
    from rsclip_jax.train.config import load_config

    devices = use_simulated_devices(args.devices)
    rows = []
    for model in args.models:
        arch, name = ARCHS[model]
        for sharding in args.shardings:
            shape = SHARDINGS[sharding].format(n=args.devices, half=args.devices // 2)
            overrides = [f"--config.batch_size={args.batch}", f"--config.model.dtype={args.dtype}",
                         f"--config.mesh.shape={shape}"] + ([f"--config.model.name={name}"] if name else [])
            config = load_config(f"{REPO / 'configs' / 'remoteclip.py'}:{arch}", overrides)
            rows.append({"label": model, "sharding": sharding, "mesh_shape": shape, **plan(config, devices)})
            m = rows[-1]["memory_per_device_bytes"]
            print(f"[scaling] {model} {sharding}: total {m['total'] / 2**30:.2f} GiB per device, collectives "
                  f"{rows[-1]['collectives_total_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
