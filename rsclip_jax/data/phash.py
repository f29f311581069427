"""Perceptual hash (pHash) and a near-duplicate index over it.

pHash: grayscale, resize to 32x32, 2-D DCT-II, keep the 8x8 lowest frequencies, and set a bit
for each coefficient above their median: a 64-bit fingerprint that survives re-encoding,
resizing and mild colour changes, so near-duplicates are hashes a small Hamming distance apart.
It does not survive rotations or flips, and flat images (sea, desert) hash close together, which
is why the distance threshold stays small.

The DCT is an orthonormal 32x32 matrix product in numpy: exact, dependency-free and fast at this
size. The layout follows the common `imagehash.phash` recipe (LANCZOS resize, median threshold).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Hashable

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIDE = 32
_LOW = 8


@functools.cache
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash of an image (any mode; convert high-bit-depth images to RGB first)."""
    gray = img.convert("L").resize((_SIDE, _SIDE), Image.LANCZOS, reducing_gap=3.0)
    m = _dct_matrix(_SIDE)
    coeffs = (m @ np.asarray(gray, dtype=np.float64) @ m.T)[:_LOW, :_LOW]
    bits = (coeffs > np.median(coeffs)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_to_hex(value: int) -> str:
    """16 hex digits, the form stored in records and the scan cache."""
    return f"{value:016x}"


def hex_to_hash(text: str) -> int:
    """Inverse of `hash_to_hex`."""
    return int(text, 16)


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


class PHashIndex:
    """Finds stored hashes within a Hamming distance of a query, without comparing all pairs.

    Pigeonhole: split the 64 bits into threshold + 1 bands; two hashes at most `threshold` bits
    apart agree exactly on at least one band. Each band is a dict from band value to entries,
    so a query only checks the entries sharing a band value with it.
    """

    def __init__(self, threshold: int) -> None:
        if not 0 <= threshold < HASH_BITS // 2:
            raise ValueError(f"phash distance threshold must be in [0, {HASH_BITS // 2}), got {threshold}")
        self.threshold = threshold
        edges = np.linspace(0, HASH_BITS, threshold + 2).round().astype(int)
        self._bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(edges)]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._hashes: list[int] = []
        self._labels: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, value: int, label: Hashable) -> None:
        """Stores `value` under `label`."""
        entry = len(self._hashes)
        self._hashes.append(value)
        self._labels.append(label)
        for table, (shift, mask) in zip(self._tables, self._bands):
            table.setdefault((value >> shift) & mask, []).append(entry)

    def matches(self, value: int) -> list[tuple[Hashable, int]]:
        """All stored (label, distance) within the threshold, in insertion order."""
        candidates: set[int] = set()
        for table, (shift, mask) in zip(self._tables, self._bands):
            candidates.update(table.get((value >> shift) & mask, ()))
        out = []
        for entry in sorted(candidates):
            distance = hamming(value, self._hashes[entry])
            if distance <= self.threshold:
                out.append((self._labels[entry], distance))
        return out
