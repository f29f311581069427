"""Shared building blocks: parameters with logical axes, LayerNorm, and the stacked transformer.

Every parameter is an `nnx.Param` whose `logical_axes` metadata names each dimension
(`embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`, ...). The training code maps those names to
mesh axes through a rules table, MaxText style; nothing here knows about meshes.

Numerics: parameters and the residual stream stay in float32. Matmuls take their inputs in the
compute dtype (float32 or bfloat16) and accumulate in float32, which is both accurate and the fast
path on CPU, GPU and TPU. LayerNorm and softmax always run in float32.

The transformer keeps its layers *stacked* (a leading `layers` axis on every block parameter) so
the forward pass can `lax.scan` over them: on XLA this compiles once per block instead of once
per layer, and measured 2x faster on CPU than a Python loop (see docs/performance.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from rsclip_jax.models.config import mlp_width

Array = jax.Array

LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by OpenCLIP.

# Names of saved values, for the remat policies below.
MM_NAME, MLP_ACTIVATION_NAME = "mm", "mlp_activation"
_policies = jax.checkpoint_policies
# `mm`'s products are custom-VJP calls, not dot_general, so the dot policies also save them by name,
# and the MLP activation (recomputing it costs more than keeping it on CPU, docs/performance.md).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,  # no rematerialisation
    "full": _policies.nothing_saveable,
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable,
                                                       _policies.save_only_these_names(MM_NAME, MLP_ACTIVATION_NAME)),
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _policies.save_only_these_names(MM_NAME, MLP_ACTIVATION_NAME)),
}


# How activations are laid out across devices: set by the training step while it traces the model
# (`batch_sharded_activations`); None (the default, e.g. inference on one device) leaves it to XLA.
_ACTIVATION_SHARDING: contextvars.ContextVar[Any] = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def batch_sharded_activations(sharding: Any) -> Iterator[None]:
    """Within this context, the transformer keeps its activations (B, ...) laid out as `sharding`.

    Why: without it, XLA's SPMD partitioner may follow the parameters' FSDP sharding (e.g. a kernel's
    `embed` dimension) into the residual stream, replicate the batch and all-reduce whole activations
    in every layer, instead of all-gathering each layer's parameters (docs/performance.md, scaling).
    """
    token = _ACTIVATION_SHARDING.set(sharding)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def constrain_activation(x: Array) -> Array:
    """`x` with the activation sharding of `batch_sharded_activations`, if one is set."""
    sharding = _ACTIVATION_SHARDING.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def param(
    rngs: nnx.Rngs | None,
    init: Callable[..., Array],
    shape: Sequence[int],
    axes: Sequence[str | None],
) -> nnx.Param:
    """A float32 parameter annotated with the logical name of each dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), jnp.float32), logical_axes=tuple(axes))


def normal(std: float) -> Callable[..., Array]:
    return jax.nn.initializers.normal(stddev=std)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def layer_norm(x: Array, scale: Array, bias: Array) -> Array:
    """LayerNorm over the last axis, computed in float32 whatever the input dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
    return (y * scale + bias).astype(x.dtype)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, matching torch.nn.GELU()."""
    return jax.nn.gelu(x, approximate=False)


def activation(quick: bool) -> Callable[[Array], Array]:
    return quick_gelu if quick else gelu


