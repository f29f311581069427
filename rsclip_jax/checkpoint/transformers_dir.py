"""Hugging Face `transformers` CLIP folders (`CLIPModel.save_pretrained` layout), in and out.

A folder is `config.json` (`model_type: "clip"`) plus `model.safetensors` or `pytorch_model.bin`
(or their sharded `*.index.json` forms), and usually tokenizer and preprocessor files. Its weights
are renamed to OpenCLIP's state_dict names here (one table, `_key_table`, used both ways), so
loading and export reuse `openclip.py`'s mapping onto the towers:

* `q_proj`/`k_proj`/`v_proj` are concatenated into OpenCLIP's `in_proj` (and split on export);
* `visual_projection`/`text_projection` are torch Linear weights (out, in), OpenCLIP's are (in, out);
* the `position_ids` buffers older transformers saved carry no weights and are skipped.

The config fixes what the weights cannot show: the activation (`hidden_act`), and where the text is
pooled. transformers pools at the first `eos_token_id`, or at the largest id when
`eos_token_id == 2` (configs written before transformers PR #24773). When the eos token is the
vocabulary's largest id both rules pick the same position in every row that holds the token, which
every tokenizer output does; such models load as OpenAI's `argmax` pooling, so their registry name
is found. Any other eos id pools at that token (`TextConfig.pool_type="eos"`).

`transformers` is used for what it owns: parsing and writing `config.json` (its defaults fill
missing keys as `from_pretrained` does) and the tokenizer and processor files. It is imported only
here, on use, and needs no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rsclip_jax.checkpoint.architecture import ArchitectureRecordError
from rsclip_jax.checkpoint.openclip import CheckpointMismatchError
from rsclip_jax.checkpoint.torch_format import load_state_dict
from rsclip_jax.models import CLIPConfig, TextConfig, VisionConfig
from rsclip_jax.models.config import mlp_width
from rsclip_jax.models.layers import LN_EPS
from rsclip_jax.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, VOCAB_SIZE

CONFIG_FILE = "config.json"
# transformers' weight files, in its order of preference, and their sharded index files.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SUPPORTED_MODEL_TYPES = ("clip",)
ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> CLIPConfig.quick_gelu
# Buffers older transformers versions saved; they hold no weights.
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
LEGACY_EOS_TOKEN_ID = 2  # transformers then pools at the largest id (argmax), as OpenAI does


class TransformersFormatError(ArchitectureRecordError):
    """A transformers folder this project cannot load or write (names the file and the key)."""


def transformers_module() -> Any:
    """`transformers`, imported quietly (it warns at import when torch is absent, which is fine here)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers  # optional at import time: only transformers folders need it
    except ImportError:
        raise ImportError("reading or writing a Hugging Face transformers folder needs the `transformers` package: "
                          "pip install transformers (see requirements.txt)") from None
    return transformers


def is_transformers_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with a transformers `config.json`."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_config(folder: str | os.PathLike) -> CLIPConfig:
    """Our CLIPConfig of a transformers CLIP folder's `config.json`.

    Raises:
        TransformersFormatError: naming the file and the key, for another `model_type` (naming the
            supported ones), an activation, layer-norm epsilon or channel count we do not build,
            or towers whose activations differ.
    """
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TransformersFormatError(f"{path}: not valid JSON ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TransformersFormatError(
            f"{path}: model_type {model_type!r} is not supported; rsclip_jax loads transformers folders of model_type "
            f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES))} (CLIPModel). SigLIP, BERT and other models have other "
            "towers")
    hf = transformers_module().CLIPConfig.from_dict(raw)
    return config_from_transformers(hf, str(path))


