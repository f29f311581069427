"""The train state and the pure, jitted train step.

`train_step(state, batch) -> (state, metrics)` is a pure function of pytrees. The NNX model only
appears at the edge: `nnx.merge(graphdef, params, rest)` inside the step. The step is compiled
with explicit in/out shardings and donates the old state.

Gradient accumulation keeps the *full-batch* contrastive loss (negatives from all micro-batches):
first every micro-batch is embedded without gradients; then each micro-batch is re-embedded with
gradients and scored against the cached embeddings of all others (GradCache). The summed gradient
equals the large-batch gradient exactly, at the cost of one extra forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsclip_jax.models.clip import MAX_LOGIT_SCALE
from rsclip_jax.models.layers import batch_sharded_activations
from rsclip_jax.preprocess import normalize_images
from rsclip_jax.losses import clip_loss, siglip_loss

# The learnable parameter is the log of the temperature; it is clamped at log(MAX_LOGIT_SCALE).
MAX_LOG_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable nnx.Param variables
    opt_state: Any
    rest: nnx.State  # non-trainable variables (BatchNorm running statistics)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    name: str = "clip"  # clip | siglip
    chunk_size: int | None = None  # chunked CLIP loss (columns per chunk)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Splits a model into graphdef + TrainState. Call under `jax.jit(..., out_shardings=...)`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rest)


def _clamp_logit_scale(params: nnx.State) -> nnx.State:
    def clamp(path: Any, x: jax.Array) -> jax.Array:
        first = path[0]
        return jnp.clip(x, 0.0, MAX_LOG_LOGIT_SCALE) if getattr(first, "key", None) == "logit_scale" else x

    return jax.tree_util.tree_map_with_path(clamp, params)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    loss: LossConfig = LossConfig(),
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure train step (not yet jitted; see `jit_train_step`).

    batch: {"images": uint8 (B, H, W, 3), "tokens": int32 (B, L)}, sharded over `batch_axes`.
    A non-finite loss, gradient or updated parameter leaves params and optimiser state unchanged
    (metric `nonfinite`),
    so a NaN never reaches the state or a checkpoint; the loop decides whether to stop.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    rows = NamedSharding(mesh, P(axes))

    def embed(params: nnx.State, rest: nnx.State, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params, rest)
        with batch_sharded_activations(rows):  # FSDP gathers parameters, never activations
            img = model.encode_image(normalize_images(images), normalize=True)
            txt = model.encode_text(tokens, normalize=True)
        return jax.lax.with_sharding_constraint(img, rows), jax.lax.with_sharding_constraint(txt, rows)

    def contrastive(img: jax.Array, txt: jax.Array, params: nnx.State) -> jax.Array:
        scale = jnp.exp(params["logit_scale"][...])
        if loss.name == "siglip":
            return siglip_loss(img, txt, scale, params["logit_bias"][...], mesh=mesh, batch_axes=axes)
        return clip_loss(img, txt, scale, mesh=mesh, batch_axes=axes, chunk_size=loss.chunk_size)

    def full_batch_grads(state: TrainState, batch: dict[str, jax.Array]) -> tuple[jax.Array, nnx.State]:
        def loss_fn(params: nnx.State) -> jax.Array:
            img, txt = embed(params, state.rest, batch["images"], batch["tokens"])
            return contrastive(img, txt, params)

        return jax.value_and_grad(loss_fn)(state.params)

    def accumulated_grads(state: TrainState, batch: dict[str, jax.Array]) -> tuple[jax.Array, nnx.State]:
        k = grad_accum_steps
        # Micro-batch j is every k-th row, so each device keeps an equal share of every micro-batch.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]), batch)
        take = lambda j: jax.tree.map(lambda x: x[:, j], micro)  # noqa: E731

        def embed_j(j: jax.Array) -> tuple[jax.Array, jax.Array]:
            mb = take(j)
            return embed(state.params, state.rest, mb["images"], mb["tokens"])

        cached_img, cached_txt = jax.lax.map(embed_j, jnp.arange(k))  # (k, B/k, D), no gradients
        cached_img, cached_txt = (jnp.swapaxes(c, 0, 1) for c in (cached_img, cached_txt))  # (B/k, k, D)
        flat = lambda c: c.reshape(-1, c.shape[-1])  # noqa: E731

        def embedding_grads(grads: nnx.State, j: jax.Array) -> tuple[nnx.State, None]:
            def loss_j(params: nnx.State) -> jax.Array:
                mb = take(j)
                img, txt = embed(params, state.rest, mb["images"], mb["tokens"])
                full_img = jax.lax.stop_gradient(cached_img).at[:, j].set(img)
                full_txt = jax.lax.stop_gradient(cached_txt).at[:, j].set(txt)
                # the temperature's own gradient is taken once, below, not once per micro-batch
                return contrastive(flat(full_img), flat(full_txt), jax.lax.stop_gradient(params))

            return jax.tree.map(jnp.add, grads, jax.grad(loss_j)(state.params)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, _ = jax.lax.scan(embedding_grads, zeros, jnp.arange(k))
        value, direct = jax.value_and_grad(lambda p: contrastive(flat(cached_img), flat(cached_txt), p))(state.params)
        return value, jax.tree.map(jnp.add, grads, direct)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        value, grads = (accumulated_grads if grad_accum_steps > 1 else full_batch_grads)(state, batch)
        grad_norm = optax.global_norm(grads)
        updates, updated_opt_state = tx.update(grads, state.opt_state, state.params)
        updated_params = _clamp_logit_scale(optax.apply_updates(state.params, updates))
        # The updated parameters are checked too: a finite gradient can still make them
        # non-finite (an overflowing learning rate or optimiser moment).
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm) & _all_finite(updated_params)

        def apply(params: nnx.State, opt_state: Any) -> tuple[nnx.State, Any]:
            return updated_params, updated_opt_state

        def skip(params: nnx.State, opt_state: Any) -> tuple[nnx.State, Any]:
            # Step counters advance even on a skipped step, so the schedule stays on `state.step`.
            def advance(path: Any, x: jax.Array) -> jax.Array:
                return optax.safe_int32_increment(x) if jax.tree_util.keystr(path).endswith("count") else x

            return params, jax.tree_util.tree_map_with_path(advance, opt_state)

        # A branch choosing whole trees, not a `where` over every parameter and moment: the guard
        # then costs next to nothing
        # (the selects were ~3% of a ViT-B/32 step on CPU, see docs/performance.md).
        params, opt_state = jax.lax.cond(finite, apply, skip, state.params, state.opt_state)
        new_state = TrainState(state.step + 1, params, opt_state, state.rest)
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "logit_scale": jnp.exp(new_state.params["logit_scale"][...]),
            "nonfinite": ~finite,
        }
        if "corrupt" in batch:  # data.skip_corrupt: examples standing in for corrupt records, over all processes
            metrics["corrupt_records"] = jnp.sum(batch["corrupt"].astype(jnp.int32))
        return new_state, metrics

    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    return train_step


def jit_train_step(
    train_step: Callable[..., Any], state_shardings: Any, mesh: Mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")
) -> Callable[..., Any]:
    """`jax.jit` with explicit shardings, donating the old state (its buffers are reused)."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    batch = NamedSharding(mesh, P(axes))
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
