"""The tokenizer of a transformers CLIP folder, read and written through transformers.

Reading: a folder's own tokenizer files (`tokenizer.json`, or `vocab.json` + `merges.txt`) are used
as transformers uses them (`CLIPTokenizer.from_pretrained(folder)`), so `rsclip embed` on the folder
gives the ids its transformers users get. That is not always `open_clip.tokenize`: transformers 5
neither runs ftfy nor unescapes HTML entities (`&amp;` stays four characters), and pads with the end
token instead of 0. A folder without tokenizer files gets OpenAI's BPE through `rsclip_jax.tokenizer`.

Writing: OpenAI's BPE as `vocab.json` + `merges.txt` (the files of `openai/clip-vit-*` on the hub,
built from the BPE table bundled with rsclip_jax), plus what `CLIPTokenizer.save_pretrained` writes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsclip_jax.checkpoint.transformers_dir import transformers_module
from rsclip_jax.tokenizer import bpe_merges, bpe_vocabulary

# The files a transformers tokenizer may be saved as; any of them makes the folder's tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
# transformers spells OpenAI's special tokens differently from open_clip (same ids, 49406 and 49407).
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def openai_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """OpenAI CLIP's vocabulary (transformers' spelling) and merges, from the bundled BPE table."""
    merges = bpe_merges()
    renamed = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}
    vocab = {renamed.get(t, t): i for i, t in enumerate(bpe_vocabulary(merges))}
    return vocab, tuple(" ".join(m) for m in merges)


def write_openai_bpe_files(folder: str | os.PathLike) -> list[Path]:
    """Writes OpenAI's BPE as `vocab.json` and `merges.txt` (plain writes: `folder` is a staging folder)."""
    vocab, merges = openai_bpe()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return [folder / "vocab.json", folder / "merges.txt"]


def openai_clip_tokenizer(context_length: int) -> Any:
    """A `transformers.CLIPTokenizer` of OpenAI's BPE that truncates and pads to `context_length`."""
    with tempfile.TemporaryDirectory() as tmp:
        write_openai_bpe_files(tmp)
        # from_pretrained on a folder: CLIPTokenizer(vocab_file=..., merges_file=...) builds a
        # two-token tokenizer in transformers 5 without an error.
        tok = transformers_module().CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    tok.model_max_length = context_length
    return tok


class FolderTokenizer:
    """A transformers folder's tokenizer, called like `rsclip_jax.tokenizer.Tokenizer`.

    Attributes:
        identity: a name and the sha256 of the tokenizer files (the embedding cache's key).
        is_openai_bpe: whether its vocabulary and merges are OpenAI CLIP's.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        files = [self.folder / f for f in TOKENIZER_FILES if (self.folder / f).is_file()]
        if not files:
            raise FileNotFoundError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        try:
            self._tok = transformers_module().AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{folder}: transformers cannot read its tokenizer files "
                             f"({', '.join(f.name for f in files)}): {e}") from None
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        self.identity = f"transformers:{type(self._tok).__name__}:{h.hexdigest()}"
        self.is_openai_bpe = self._vocab_and_merges() == openai_bpe()

    def _vocab_and_merges(self) -> tuple[dict[str, int], tuple[str, ...]] | None:
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return None
        model = json.loads(backend.to_str()).get("model", {})
        merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges", ()))
        return dict(model.get("vocab", {})), merges

    def describe(self) -> str:
        kind = "OpenAI CLIP's BPE" if self.is_openai_bpe else "its own vocabulary"
        return f"the folder's tokenizer ({type(self._tok).__name__}, {kind}, cleaned as transformers does)"

    def __call__(self, texts: str | Sequence[str], context_length: int) -> np.ndarray:
        """(N, context_length) int32 ids: truncated to `context_length` (end token kept) and padded."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self._tok(texts, padding="max_length", max_length=context_length, truncation=True,
                        return_tensors="np")["input_ids"]
        return np.asarray(ids, dtype=np.int32)


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds any transformers tokenizer file."""
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)
