"""The CLIP model: an image tower, a causal text tower, projections and a learnable temperature.

Attribute names follow OpenCLIP's `CLIP` module (`visual`, `transformer`, `token_embedding`,
`positional_embedding`, `ln_final`, `text_projection`, `logit_scale`) so the state_dict mapping in
`rsclip_jax.checkpoint.openclip` stays a short, readable table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rsclip_jax.models.config import CLIPConfig, get_model_config
from rsclip_jax.models.layers import LayerNorm, Transformer, mm, normal, param
from rsclip_jax.models.resnet import ModifiedResNet
from rsclip_jax.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# CLIP clamps the temperature exp(logit_scale) at 100, in training and in scoring.
MAX_LOGIT_SCALE = 100.0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis, like torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class CLIP(nnx.Module):
    """A CLIP model built from a `CLIPConfig`.

    Args:
        config: the architecture.
        dtype: compute dtype of the matmuls (`float32` or `bfloat16`); parameters stay float32.
        scan_layers: `lax.scan` over transformer layers (faster compiles and steps on XLA);
            one bool for both towers or a (visual, text) pair.
        remat_policy: rematerialisation of transformer blocks: none, full, dots_saveable, ...;
            one policy for both towers or a (visual, text) pair.
        attention: `xla`, `cudnn` (fused flash attention, bfloat16 on NVIDIA GPUs) or `auto` (cuDNN
            where it runs, else XLA); see `layers.resolve_attention`.
        rngs: parameter initialisation keys.
    """

    def __init__(
        self,
        config: CLIPConfig,
        *,
        dtype: str = "float32",
        scan_layers: bool | tuple[bool, bool] = True,
        remat_policy: str | tuple[str, str] = "none",
        attention: str = "xla",
        rngs: nnx.Rngs,
    ):
        visual_scan, text_scan = scan_layers if isinstance(scan_layers, tuple) else (scan_layers,) * 2
        visual_remat, text_remat = remat_policy if isinstance(remat_policy, tuple) else (remat_policy,) * 2
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
        config.validate()
        self.config = config
        cdt = DTYPES[dtype]
        self.dtype = cdt
        tower = ModifiedResNet if config.vision.is_resnet else VisionTransformer
        self.visual = tower(
            config.vision,
            config.embed_dim,
            quick_gelu=config.quick_gelu,
            dtype=cdt,
            scan_layers=visual_scan,
            remat_policy=visual_remat,
            attention=attention,
            rngs=rngs,
        )
        t = config.text
        self.token_embedding = param(rngs, normal(0.02), (t.vocab_size, t.width), ("vocab", "embed"))
        self.positional_embedding = param(rngs, normal(0.01), (t.context_length, t.width), (None, "embed"))
        self.transformer = Transformer(
            t.width,
            t.layers,
            t.heads,
            mlp_ratio=t.mlp_ratio,
            quick_gelu=config.quick_gelu,
            causal=True,
            dtype=cdt,
            scan_layers=text_scan,
            remat_policy=text_remat,
            attention=attention,
            rngs=rngs,
        )
        self.ln_final = LayerNorm(t.width)
        self.text_projection = param(rngs, normal(t.width**-0.5), (t.width, config.embed_dim), ("embed", "proj"))
        self.logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32), logical_axes=())
        if config.init_logit_bias is not None:
            self.logit_bias = nnx.Param(jnp.asarray(config.init_logit_bias, jnp.float32), logical_axes=())

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, images: jax.Array, normalize: bool = False) -> jax.Array:
        """Image features from normalised NHWC float images, float32 (B, embed_dim)."""
        x = self.visual(images).astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        """Text features from token ids (B, T), pooled at the end-of-text token.

        T is the context length, or fewer when trailing all-padding columns have been trimmed
        (`rsclip_jax.tokenizer.trimmed_length`): the causal mask makes every position up to the
        pooled one independent of what comes after it, so the features are the same.
        """
        ctx = self.config.text.context_length
        if tokens.ndim != 2 or not 0 < tokens.shape[1] <= ctx:
            raise ValueError(f"expected tokens of shape (B, T) with 0 < T <= {ctx} (the context length), "
                             f"got {tokens.shape}")
        positions = self.positional_embedding[...][: tokens.shape[1]]
        x = jnp.take(self.token_embedding[...], tokens, axis=0) + positions
        x = self.ln_final(self.transformer(x))
        pooled = jnp.take_along_axis(x, self._pool_index(tokens)[:, None, None], axis=1)[:, 0]
        x = mm(pooled, self.text_projection[...], self.dtype, "bd,de->be").astype(jnp.float32)
        return l2_normalize(x) if normalize else x

    def _pool_index(self, tokens: jax.Array) -> jax.Array:
        """The position each row is pooled at (see `TextConfig.pool_type`)."""
        t = self.config.text
        if t.pool_type == "eos":
            # The first eos_id (position 0 when a row has none), as transformers and OpenCLIP do.
            return jnp.argmax(tokens == t.eos_id, axis=-1)
        # OpenAI's EOT is the largest id in its vocabulary, so argmax finds it (the first, if repeated).
        return jnp.argmax(tokens, axis=-1)

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """L2-normalised image and text features, and the temperature exp(logit_scale)."""
        return (
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            jnp.exp(self.logit_scale[...]),
        )


def create_model(
    model: str | CLIPConfig,
    *,
    seed: int = 0,
    dtype: str = "float32",
    scan_layers: bool | tuple[bool, bool] = True,
    remat_policy: str | tuple[str, str] = "none",
    attention: str = "xla",
    abstract: bool = False,
    **overrides: Any,
) -> CLIP:
    """Builds a randomly initialised CLIP from a registry name or a config.

    With `abstract=True` no memory is allocated: parameters are `jax.ShapeDtypeStruct`s, ready to
    be filled from a checkpoint (see `rsclip_jax.checkpoint`).
    """
    config = get_model_config(model) if isinstance(model, str) else model
    if overrides:
        config = CLIPConfig.from_dict({**config.to_dict(), **overrides})

    def build() -> CLIP:
        return CLIP(config, dtype=dtype, scan_layers=scan_layers, remat_policy=remat_policy, attention=attention,
                    rngs=nnx.Rngs(seed))

    return nnx.eval_shape(build) if abstract else build()