def config_from_transformers(hf: Any, where: str) -> CLIPConfig:
    """Our CLIPConfig of a `transformers.CLIPConfig`; `where` names the file in errors."""
    t, v = hf.text_config, hf.vision_config
    acts = {"text_config.hidden_act": t.hidden_act, "vision_config.hidden_act": v.hidden_act}
    for key, act in acts.items():
        if act not in ACTIVATIONS:
            raise TransformersFormatError(f"{where}: {key} {act!r} is not supported; rsclip_jax builds "
                                          f"{' and '.join(ACTIVATIONS)}")
    if len(set(acts.values())) > 1:
        raise TransformersFormatError(f"{where}: the towers use different activations ({acts}); rsclip_jax uses "
                                      "one activation for both towers")
    for key, eps in (("text_config.layer_norm_eps", t.layer_norm_eps), ("vision_config.layer_norm_eps",
                                                                          v.layer_norm_eps)):
        if eps is not None and abs(eps - LN_EPS) > 1e-12:
            raise TransformersFormatError(f"{where}: {key} {eps} is not supported; rsclip_jax's LayerNorm uses "
                                          f"{LN_EPS}, as CLIP does")
    if getattr(v, "num_channels", 3) != 3:
        raise TransformersFormatError(f"{where}: vision_config.num_channels {v.num_channels}; only RGB (3) converts")
    eos = t.eos_token_id
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise TransformersFormatError(f"{where}: text_config.eos_token_id {eos}: pooling needs one end token")
        eos = eos[0]
    if eos == LEGACY_EOS_TOKEN_ID or eos == t.vocab_size - 1:
        pool: dict[str, Any] = {"pool_type": "argmax", "eos_id": None}
    else:
        pool = {"pool_type": "eos", "eos_id": int(eos)}
    try:
        vision = VisionConfig(image_size=v.image_size, layers=v.num_hidden_layers, width=v.hidden_size,
                              patch_size=v.patch_size, head_width=v.hidden_size // v.num_attention_heads,
                              mlp_ratio=v.intermediate_size / v.hidden_size)
        text = TextConfig(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                          heads=t.num_attention_heads, layers=t.num_hidden_layers,
                          mlp_ratio=t.intermediate_size / t.hidden_size, **pool)
        config = CLIPConfig(embed_dim=hf.projection_dim, vision=vision, text=text,
                            quick_gelu=ACTIVATIONS[t.hidden_act],
                            init_logit_scale=float(hf.logit_scale_init_value)).validate()
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise TransformersFormatError(f"{where}: does not describe a CLIP rsclip_jax builds ({e})") from None
    for tower, width, ratio, inter in (("vision", vision.width, vision.mlp_ratio, v.intermediate_size),
                                       ("text", text.width, text.mlp_ratio, t.intermediate_size)):
        if mlp_width(width, ratio) != inter:
            raise TransformersFormatError(f"{where}: {tower}_config sizes (hidden {width}, intermediate {inter}) do not "
                                          "map onto rsclip_jax's transformer")
    return config


def transformers_config(config: CLIPConfig) -> Any:
    """The `transformers.CLIPConfig` of an architecture; refuses what CLIPModel cannot express."""
    if config.vision.is_resnet:
        raise TransformersFormatError("a ResNet image tower (RN50, RN101, ...) has no transformers equivalent: "
                                      "CLIPModel has only ViT image towers; convert to an OpenCLIP file "
                                      "(--to openclip) or hub folder (--to openclip-dir) instead")
    if config.init_logit_bias is not None:
        raise TransformersFormatError("a model with a SigLIP logit bias has no transformers CLIPModel equivalent "
                                      "(CLIPModel has no logit_bias); convert to --to openclip or openclip-dir")
    v, t = config.vision, config.text
    if t.pool_type == "eos":
        if t.eos_id == LEGACY_EOS_TOKEN_ID:
            raise TransformersFormatError("pooling at token id 2 cannot be written for transformers, which reads "
                                          "eos_token_id 2 as 'pool at the largest id'")
        eos = t.eos_id
    else:
        # The largest id is the end token of OpenAI's vocabulary; for another vocabulary the legacy
        # value 2 makes transformers pool at the largest id, which is exactly what argmax pooling does.
        eos = t.vocab_size - 1 if t.vocab_size == VOCAB_SIZE else LEGACY_EOS_TOKEN_ID
    act = "quick_gelu" if config.quick_gelu else "gelu"
    text_config = {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": mlp_width(t.width, t.mlp_ratio),
                   "projection_dim": config.embed_dim, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                   "max_position_embeddings": t.context_length, "hidden_act": act, "layer_norm_eps": LN_EPS,
                   "bos_token_id": SOT_TOKEN_ID, "eos_token_id": eos, "pad_token_id": EOT_TOKEN_ID}
    vision_config = {"hidden_size": v.width, "intermediate_size": mlp_width(v.width, v.mlp_ratio),
                     "projection_dim": config.embed_dim, "num_hidden_layers": v.layers,
                     "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
                     "patch_size": v.patch_size, "hidden_act": act, "layer_norm_eps": LN_EPS}
    hf = transformers_module().CLIPConfig(text_config=text_config, vision_config=vision_config,
                                          projection_dim=config.embed_dim,
                                          logit_scale_init_value=config.init_logit_scale)
    hf.architectures = ["CLIPModel"]
    return hf


