"""The vector part of a search index: one shard's embeddings searched exactly or approximately (FAISS).

Chosen by measurement (bench/bench_index.py, docs/applications.md): on a 100k x 512 set
FAISS builds an IVF-Flat index in seconds where HNSW (FAISS or usearch) takes minutes on a small
CPU, queries faster, and its IVF file can be memory-mapped, so a shard larger than memory is
searched without loading it.

* `exact`: no extra file. The shard's `embeddings.npy` is memory-mapped and scanned in blocks with
  `faiss.knn` (BLAS inner products): the true top-k, memory bounded by one block.
* `approx`: `vectors.faiss`, an IVF-Flat index (inner product) with about 4*sqrt(n) lists. Its
  `nprobe` (lists visited per query) is calibrated at build time: doubled from 8 until recall@10
  against the exact search reaches `RECALL_TARGET` on a sample of queries, and recorded.

`auto` picks `exact` up to `EXACT_MAX_ROWS` rows per shard and `approx` above.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

KINDS = ("auto", "exact", "approx")
# A single exact query at this size scans 0.5 GB (512-d float32), tens of milliseconds on one CPU
# core pair (see docs/applications.md); beyond it the IVF index answers in about a millisecond.
EXACT_MAX_ROWS = 262_144
RECALL_TARGET = 0.97  # calibration target; the acceptance asks >= 0.95 on held-out queries
CALIBRATION_K = 10
VECTORS_FILE = "vectors.faiss"
BLOCK_ROWS = 65_536  # rows of embeddings.npy scanned at once by the exact search


@dataclass(frozen=True)
class VectorInfo:
    """How a shard is searched; stored in the manifest's shard entry."""

    kind: str  # "exact" or "approx"
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None  # approx vs exact on the calibration queries
    calibration_queries: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "VectorInfo":
        return VectorInfo(kind=d["kind"], nlist=d.get("nlist"), nprobe=d.get("nprobe"),
                          recall_at_10=d.get("recall_at_10"), calibration_queries=d.get("calibration_queries"))


def resolve_kind(kind: str, rows: int) -> str:
    """`exact` or `approx` for a shard of `rows` vectors (`auto`: approx above EXACT_MAX_ROWS)."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "auto":
        return "approx" if rows > EXACT_MAX_ROWS else "exact"
    return kind


def default_nlist(rows: int) -> int:
    """About 4*sqrt(n) lists, and at least 39 training points per list (FAISS's k-means minimum)."""
    return max(1, min(int(round(4 * math.sqrt(rows))), rows // 39))


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """True top-k by inner product over `embeddings` (any array, e.g. a memmap), in blocks.

    Returns (scores (Q, k'), rows (Q, k')) with k' = min(k, n), best first.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(embeddings)
    k = min(k, n)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n, BLOCK_ROWS):
        block = np.ascontiguousarray(embeddings[start:start + BLOCK_ROWS], dtype=np.float32)
        s, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = merge_top_k([best_s, s], [best_i, i + start], k)
    return best_s, best_i


def merge_top_k(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges per-part (Q, k_i) results into the best k per query; ties keep the earlier part's ids first."""
    s = np.concatenate(scores, axis=1)
    i = np.concatenate(ids, axis=1)
    # stable sort on -score: equal scores stay in id order of the parts (deterministic results)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    k = exact_ids.shape[1]
    if k == 0:
        return 1.0
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(approx_ids, exact_ids)]))


def build_ivf(embeddings: np.ndarray, nlist: int | None = None, seed: int = 0) -> Any:
    """An IVF-Flat inner-product index over `embeddings` (trained on up to 64 points per list)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x if n <= 64 * nlist else x[np.sort(rng.choice(n, 64 * nlist, replace=False))]
    index.cp.seed = seed  # deterministic k-means
    index.train(train)
    index.add(x)
    return index


def calibrate_nprobe(index: Any, embeddings: np.ndarray, queries: np.ndarray,
                     target: float = RECALL_TARGET, k: int = CALIBRATION_K) -> tuple[int, float]:
    """The smallest nprobe in 8, 16, 32, ... (up to nlist) whose recall@k reaches `target`.

    Returns (nprobe, its recall@k against the exact search on `queries`).
    """
    _, truth = exact_search(embeddings, queries, k)
    nprobe = min(8, index.nlist)
    while True:
        index.nprobe = nprobe
        _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
        recall = recall_at_k(found, truth)
        if recall >= target or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, index.nlist)


def calibration_queries(embeddings: np.ndarray, extra: np.ndarray | None = None, n: int = 256,
                        seed: int = 0) -> np.ndarray:
    """Queries for the recall check: `extra` (e.g. text prompts embedded by the model) plus stored
    vectors moved off themselves (noise and pairwise means), so that the query is never exactly an
    indexed point; unit norm."""
    rng = np.random.default_rng(seed)
    m = len(embeddings)
    half = n // 2
    a = np.asarray(embeddings[np.sort(rng.choice(m, min(half, m), replace=False))], np.float32)
    noisy = a + 0.5 * rng.standard_normal(a.shape).astype(np.float32) / math.sqrt(a.shape[1])
    b = np.asarray(embeddings[np.sort(rng.choice(m, min(n - half, m), replace=False))], np.float32)
    c = np.asarray(embeddings[np.sort(rng.choice(m, min(n - half, m), replace=False))], np.float32)
    pairs = b + c
    parts = [noisy, pairs] + ([np.asarray(extra, np.float32)] if extra is not None and len(extra) else [])
    q = np.concatenate(parts)
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return q / np.where(norms > 0, norms, 1.0)


def write_vectors(folder: str | os.PathLike, embeddings: np.ndarray, kind: str,
                  extra_queries: np.ndarray | None = None) -> VectorInfo:
    """Builds the shard's vector index in `folder` (a staging folder) and says how to search it.

    For `approx`, writes VECTORS_FILE and calibrates nprobe (recall reported in the result).
    """
    if kind == "exact" or len(embeddings) == 0:
        return VectorInfo(kind="exact")
    index = build_ivf(embeddings)
    queries = calibration_queries(embeddings, extra_queries)
    nprobe, recall = calibrate_nprobe(index, embeddings, queries)
    index.nprobe = nprobe
    faiss.write_index(index, str(Path(folder) / VECTORS_FILE))
    return VectorInfo(kind="approx", nlist=int(index.nlist), nprobe=nprobe, recall_at_10=round(recall, 4),
                      calibration_queries=len(queries))


def open_vectors(folder: str | os.PathLike, info: VectorInfo) -> Any:
    """The shard's IVF index, memory-mapped read-only (None for an exact shard)."""
    if info.kind != "approx":
        return None
    path = Path(folder) / VECTORS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shard's approximate index is missing; rebuild the index")
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    index.nprobe = info.nprobe or index.nprobe
    return index


def search_shard(index: Any, embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, shard rows) of one shard: `index` from `open_vectors`, else the exact scan.
    Rows are -1 where an approximate index found fewer than k."""
    if index is None:
        return exact_search(embeddings, queries, k)
    s, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return s, i.astype(np.int64)
