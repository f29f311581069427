"""Model FLOPs of CLIP, counted per tower from the architecture (for MFU).

Counted: every matrix multiply and convolution, 2 FLOPs per multiply-add, the way MFU is usually
defined (PaLM, appendix B). Attention scores and the weighted sum count the full T x T product,
causal or not, because that is what the XLA path computes. Elementwise work (LayerNorm, softmax,
activations, the optimizer) is left out: it is a few percent of a ViT-B step, and MFU by
convention measures the model's matmul work against the hardware's matmul peak.

A training step is 3x the forward (the backward costs twice the forward); rematerialisation
recomputes some of the forward, which is hardware work, not model work, so MFU does not count it.

`tests/test_flops.py` checks these counts against XLA's own `cost_analysis()` of an unrolled
forward (XLA counts a `lax.scan` body once, whatever its trip count, so a scanned model would hide
an error in the count).
"""

from __future__ import annotations

from dataclasses import dataclass

from rsclip_jax.models.config import CLIPConfig, TextConfig, VisionConfig, mlp_width

# forward + backward (gradient w.r.t. activations and w.r.t. weights, each the forward's cost)
TRAIN_FLOPS_FACTOR = 3


def _transformer_layer(tokens: int, width: int, mlp: int) -> int:
    """One pre-LN attention block over `tokens` tokens: qkv, scores, weighted sum, out, MLP."""
    t, d = tokens, width
    return 2 * t * d * 3 * d + 2 * t * t * d * 2 + 2 * t * d * d + 2 * t * d * mlp * 2


def vit_forward_flops(v: VisionConfig, embed_dim: int) -> int:
    """Forward FLOPs of one image through a ViT tower (patch embedding to projection)."""
    patches = (v.image_size // v.patch_size) ** 2
    mlp = mlp_width(v.width, v.mlp_ratio)
    patch_embed = 2 * patches * v.patch_size**2 * 3 * v.width
    return patch_embed + v.layers * _transformer_layer(patches + 1, v.width, mlp) + 2 * v.width * embed_dim


def _conv(spatial: int, k: int, cin: int, cout: int) -> int:
    """A k x k convolution producing a spatial x spatial output."""
    return 2 * spatial * spatial * k * k * cin * cout


def resnet_forward_flops(v: VisionConfig, embed_dim: int) -> int:
    """Forward FLOPs of one image through CLIP's ModifiedResNet (stem, bottlenecks, attention pool)."""
    w, s = v.width, v.image_size // 2
    flops = _conv(s, 3, 3, w // 2) + _conv(s, 3, w // 2, w // 2) + _conv(s, 3, w // 2, w)
    s //= 2  # the stem's average pool
    cin = w
    assert isinstance(v.layers, tuple)
    for stage, (blocks, mult) in enumerate(zip(v.layers, (1, 2, 4, 8))):
        planes = w * mult
        for j in range(blocks):
            stride = 2 if (j == 0 and stage > 0) else 1
            out = s // stride
            flops += _conv(s, 1, cin, planes) + _conv(s, 3, planes, planes) + _conv(out, 1, planes, planes * 4)
            if stride > 1 or cin != planes * 4:
                flops += _conv(out, 1, cin, planes * 4)
            cin, s = planes * 4, out
    c, tokens = w * 32, s * s + 1
    # attention pool: the mean token queries every token
    flops += 2 * c * c + 2 * 2 * tokens * c * c + 2 * 2 * tokens * c + 2 * c * embed_dim
    return flops


def text_forward_flops(t: TextConfig, embed_dim: int, tokens: int | None = None) -> int:
    """Forward FLOPs of one caption through the text transformer (embedding lookups are free).

    ``tokens``: the width the tower runs at, when trailing padding was trimmed (default: the
    context length).
    """
    width = t.context_length if tokens is None else tokens
    return t.layers * _transformer_layer(width, t.width, mlp_width(t.width, t.mlp_ratio)) + 2 * t.width * embed_dim


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step at a global batch size."""

    image_tower: int  # forward + backward, all images of the batch
    text_tower: int
    loss: int  # the (B, B) similarity logits, forward + backward

    @property
    def total(self) -> int:
        return self.image_tower + self.text_tower + self.loss


def forward_flops_per_pair(config: CLIPConfig, text_tokens: int | None = None) -> tuple[int, int]:
    """(image tower, text tower) forward FLOPs for one image and one caption of `text_tokens` tokens."""
    v = config.vision
    image = resnet_forward_flops(v, config.embed_dim) if v.is_resnet else vit_forward_flops(v, config.embed_dim)
    return image, text_forward_flops(config.text, config.embed_dim, text_tokens)


def train_step_flops(config: CLIPConfig, global_batch: int, text_tokens: int | None = None) -> StepFlops:
    """Model FLOPs of a contrastive train step (forward + backward) over `global_batch` pairs.

    ``text_tokens``: the width the text tower runs at when the step's captions were trimmed
    (`rsclip_jax.tokenizer.trimmed_length`); the default is the full context length.
    """
    image, text = forward_flops_per_pair(config, text_tokens)
    loss = 2 * global_batch * global_batch * config.embed_dim
    k = TRAIN_FLOPS_FACTOR
    return StepFlops(k * global_batch * image, k * global_batch * text, k * loss)
