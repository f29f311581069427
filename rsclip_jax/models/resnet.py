"""ModifiedResNet image tower (CLIP RN50/RN101), NHWC.

Three-conv stem with average pooling, bottleneck blocks that anti-alias strided convolutions with
an average pool, and a multi-head attention-pooling head. BatchNorm always runs in inference mode
from its running statistics: RemoteCLIP continues training from pretrained weights, where frozen
BatchNorm statistics are the usual practice, and it keeps the train step a pure function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rsclip_jax.models.config import VisionConfig
from rsclip_jax.models.layers import mm, normal, ones, param, zeros

BN_EPS = 1e-5


class Conv(nnx.Module):
    """Bias-free convolution with an HWIO kernel."""

    def __init__(self, cin: int, cout: int, size: int, *, stride: int = 1, dtype: Any, rngs: nnx.Rngs):
        std = (cin * size * size) ** -0.5
        self.kernel = param(rngs, normal(std), (size, size, cin, cout), (None, None, "conv_in", "conv_out"))
        self.stride, self.pad, self.dtype = stride, size // 2, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=[(self.pad, self.pad)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )


class BatchNorm(nnx.Module):
    """Inference-mode BatchNorm: parameters `scale`, `bias`; running `mean`, `var` as BatchStat."""

    def __init__(self, dim: int, *, zero_init: bool = False):
        self.scale = param(None, zeros if zero_init else ones, (dim,), ("conv_out",))
        self.bias = param(None, zeros, (dim,), ("conv_out",))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), logical_axes=("conv_out",))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), logical_axes=("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...]
        return (x - self.mean[...]) * inv + self.bias[...]


def avg_pool(x: jax.Array, k: int) -> jax.Array:
    """torch.nn.AvgPool2d(k): window k, stride k, no padding (floors odd sizes)."""
    if k == 1:
        return x
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, k, k, 1), (1, k, k, 1), "VALID")
    return s / (k * k)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, dtype: Any, rngs: nnx.Rngs):
        cout = planes * self.expansion
        self.stride = stride
        self.conv1, self.bn1 = Conv(cin, planes, 1, dtype=dtype, rngs=rngs), BatchNorm(planes)
        self.conv2, self.bn2 = Conv(planes, planes, 3, dtype=dtype, rngs=rngs), BatchNorm(planes)
        # bn3 starts at zero so each block starts as identity (OpenCLIP init).
        self.conv3, self.bn3 = Conv(planes, cout, 1, dtype=dtype, rngs=rngs), BatchNorm(cout, zero_init=True)
        if stride > 1 or cin != cout:
            self.downsample_conv = Conv(cin, cout, 1, dtype=dtype, rngs=rngs)
            self.downsample_bn = BatchNorm(cout)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(avg_pool(out, self.stride)))
        identity = x
        if self.downsample_conv is not None:
            identity = self.downsample_bn(self.downsample_conv(avg_pool(x, self.stride)))
        return jax.nn.relu(out + identity)


class AttentionPool(nnx.Module):
    """Multi-head attention pooling: the mean token attends to all spatial tokens."""

    def __init__(self, spatial: int, dim: int, heads: int, output_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        std = dim**-0.5
        self.heads, self.dtype = heads, dtype
        self.positional_embedding = param(rngs, normal(std), (spatial**2 + 1, dim), (None, "embed"))
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_kernel", param(rngs, normal(std), (dim, dim), ("embed", "heads_merged")))
            setattr(self, f"{name}_bias", param(rngs, zeros, (dim,), ("heads_merged",)))
        self.c_kernel = param(rngs, normal(std), (dim, output_dim), ("heads_merged", "proj"))
        self.c_bias = param(rngs, zeros, (output_dim,), ("proj",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + self.positional_embedding[...]
        dt, nh = self.dtype, self.heads
        q = mm(x[:, :1], self.q_kernel[...], dt, "btc,cd->btd") + self.q_bias[...]
        k = mm(x, self.k_kernel[...], dt, "btc,cd->btd") + self.k_bias[...]
        v = mm(x, self.v_kernel[...], dt, "btc,cd->btd") + self.v_bias[...]
        split = lambda t: t.reshape(b, t.shape[1], nh, c // nh).astype(dt)  # noqa: E731
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="xla")
        out = out.reshape(b, c)
        return mm(out, self.c_kernel[...], dt, "bc,co->bo") + self.c_bias[...]


class ModifiedResNet(nnx.Module):
    """CLIP's ModifiedResNet producing `output_dim` features (not normalised)."""

    def __init__(
        self,
        cfg: VisionConfig,
        output_dim: int,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        **_unused: Any,  # scan/remat options apply to transformer towers only
    ):
        w = cfg.width
        self.image_size = cfg.image_size
        self.conv1, self.bn1 = Conv(3, w // 2, 3, stride=2, dtype=dtype, rngs=rngs), BatchNorm(w // 2)
        self.conv2, self.bn2 = Conv(w // 2, w // 2, 3, dtype=dtype, rngs=rngs), BatchNorm(w // 2)
        self.conv3, self.bn3 = Conv(w // 2, w, 3, dtype=dtype, rngs=rngs), BatchNorm(w)
        cin = w
        for i, (blocks, mult) in enumerate(zip(cfg.layers, (1, 2, 4, 8)), start=1):
            planes, stage = w * mult, []
            for j in range(blocks):
                stage.append(Bottleneck(cin, planes, 2 if (j == 0 and i > 1) else 1, dtype=dtype, rngs=rngs))
                cin = planes * Bottleneck.expansion
            setattr(self, f"layer{i}", nnx.List(stage))
        self.attnpool = AttentionPool(cfg.image_size // 32, w * 32, cfg.heads, output_dim, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images of shape (B, {self.image_size}, {self.image_size}, 3), got {images.shape}")
        x = jax.nn.relu(self.bn1(self.conv1(images)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        x = jax.nn.relu(self.bn3(self.conv3(x)))
        x = avg_pool(x, 2)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return self.attnpool(x)
