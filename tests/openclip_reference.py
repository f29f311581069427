"""Helpers to build open_clip_torch reference models with fully random weights (test-only)."""

from __future__ import annotations

import numpy as np
import open_clip
import torch

from rsclip_jax.models import CLIPConfig


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Makes every parameter and BatchNorm statistic non-trivial, so parity tests can fail.

    open_clip's init leaves LayerNorm at (1, 0), biases at 0, BatchNorm stats at (0, 1) and the
    last BatchNorm of each ResNet block at 0; a mapping bug in any of those would go unseen.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.ndim == 1 and (name.endswith("weight") or "bn" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def build(name_or_config: str | CLIPConfig, seed: int = 0) -> torch.nn.Module:
    """An open_clip CLIP by registry name, or from one of our configs (for reduced-depth models)."""
    torch.manual_seed(seed)
    if isinstance(name_or_config, str):
        model = open_clip.create_model(name_or_config)
    else:
        c = name_or_config
        vision = dict(image_size=c.vision.image_size, layers=c.vision.layers, width=c.vision.width,
                      patch_size=c.vision.patch_size, head_width=c.vision.head_width)
        text = dict(context_length=c.text.context_length, vocab_size=c.text.vocab_size, width=c.text.width,
                    heads=c.text.heads, layers=c.text.layers)
        model = open_clip.model.CLIP(c.embed_dim, vision, text, quick_gelu=c.quick_gelu)
    return randomize_(model, seed)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
