"""CLIP towers in Flax NNX: ViT and ModifiedResNet image towers, a causal text transformer."""

from rsclip_jax.models.clip import CLIP, create_model, l2_normalize
from rsclip_jax.models.config import (
    CLIPConfig,
    TextConfig,
    UnknownModelError,
    VisionConfig,
    get_model_config,
    list_models,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "UnknownModelError",
    "VisionConfig",
    "create_model",
    "get_model_config",
    "l2_normalize",
    "list_models",
]
