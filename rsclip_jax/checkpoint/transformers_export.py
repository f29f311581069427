"""`rsclip convert SRC DIR --to hf`: a folder that transformers' `CLIPModel`, `CLIPTokenizer` and
`CLIPProcessor.from_pretrained(DIR)` load offline.

The folder holds:
* `config.json` (written by `transformers.CLIPConfig`) and `model.safetensors`;
* OpenAI's BPE as `vocab.json` + `merges.txt`, and what `CLIPTokenizer.save_pretrained` writes;
* the eval transform (bicubic shortest side, centre crop, OpenAI mean/std) as `processor_config.json`
  (transformers 5) and `preprocessor_config.json` (transformers 4);
* `README.md`: a model card with the architecture and the source checkpoint's sha256.

Everything is written into a staging folder first and then published (`fileio.atomic_write_folder`),
so a failed conversion leaves no half folder. A ResNet image tower or a SigLIP logit bias has no
CLIPModel equivalent: those are refused before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from rsclip_jax.checkpoint.architecture import safetensors_metadata
from rsclip_jax.checkpoint.openclip import export_state_dict
from rsclip_jax.checkpoint.torch_format import save_state_dict
from rsclip_jax.checkpoint.transformers_dir import from_openclip_state_dict, transformers_config, transformers_module
from rsclip_jax.checkpoint.transformers_tokenizer import openai_clip_tokenizer, write_openai_bpe_files
from rsclip_jax.fileio import atomic_write_folder
from rsclip_jax.models import CLIP, CLIPConfig
from rsclip_jax.models.config import config_name
from rsclip_jax.preprocess import OPENAI_MEAN, OPENAI_STD
from rsclip_jax.tokenizer import VOCAB_SIZE

WEIGHTS_FILE = "model.safetensors"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as transformers' image processors store it


def save_transformers_dir(model: CLIP, folder: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Writes `model` as a transformers CLIP folder; returns the files written.

    Args:
        model: a ViT CLIP without a SigLIP bias.
        folder: the output folder (created; files of an existing folder are replaced one by one).
        sources: the files the model was read from, named with their sha256 in the model card.

    Raises:
        TransformersFormatError: for an architecture CLIPModel cannot express (nothing is written).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder; a transformers model is a directory")
    hf_config = transformers_config(model.config)  # refuses RN50 / SigLIP before any file is written
    state_dict = from_openclip_state_dict(export_state_dict(model), model.config)
    has_tokenizer = model.config.text.vocab_size == VOCAB_SIZE

    def write(staging: Path) -> None:
        hf_config.save_pretrained(str(staging))
        save_state_dict(state_dict, staging / WEIGHTS_FILE, safetensors_metadata(model.config))
        if has_tokenizer:
            _write_processor(staging, model.config)
        (staging / "README.md").write_text(model_card(model.config, sources, has_tokenizer), encoding="utf-8")

    return atomic_write_folder(folder, write)


def _write_processor(staging: Path, config: CLIPConfig) -> None:
    transformers = transformers_module()
    size = config.vision.image_size
    image_processor = transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=BICUBIC, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), do_convert_rgb=True)
    tokenizer = openai_clip_tokenizer(config.text.context_length)
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(staging))
    image_processor.to_json_file(str(staging / "preprocessor_config.json"))  # the file transformers 4 reads
    write_openai_bpe_files(staging)  # the slow tokenizer's files, read by every transformers version


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def model_card(config: CLIPConfig, sources: Sequence[str | os.PathLike], has_tokenizer: bool) -> str:
    """The folder's README.md: architecture, provenance and how to load it."""
    v, t = config.vision, config.text
    name = config_name(config) or "a custom architecture"
    act = "QuickGELU" if config.quick_gelu else "GELU"
    files = [Path(s) for s in sources if Path(s).is_file()]
    provenance = "\n".join(f"| `{p.name}` | `{_sha256(p)}` |" for p in files) or "| (no source file) | |"
    tokenizer = ("OpenAI CLIP's BPE (`vocab.json`, `merges.txt`, `tokenizer.json`)." if has_tokenizer else
                 f"none: the text tower's vocabulary ({t.vocab_size} tokens) is not OpenAI CLIP's BPE; "
                 "add the tokenizer the model was trained with.")
    return f"""---
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags: [clip, remote-sensing, rsclip_jax]
---

# CLIP model converted by rsclip_jax

Architecture: {name} — ViT image tower ({v.layers} layers, width {v.width}, patch {v.patch_size}, \
{v.image_size} px), text transformer ({t.layers} layers, width {t.width}, context {t.context_length}), \
embedding dimension {config.embed_dim}, {act} activation.

Tokenizer: {tokenizer}

Written by `rsclip convert ... --to hf` from:

| source file | sha256 |
|---|---|
{provenance}

The weights are those of the source checkpoint, renamed; the licence of the source weights applies.

```python
from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("path/to/this/folder")
processor = CLIPProcessor.from_pretrained("path/to/this/folder")
```
"""
