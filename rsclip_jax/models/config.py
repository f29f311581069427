"""Model configurations and the registry of named presets.

Names follow OpenCLIP (`ViT-B-32`, `RN50`, `ViT-B-32-quickgelu`, ...), because model names and
state_dict names are the interchange format with PyTorch users. A `-quickgelu` suffix switches
the activation to QuickGELU, exactly as in OpenCLIP. The `RemoteCLIP-*` presets are the three
released RemoteCLIP architectures; they use QuickGELU because those weights were trained on from
OpenAI CLIP (the README demo of the official repo builds plain GELU, which is subtly wrong).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "VisionConfig",
    "TextConfig",
    "CLIPConfig",
    "get_model_config",
    "list_models",
    "UnknownModelError",
    "config_name",
    "with_sigmoid_head",
    "mlp_width",
]


def mlp_width(width: int, mlp_ratio: float) -> int:
    """The MLP's hidden width: OpenCLIP's `int(width * mlp_ratio)`, robust to a ratio that was
    computed as `hidden / width` (e.g. 488 / 112 * 112 is 487.99999999999994 in floating point)."""
    return int(width * mlp_ratio + 1e-6)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Image tower architecture.

    `layers` is an int for a ViT, or a 4-tuple of bottleneck counts for a ModifiedResNet.
    """

    image_size: int = 224
    layers: int | tuple[int, int, int, int] = 12
    width: int = 768
    patch_size: int | None = 32
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # OpenCLIP: ViT heads = width // head_width; ResNet attention pool heads = width * 32 // 64.
        return self.width * 32 // self.head_width if self.is_resnet else self.width // self.head_width

    def validate(self) -> None:
        if self.is_resnet:
            if len(self.layers) != 4 or any(n < 1 for n in self.layers):
                raise ValueError(f"vision.layers must be 4 positive ints for a ResNet, got {self.layers}")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
        else:
            if not self.patch_size or self.image_size % self.patch_size:
                raise ValueError(
                    f"vision.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
                )
            if self.width % self.head_width:
                raise ValueError(f"vision.width {self.width} must be a multiple of head_width {self.head_width}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Causal text transformer architecture (OpenAI CLIP style, pooled at the end-of-text token).

    `pool_type` says where the sequence is pooled, with OpenCLIP's names: `argmax` (at the largest
    token id, which is OpenAI's EOT; every OpenAI CLIP and RemoteCLIP model) or `eos` (at the first
    `eos_id`, for vocabularies whose end token is not their largest id, as transformers does).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    pool_type: str = "argmax"
    eos_id: int | None = None

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} must be a multiple of text.heads {self.heads}")
        if self.pool_type not in ("argmax", "eos"):
            raise ValueError(f"text.pool_type must be 'argmax' or 'eos', got {self.pool_type!r}")
        if self.pool_type == "eos" and not (isinstance(self.eos_id, int) and 0 <= self.eos_id < self.vocab_size):
            raise ValueError(f"text.pool_type 'eos' needs text.eos_id in [0, {self.vocab_size}), got {self.eos_id!r}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A full CLIP model: two towers projected into a shared `embed_dim` space."""

    embed_dim: int = 512
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    # A learnable logit bias, for the SigLIP loss (SigLIP inits: scale log 10, bias -10).
    init_logit_bias: float | None = None

    def validate(self) -> "CLIPConfig":
        self.vision.validate()
        self.text.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        vision = dict(d.get("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        top = {k: v for k, v in d.items() if k not in ("vision", "text")}
        return cls(vision=VisionConfig(**vision), text=TextConfig(**d.get("text", {})), **top).validate()


_TEXT_512 = TextConfig(width=512, heads=8, layers=12)
_TEXT_768 = TextConfig(width=768, heads=12, layers=12)

# Base architectures, as in OpenCLIP's model_configs/*.json.
_BASE: dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(1024, VisionConfig(layers=(3, 4, 6, 3), width=64, patch_size=None), _TEXT_512),
    "RN101": CLIPConfig(512, VisionConfig(layers=(3, 4, 23, 3), width=64, patch_size=None), _TEXT_512),
    "ViT-B-32": CLIPConfig(512, VisionConfig(layers=12, width=768, patch_size=32), _TEXT_512),
    "ViT-B-16": CLIPConfig(512, VisionConfig(layers=12, width=768, patch_size=16), _TEXT_512),
    "ViT-L-14": CLIPConfig(768, VisionConfig(layers=24, width=1024, patch_size=14), _TEXT_768),
    "ViT-L-14-336": CLIPConfig(
        768, VisionConfig(image_size=336, layers=24, width=1024, patch_size=14), _TEXT_768
    ),
    # Small architectures for tests, demos and smoke runs (not OpenCLIP names).
    "tiny-ViT": CLIPConfig(
        64,
        VisionConfig(image_size=64, layers=2, width=64, patch_size=16, head_width=32),
        TextConfig(width=64, heads=2, layers=2),
    ),
    "tiny-RN": CLIPConfig(
        64,
        VisionConfig(image_size=64, layers=(1, 1, 1, 1), width=16, patch_size=None, head_width=32),
        TextConfig(width=64, heads=2, layers=2),
    ),
}

_REMOTECLIP = {"RemoteCLIP-RN50": "RN50", "RemoteCLIP-ViT-B-32": "ViT-B-32", "RemoteCLIP-ViT-L-14": "ViT-L-14"}


def list_models() -> list[str]:
    """All known model names (base, `-quickgelu` variants and the RemoteCLIP presets)."""
    names = list(_BASE) + [f"{n}-quickgelu" for n in _BASE] + list(_REMOTECLIP)
    return sorted(names)


class UnknownModelError(ValueError):
    """Raised for a model name that is not in the registry."""


def get_model_config(name: str) -> CLIPConfig:
    """Returns the configuration of the named model.

    Raises:
        UnknownModelError: listing the known names.
    """
    if name in _REMOTECLIP:
        return dataclasses.replace(_BASE[_REMOTECLIP[name]], quick_gelu=True)
    base, quick = (name[: -len("-quickgelu")], True) if name.endswith("-quickgelu") else (name, False)
    if base not in _BASE:
        raise UnknownModelError(f"unknown model name {name!r}; known models: {', '.join(list_models())}")
    return dataclasses.replace(_BASE[base], quick_gelu=quick)


# SigLIP's initial temperature and bias (Zhai et al., 2023): scale log(10), bias -10.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def with_sigmoid_head(config: CLIPConfig) -> CLIPConfig:
    """`config` with SigLIP's learnable logit bias and initial values (for the sigmoid loss)."""
    return dataclasses.replace(config, init_logit_scale=SIGLIP_INIT_LOGIT_SCALE, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)


def config_name(config: CLIPConfig) -> str | None:
    """The registry name of `config`, if it matches one exactly (RemoteCLIP names preferred)."""
    for name in list(_REMOTECLIP) + list_models():
        if get_model_config(name) == config:
            return name
    return None