def mm(x: Array, w: Array, dtype: jnp.dtype, spec: str) -> Array:
    """einsum with inputs cast to the compute dtype and float32 accumulation.

    Its backward (a custom VJP) multiplies in the compute dtype too, as torch autocast does: left
    to autodiff, a bfloat16 product's float32 cotangent meets a bfloat16 operand and XLA CPU falls
    back to a mixed-precision dot at half the bfloat16 rate (docs/performance.md). The output is
    named `MM_NAME`, which the dot remat policies save.
    """
    return checkpoint_name(_einsum(spec, jnp.dtype(dtype).name, x, w), MM_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(spec: str, dtype: str, x: Array, w: Array) -> Array:
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _einsum_fwd(spec: str, dtype: str, x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _einsum(spec, dtype, x, w), (x, w)  # the backward casts them again (cheap, elementwise)


def _einsum_bwd(spec: str, dtype: str, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = res
    lhs_rhs, out = spec.split("->")
    lhs, rhs = lhs_rhs.split(",")
    xc, wc, gc = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", gc, wc, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{lhs},{out}->{rhs}", xc, gc, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def resolve_attention(attention: str, dtype: Any) -> str:
    """The `jax.nn.dot_product_attention` implementation of `model.attention`.

    `auto` takes cuDNN's fused flash attention on an NVIDIA GPU when the compute dtype is
    bfloat16 (cuDNN has no float32 kernel), and XLA's attention everywhere else.

    Raises:
        ValueError: for an unknown name, or `cudnn` without a GPU or with float32.
    """
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention {attention!r}: choose from {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if attention == "auto":
        return "cudnn" if on_gpu and half else "xla"
    if attention == "cudnn" and not on_gpu:
        raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU (cuDNN flash attention); this backend is "
                         f"{jax.default_backend()}: use 'auto' or 'xla'")
    if attention == "cudnn" and not half:
        raise ValueError("model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN attention has no float32 "
                         "kernel); use 'auto' to fall back to XLA in float32")
    return attention


class LayerNorm(nnx.Module):
    """LayerNorm parameters (`scale`, `bias`) over a feature axis of logical name `axis`."""

    def __init__(self, dim: int, axis: str = "embed"):
        self.scale = param(None, ones, (dim,), (axis,))
        self.bias = param(None, zeros, (dim,), (axis,))

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.scale[...], self.bias[...])


class Transformer(nnx.Module):
    """Pre-LN transformer with `layers` residual attention blocks stored stacked.

    Block parameters (each with a leading `layers` axis):
      ln_1_scale/bias (d), qkv_kernel (d, 3, H, hd), qkv_bias (3, H, hd), out_kernel (H, hd, d),
      out_bias (d), ln_2_scale/bias (d), fc_kernel (d, m), fc_bias (m), proj_kernel (m, d), proj_bias (d).
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        causal: bool = False,
        dtype: Any = jnp.float32,
        scan_layers: bool = True,
        remat_policy: str = "none",
        attention: str = "xla",
        rngs: nnx.Rngs,
    ):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
        d, L, H = width, layers, heads
        hd, m = d // H, mlp_width(d, mlp_ratio)
        self.layers, self.heads, self.causal = L, H, causal
        self.quick_gelu, self.dtype = quick_gelu, dtype
        self.scan_layers, self.remat_policy = scan_layers, remat_policy
        self.attention = resolve_attention(attention, dtype)
        # OpenCLIP text-tower init: attention std d^-0.5, residual projections scaled by depth.
        attn_std, fc_std = d**-0.5, (2 * d) ** -0.5
        proj_std = attn_std * (2 * L) ** -0.5
        self.ln_1_scale = param(rngs, ones, (L, d), ("layers", "embed"))
        self.ln_1_bias = param(rngs, zeros, (L, d), ("layers", "embed"))
        self.qkv_kernel = param(rngs, normal(attn_std), (L, d, 3, H, hd), ("layers", "embed", None, "heads", "kv"))
        self.qkv_bias = param(rngs, zeros, (L, 3, H, hd), ("layers", None, "heads", "kv"))
        self.out_kernel = param(rngs, normal(proj_std), (L, H, hd, d), ("layers", "heads", "kv", "embed"))
        self.out_bias = param(rngs, zeros, (L, d), ("layers", "embed"))
        self.ln_2_scale = param(rngs, ones, (L, d), ("layers", "embed"))
        self.ln_2_bias = param(rngs, zeros, (L, d), ("layers", "embed"))
        self.fc_kernel = param(rngs, normal(fc_std), (L, d, m), ("layers", "embed", "mlp"))
        self.fc_bias = param(rngs, zeros, (L, m), ("layers", "mlp"))
        self.proj_kernel = param(rngs, normal(proj_std), (L, m, d), ("layers", "mlp", "embed"))
        self.proj_bias = param(rngs, zeros, (L, d), ("layers", "embed"))

    def _block(self, x: Array, p: dict[str, Array]) -> Array:
        """One residual attention block on x (B, T, d) with unstacked parameters p."""
        dt, act = self.dtype, activation(self.quick_gelu)
        x = constrain_activation(x)
        h = layer_norm(x, p["ln_1_scale"], p["ln_1_bias"])
        qkv = mm(h, p["qkv_kernel"], dt, "btd,dshk->sbthk") + p["qkv_bias"][:, None, None]
        q, k, v = (t.astype(dt) for t in qkv)
        # The XLA path computes logits and softmax in float32 and is exact enough for parity tests;
        # cuDNN's flash attention (bfloat16 on GPU) never materialises the (T, T) scores.
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation=self.attention)
        x = constrain_activation(x + mm(attn, p["out_kernel"], dt, "bthk,hkd->btd") + p["out_bias"])
        h = layer_norm(x, p["ln_2_scale"], p["ln_2_bias"])
        # named so the dot policies keep it: recomputing it in the backward fuses the activation
        # into the transposed copy the weight gradient needs, a slow pass on CPU (see docs/performance.md)
        h = checkpoint_name(act(mm(h, p["fc_kernel"], dt, "btd,dm->btm") + p["fc_bias"]), MLP_ACTIVATION_NAME)
        return constrain_activation(x + mm(h, p["proj_kernel"], dt, "btm,md->btd") + p["proj_bias"])

    def __call__(self, x: Array) -> Array:
        stacked = {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}
        block = self._block
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            block = jax.checkpoint(block, policy=policy)
        if self.scan_layers:
            x, _ = jax.lax.scan(lambda carry, p: (block(carry, p), None), x, stacked)
            return x
        for i in range(self.layers):
            x = block(x, {name: a[i] for name, a in stacked.items()})
        return x
