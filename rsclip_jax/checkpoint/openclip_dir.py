"""OpenCLIP hub folders: `open_clip_config.json` + `open_clip_model.safetensors`.

This is the layout of OpenCLIP models on the Hugging Face hub, and what
`open_clip.create_model_from_pretrained("local-dir:DIR")` reads. Its `model_cfg` is OpenCLIP's own
architecture record (the same keys as `open_clip/model_configs/*.json`), so such a folder carries
its architecture, activation included, like every file this project writes.

Only the architectures of `rsclip_jax.models` map: a ViT or ModifiedResNet image tower and the
causal text transformer. Configs naming a timm or Hugging Face tower (`timm_model_name`,
`hf_model_name`) are refused with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from rsclip_jax.checkpoint.architecture import ArchitectureRecordError, safetensors_metadata
from rsclip_jax.checkpoint.openclip import export_state_dict
from rsclip_jax.checkpoint.torch_format import save_state_dict
from rsclip_jax.fileio import atomic_write_json
from rsclip_jax.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from rsclip_jax.preprocess import OPENAI_MEAN, OPENAI_STD

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# The weight files OpenCLIP looks for in such a folder, in its order of preference.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
_UNSUPPORTED = ("timm_model_name", "hf_model_name", "hf_tokenizer_name")


def is_openclip_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding an `open_clip_config.json`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def weights_file(folder: str | os.PathLike) -> Path:
    """The folder's weights, chosen as OpenCLIP chooses them.

    Raises:
        FileNotFoundError: naming the folder and the file names looked for.
    """
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: an OpenCLIP folder ({CONFIG_FILE}) without weights; expected one of "
                            f"{', '.join(WEIGHT_FILES)}")


def openclip_model_cfg(config: CLIPConfig) -> dict[str, Any]:
    """OpenCLIP's `model_cfg` for an architecture (what `open_clip.model.CLIP(**model_cfg)` takes)."""
    v, t = config.vision, config.text
    vision: dict[str, Any] = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
                              "width": v.width, "patch_size": v.patch_size, "head_width": v.head_width,
                              "mlp_ratio": v.mlp_ratio}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    if t.pool_type != "argmax":  # OpenCLIP's own keys for pooling at a tokenizer's end token
        text.update(pool_type=t.pool_type, eos_id=t.eos_id)
    cfg: dict[str, Any] = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision,
                           "text_cfg": text}
    if config.init_logit_bias is not None:  # a SigLIP head: OpenCLIP then builds the learnable bias too
        cfg["init_logit_bias"] = config.init_logit_bias
    return cfg


def config_from_model_cfg(model_cfg: dict[str, Any], where: str) -> CLIPConfig:
    """Our CLIPConfig of an OpenCLIP `model_cfg`; `where` names the file in errors."""
    vision_cfg, text_cfg = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    used = [k for k in _UNSUPPORTED if k in vision_cfg or k in text_cfg]
    if used:
        raise ArchitectureRecordError(f"{where}: a tower from another library ({', '.join(used)}) has no rsclip_jax "
                                      "equivalent; only ViT/ModifiedResNet image towers and the CLIP text "
                                      "transformer convert")
    try:
        layers = vision_cfg.get("layers", 12)
        vision = VisionConfig(
            image_size=vision_cfg.get("image_size", 224),
            layers=tuple(layers) if isinstance(layers, (list, tuple)) else layers,
            width=vision_cfg.get("width", 768),
            patch_size=vision_cfg.get("patch_size", 16),
            head_width=vision_cfg.get("head_width", 64),
            mlp_ratio=vision_cfg.get("mlp_ratio", 4.0),
        )
        text = TextConfig(**{k: text_cfg[k] for k in ("context_length", "vocab_size", "width", "heads", "layers",
                                                      "mlp_ratio", "pool_type") if k in text_cfg})
        if text.pool_type == "eos":
            text = dataclasses.replace(text, eos_id=text_cfg.get("eos_id", 2))  # OpenCLIP's default eos_id
        return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                          quick_gelu=bool(model_cfg.get("quick_gelu", False)),
                          init_logit_bias=model_cfg.get("init_logit_bias")).validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ArchitectureRecordError(f"{where}: model_cfg does not describe a supported CLIP ({type(e).__name__}: "
                                      f"{e}); pass --model NAME to choose the architecture") from None


def read_model_cfg(folder: str | os.PathLike) -> CLIPConfig:
    """The architecture recorded in a folder's `open_clip_config.json`."""
    path = Path(folder) / CONFIG_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArchitectureRecordError(f"{path}: not valid JSON ({e}); pass --model NAME") from None
    return config_from_model_cfg(record.get("model_cfg", record), str(path))


def save_openclip_dir(model: CLIP, folder: str | os.PathLike) -> list[Path]:
    """Writes `model` as an OpenCLIP hub folder; returns the files written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; an OpenCLIP hub folder is a directory")
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    save_state_dict(export_state_dict(model), weights, safetensors_metadata(model.config))
    size = model.config.vision.image_size
    atomic_write_json(config, {
        "model_cfg": openclip_model_cfg(model.config),
        # OpenAI CLIP's eval transform, which rsclip_jax.preprocess implements.
        "preprocess_cfg": {"size": size, "mode": "RGB", "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    })
    return [weights, config]