def _key_table(vision_layers: int, text_layers: int) -> list[tuple[tuple[str, ...], str, str]]:
    """(transformers keys, OpenCLIP key, kind): kind `same`, `linear` (transposed) or `qkv` (three
    transformers keys concatenated along the first axis into one OpenCLIP key)."""
    table: list[tuple[tuple[str, ...], str, str]] = [
        (("logit_scale",), "logit_scale", "same"),
        (("text_model.embeddings.token_embedding.weight",), "token_embedding.weight", "same"),
        (("text_model.embeddings.position_embedding.weight",), "positional_embedding", "same"),
        (("text_model.final_layer_norm.weight",), "ln_final.weight", "same"),
        (("text_model.final_layer_norm.bias",), "ln_final.bias", "same"),
        (("text_projection.weight",), "text_projection", "linear"),
        (("vision_model.embeddings.class_embedding",), "visual.class_embedding", "same"),
        (("vision_model.embeddings.patch_embedding.weight",), "visual.conv1.weight", "same"),
        (("vision_model.embeddings.position_embedding.weight",), "visual.positional_embedding", "same"),
        (("vision_model.pre_layrnorm.weight",), "visual.ln_pre.weight", "same"),  # sic: transformers' name
        (("vision_model.pre_layrnorm.bias",), "visual.ln_pre.bias", "same"),
        (("vision_model.post_layernorm.weight",), "visual.ln_post.weight", "same"),
        (("vision_model.post_layernorm.bias",), "visual.ln_post.bias", "same"),
        (("visual_projection.weight",), "visual.proj", "linear"),
    ]
    for hf_tower, oc_tower, layers in (("text_model", "", text_layers), ("vision_model", "visual.", vision_layers)):
        for i in range(layers):
            hf, oc = f"{hf_tower}.encoder.layers.{i}.", f"{oc_tower}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                table += [
                    (tuple(f"{hf}self_attn.{n}_proj.{p}" for n in "qkv"), f"{oc}attn.in_proj_{p}", "qkv"),
                    ((f"{hf}self_attn.out_proj.{p}",), f"{oc}attn.out_proj.{p}", "same"),
                    ((f"{hf}layer_norm1.{p}",), f"{oc}ln_1.{p}", "same"),
                    ((f"{hf}layer_norm2.{p}",), f"{oc}ln_2.{p}", "same"),
                    ((f"{hf}mlp.fc1.{p}",), f"{oc}mlp.c_fc.{p}", "same"),
                    ((f"{hf}mlp.fc2.{p}",), f"{oc}mlp.c_proj.{p}", "same"),
                ]
    return table


def to_openclip_state_dict(state_dict: Mapping[str, np.ndarray], config: CLIPConfig,
                           where: str) -> dict[str, np.ndarray]:
    """A transformers CLIPModel state_dict under OpenCLIP's names.

    Raises:
        CheckpointMismatchError: naming `where` and every missing or unexpected transformers key.
    """
    table = _key_table(config.vision.layers, config.text.layers)
    expected = {k for keys, _, _ in table for k in keys}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - set(_BUFFERS))
    if missing or unexpected:
        lines = [f"{where}: the weights do not fit the CLIPModel its config.json describes:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) +
                             (f" ... and {len(items) - 20} more" if len(items) > 20 else ""))
        raise CheckpointMismatchError("\n".join(lines))
    out = {}
    for keys, oc, kind in table:
        arrays = [np.asarray(state_dict[k]) for k in keys]
        out[oc] = np.concatenate(arrays) if kind == "qkv" else arrays[0].T if kind == "linear" else arrays[0]
    return out


def from_openclip_state_dict(state_dict: Mapping[str, np.ndarray], config: CLIPConfig) -> dict[str, np.ndarray]:
    """An OpenCLIP state_dict (of a ViT CLIP) under transformers CLIPModel's names."""
    out = {}
    for keys, oc, kind in _key_table(config.vision.layers, config.text.layers):
        a = np.asarray(state_dict[oc])
        parts = np.split(a, 3) if kind == "qkv" else [a.T if kind == "linear" else a]
        out.update({k: np.array(p, order="C") for k, p in zip(keys, parts)})  # ascontiguousarray makes 0-d 1-d
    return out


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[Path]]:
    """The folder's state_dict (sharded weights merged) and the files it came from.

    Raises:
        FileNotFoundError: naming the folder and the file names looked for.
        CheckpointMismatchError: for an index naming a missing shard, or a key in two shards.
    """
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return load_state_dict(folder / name), [folder / name]
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointMismatchError(f"{index}: not a transformers shard index ({type(e).__name__}: {e})") \
                    from None
            shards = sorted(set(weight_map.values()))
            merged: dict[str, np.ndarray] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointMismatchError(f"{index}: names the shard {shard}, which is missing from {folder}")
                part = load_state_dict(folder / shard)
                twice = sorted(set(part) & set(merged))
                if twice:
                    raise CheckpointMismatchError(f"{folder / shard}: keys also in another shard: {', '.join(twice[:5])}")
                merged.update(part)
            return merged, [index] + [folder / s for s in shards]
    raise FileNotFoundError(f"{folder}: a transformers folder ({CONFIG_FILE}) without weights; expected one of "
                            f"{', '.join(WEIGHT_FILES + INDEX_FILES)}")


def openclip_state_dict_of(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], CLIPConfig, list[Path]]:
    """A transformers CLIP folder's weights (under OpenCLIP's names), its architecture and its files."""
    config = read_config(folder)
    state_dict, files = read_weights(folder)
    return to_openclip_state_dict(state_dict, config, str(folder)), config, files
