"""CLIP BPE tokenizer giving the same ids as ``open_clip.tokenize`` (open_clip_torch 3.3.0).

Built directly on the Rust ``tokenizers`` library from OpenAI's merges file shipped in
``rsclip_jax/resources``. We do not use ``transformers.CLIPTokenizer.from_pretrained``:
it needs the network, and offline it can silently return a broken tokenizer that only
knows the two special tokens. No torch, no network.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import operator
import os
from typing import Iterable, Sequence

import ftfy
import numpy as np
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CONTEXT_LENGTH = 77
PAD_TOKEN_ID = 0  # what rows are filled with after EOT, as open_clip
VOCAB_SIZE = 49408
_SPECIALS = {"<start_of_text>": SOT_TOKEN_ID, "<end_of_text>": EOT_TOKEN_ID}
_NUM_MERGES = 49152 - 256 - 2  # open_clip keeps merges lines[1:49152-256-2+1]

# open_clip splits with the `regex` module (Unicode 17); tokenizers uses Oniguruma, whose
# Unicode tables are older. These code points (letters/digits new in Unicode 15.1-17) are
# \p{L} / \p{N} for `regex` 2026.9.29 but not for Oniguruma, so we add them explicitly.
# tests/test_tokenizer.py checks every code point, so a drift in either library shows up.
_EXTRA_L = (
    "558 58B-58C 88F C5C CDC 208F 209D-209F A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D "
    "107BB-107BF 10940-10959 10EC5-10EC7 10ED9-10EEE 11B0A 11DB0-11DDB 11DF1 16EA0-16EB8 "
    "16EBB-16ED3 16FF2-16FF3 187F8-187FF 18CD6-18CDA 18D09-18D20 18D80-18DF2 18E00-19191 "
    "191A0-191D2 1B123-1B128 1B168 1D6A6 1DF1F-1DF24 1DF2B-1DF81 1DF90-1DF96 1DFCD-1DFFF "
    "1E6C0-1E6DE 1E6E0-1E6E2 1E6E4-1E6E5 1E6E7-1E6ED 1E6F0-1E6F4 1E6FE-1E6FF 2B73A-2B73F "
    "2B81E 2CEA2-2CEAD 323B0-33479 3D000-3FC3F"
)
_EXTRA_N = "11DE0-11DE9 1246F 12475-1247F 12550-12686 16FF4-16FF6"


def _class_body(ranges: str) -> str:
    """Turn "41-5A 61" into the character-class body "A-Za"."""
    parts = (r.partition("-") for r in ranges.split())
    return "".join(chr(int(a, 16)) + ("-" + chr(int(b, 16)) if b else "") for a, _, b in parts)


_L, _N = r"\p{L}" + _class_body(_EXTRA_L), r"\p{N}" + _class_body(_EXTRA_N)
# open_clip's pattern, compiled there with IGNORECASE. Our input is already lower-cased, so the
# only remaining case-equivalent of a pattern letter is U+017F LONG S (folds to "s"). We spell
# that out instead of using (?i): Oniguruma's (?i) also makes U+0345 (which folds to iota) a
# letter and does multi-char folds. Under `regex`'s IGNORECASE, U+0345 matches no alternative
# at all, so open_clip drops it like whitespace: we exclude it from the punctuation class.
_SPLIT_PATTERN = (
    r"<[sſ]tart_of_text>|<end_of_text>|'[sſ]|'t|'re|'ve|'m|'ll|'d"
    rf"|[{_L}]+|[{_N}]|[^\s{_L}{_N}\u0345]+"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode char table, in open_clip's order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def clean_text(text: str) -> str:
    """open_clip's default ('lower') cleaning: ftfy, double html unescape, whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    # open_clip uses " ".join(text.split()); str.split() whitespace == re's \s for str patterns.
    return " ".join(text.split()).strip().lower()


