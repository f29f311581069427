"""Compiled temporary memory of the contrastive losses (forward + gradient), per device.

At a fixed local batch b, the global batch B = b x devices grows with the device count. The
all-gather loss needs O(b x B) per device, linear in B; the naive loss with replicated
embeddings builds the full (B, B) logits, quadratic in B. Run on 8 simulated CPU devices:

    python bench/bench_loss_memory.py            # prints a Markdown table

Numbers come from XLA's `memory_analysis()` of the compiled program (no timing involved).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from rsclip_jax.losses import clip_loss, naive_clip_loss, siglip_loss  # noqa: E402

LOCAL_BATCH, DIM = 512, 512


def temp_mib(fn, *args) -> float:
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
    rows = []
    for n in (1, 2, 4, 8):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])
        B = LOCAL_BATCH * n
        rows_spec = jax.ShapeDtypeStruct((B, DIM), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        replicated = jax.ShapeDtypeStruct((B, DIM), jnp.float32, sharding=NamedSharding(mesh, P()))
        scale = jnp.float32(10.0)
        gathered = temp_mib(lambda a, b: clip_loss(a, b, scale, mesh=mesh, batch_axes=("data",)), rows_spec, rows_spec)
        chunked = temp_mib(lambda a, b: clip_loss(a, b, scale, mesh=mesh, batch_axes=("data",), chunk_size=256),
                           rows_spec, rows_spec)
        sig = temp_mib(lambda a, b: siglip_loss(a, b, scale, jnp.float32(-10.0), mesh=mesh, batch_axes=("data",)),
                       rows_spec, rows_spec)
        naive = temp_mib(lambda a, b: naive_clip_loss(a, b, scale), replicated, replicated)
        rows.append((n, B, gathered, chunked, sig, naive))
    print(f"local batch b = {LOCAL_BATCH}, embedding dim {DIM}, float32; temporary MiB per device (forward + gradient)\n")
    print("| devices | global B | (a) all-gather CLIP | (b) chunked CLIP (256) | (c) SigLIP ring | naive, replicated |")
    print("|---|---|---|---|---|---|")
    for n, B, g, c, s, nv in rows:
        print(f"| {n} | {B:,} | {g:.1f} | {c:.1f} | {s:.1f} | {nv:.1f} |")


if __name__ == "__main__":
    main()
