"""`rsclip convert --check`: how far a converted checkpoint's embeddings are from its source's.

The probe batch is four real remote-sensing tiles with one caption each, bundled with the package
(`rsclip_jax/resources/probe/`, attributed there), so the check needs no data of the user's.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsclip_jax.evaluate.embeddings import Extractor, TextTokenizer
from rsclip_jax.models import CLIP
from rsclip_jax.preprocess import is_image_name


def probe_batch() -> tuple[list[str], list[str]]:
    """(image paths, captions) of the bundled probe batch."""
    folder = Path(str(importlib.resources.files("rsclip_jax") / "resources" / "probe"))
    images = sorted(str(p) for p in folder.iterdir() if is_image_name(p.name))
    captions = [line.strip() for line in (folder / "captions.txt").read_text("utf-8").splitlines() if line.strip()]
    return images, captions


def embedding_difference(source: tuple[CLIP, TextTokenizer], target: tuple[CLIP, TextTokenizer],
                         images: Sequence[str] | None = None, texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Max |Δ| between two models' L2-normalised embeddings of the same images and texts.

    Each model tokenizes with its own tokenizer, as its users would. Default inputs: `probe_batch()`.
    """
    if images is None or texts is None:
        default_images, default_texts = probe_batch()
        images, texts = images or default_images, texts or default_texts
    out: dict[str, Any] = {"images": len(images), "texts": len(texts)}
    embeddings = []
    for model, tokenizer in (source, target):
        extractor = Extractor(model, batch_size=len(images), progress=False, tokenizer=tokenizer)
        embeddings.append((extractor.images(list(images)).embeddings, extractor.texts(list(texts))))
    out["image_max_abs_diff"] = float(np.max(np.abs(embeddings[0][0] - embeddings[1][0])))
    out["text_max_abs_diff"] = float(np.max(np.abs(embeddings[0][1] - embeddings[1][1])))
    return out