def bpe_merges(bpe_path: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """The merges of OpenAI's BPE table (default: the copy bundled in `rsclip_jax/resources`)."""
    if bpe_path is None:
        raw = (importlib.resources.files("rsclip_jax") / "resources" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    else:
        with open(bpe_path, "rb") as f:
            raw = f.read()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # type: ignore[misc]


def bpe_vocabulary(merges: Sequence[tuple[str, str]]) -> list[str]:
    """The tokens of OpenAI's vocabulary in id order: bytes, bytes + `</w>`, merges, then the
    start and end tokens (open_clip's spelling, ids 49406 and 49407)."""
    byte_chars = list(_bytes_to_unicode().values())
    return byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(_SPECIALS)


class Tokenizer:
    """OpenAI CLIP BPE tokenizer; ``tokenizer(texts)`` equals ``open_clip.tokenize(texts)``."""

    # What the embedding cache keys texts by, besides the strings themselves.
    identity = "openai-bpe:open_clip-cleaning"

    def __init__(self, bpe_path: str | os.PathLike[str] | None = None) -> None:
        merges = bpe_merges(bpe_path)
        vocab = bpe_vocabulary(merges)
        assert len(vocab) == VOCAB_SIZE, len(vocab)
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        hf = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                     end_of_word_suffix="</w>"))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # The specials are deliberately NOT added as HF AddedTokens: HF cuts those out of the text
        # before pre-tokenization, but open_clip only recognises them where its regex scan starts
        # a match (e.g. "!<end_of_text>" is the punctuation run "!<" + words there). They are
        # handled piece-wise in _encode_cleaned instead.
        self._hf = hf

    def _encode_cleaned(self, texts: list[str]) -> list[list[int]]:
        ids = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        for i, text in enumerate(texts):
            if "<start_of_text>" in text or "<end_of_text>" in text:  # rare: literal specials
                ids[i] = []
                for piece, _ in self._hf.pre_tokenizer.pre_tokenize_str(text):
                    if piece in _SPECIALS:
                        ids[i].append(_SPECIALS[piece])
                    else:
                        ids[i].extend(t.id for t in self._hf.model.tokenize(piece))
        return ids

    def describe(self) -> str:
        return "OpenAI CLIP's BPE, cleaned as open_clip does"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned like open_clip), without SOT/EOT."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self._encode_cleaned([clean_text(text)])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """Tokenize to an int32 array of shape (N, context_length), as ``open_clip.tokenize``.

        Each row is ``[SOT] + ids + [EOT]`` zero padded; longer rows are truncated and their
        last token is forced to EOT.
        """
        context_length = operator.index(context_length)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        out = np.zeros((len(texts), context_length), dtype=np.int32)
        for row, ids in zip(out, self._encode_cleaned([clean_text(t) for t in texts])):
            tokens = [SOT_TOKEN_ID, *ids[: context_length - 2], EOT_TOKEN_ID]
            row[: len(tokens)] = tokens
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Best-effort text for ids: drops SOT/EOT and the padding after the last EOT."""
        ids = [int(i) for i in np.asarray(list(ids), dtype=np.int64).reshape(-1)]
        if EOT_TOKEN_ID in ids:
            ids = ids[: len(ids) - ids[::-1].index(EOT_TOKEN_ID)]
        if any(not 0 <= i < VOCAB_SIZE for i in ids):
            raise ValueError(f"token ids must be in [0, {VOCAB_SIZE})")
        tokens = [self._hf.id_to_token(i) for i in ids if i not in (SOT_TOKEN_ID, EOT_TOKEN_ID)]
        raw = bytearray(self._byte_decoder[c] for c in "".join(tokens))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """Process-wide tokenizer (building it parses ~49k merges, so it is cached)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """``open_clip.tokenize`` equivalent returning an int32 numpy array."""
    return get_tokenizer()(texts, context_length)


def trimmed_length(tokens: np.ndarray, multiple: int = 8) -> int:
    """The width that keeps every non-padding token of ``tokens`` (N, T): the last such column + 1,
    rounded up to a multiple of ``multiple`` and capped at T.

    Dropping the trailing all-padding columns changes no text feature: CLIP's text tower is
    causal and pools at or before a row's last token, so no kept position attends to a dropped
    one. Rounding up bounds how many shapes a jitted step is compiled for (T / multiple at most).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (N, T), got shape {tokens.shape}")
    multiple = operator.index(multiple)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    used = np.flatnonzero(np.any(tokens != PAD_TOKEN_ID, axis=0))
    return padded_width(int(used[-1]) + 1 if used.size else 1, multiple, tokens.shape[1])


def padded_width(longest: int, multiple: int, context_length: int = CONTEXT_LENGTH) -> int:
    """``longest`` tokens rounded up to a multiple of ``multiple``, capped at ``context_length``:
    the width `trimmed_length` cuts a batch to, and a multi-process run cuts every batch to."""
    return min(context_length, -(-max(longest, 1) // multiple) * multiple)


def max_token_count(texts: Iterable[str], context_length: int = CONTEXT_LENGTH, chunk: int = 4096) -> int:
    """The most tokens any of ``texts`` takes (SOT and EOT included, at most ``context_length``),
    counted by this tokenizer as training tokenizes them; 0 for no texts."""
    texts, longest = list(texts), 0
    for start in range(0, len(texts), chunk):
        rows = get_tokenizer()(texts[start : start + chunk], context_length)
        # a row ends at its EOT: counting non-zero ids would miss "!", whose id is the padding's 0
        longest = max(longest, int(np.max(np.argmax(rows == EOT_TOKEN_ID, axis=1))) + 1)
    return longest
