"""Vision Transformer image tower (OpenAI CLIP / OpenCLIP layout).

patchify -> [CLS] + patches + positional embedding -> ln_pre -> transformer -> ln_post on every
token -> take [CLS] -> project. Images are NHWC, already normalised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rsclip_jax.models.config import VisionConfig
from rsclip_jax.models.layers import LayerNorm, Transformer, mm, normal, param


class VisionTransformer(nnx.Module):
    """CLIP ViT image tower producing `output_dim` features (not normalised)."""

    def __init__(
        self,
        cfg: VisionConfig,
        output_dim: int,
        *,
        quick_gelu: bool,
        dtype: Any = jnp.float32,
        scan_layers: bool = True,
        remat_policy: str = "none",
        attention: str = "xla",
        rngs: nnx.Rngs,
    ):
        p, w = cfg.patch_size, cfg.width
        self.patch_size, self.dtype = p, dtype
        self.grid = cfg.image_size // p
        scale = w**-0.5
        # Stored as a conv kernel (HWIO); applied as a matmul over flattened patches.
        self.conv1 = param(rngs, normal(0.02), (p, p, 3, w), (None, None, None, "embed"))
        self.class_embedding = param(rngs, normal(scale), (w,), ("embed",))
        self.positional_embedding = param(rngs, normal(scale), (self.grid**2 + 1, w), (None, "embed"))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(
            w,
            cfg.layers,
            cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            quick_gelu=quick_gelu,
            causal=False,
            dtype=dtype,
            scan_layers=scan_layers,
            remat_policy=remat_policy,
            attention=attention,
            rngs=rngs,
        )
        self.ln_post = LayerNorm(w)
        self.proj = param(rngs, normal(scale), (w, output_dim), ("embed", "proj"))

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p, g = self.patch_size, self.grid
        if h != g * p or w != g * p or c != 3:
            raise ValueError(f"expected images of shape (B, {g * p}, {g * p}, 3), got {images.shape}")
        patches = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
        kernel = self.conv1[...].reshape(p * p * c, -1)
        x = mm(patches, kernel, self.dtype, "bnk,kd->bnd")
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...]
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(x)[:, 0]
        return mm(pooled, self.proj[...], self.dtype, "bd,de->be")
