"""Image-text retrieval with RemoteCLIP's exact semantics (RSITMD, RSICD, UCM Karpathy splits).

* Input: a Karpathy `dataset_*.json`; each test image has (normally 5) captions,
  `sentences[i].raw`, which are capitalised before tokenising (as the official script does).
* Scores are `text_embeddings @ image_embeddings.T`.
* R@K is a hit rate. Image->text: an image counts if ANY of its captions ranks in its top K among
  all test captions. Text->image: a caption counts if its image ranks in its top K.
  K in {1, 5, 10}; mean recall is the mean of the six numbers, all in percent.
* Ties are broken by index order (the lower index ranks first), which is what `torch.topk` on the
  official script's CPU path does in practice; with float embeddings, exact ties are rare.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KS = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in KS) + ("mean_recall",)


@dataclass(frozen=True)
class RetrievalSplit:
    """One split of a Karpathy JSON: image paths and their captions, flattened."""

    image_paths: list[str]
    texts: list[str]
    text_to_image: np.ndarray  # (T,) index of each caption's image

    @property
    def image_to_texts(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.text_to_image == i) for i in range(len(self.image_paths))]


def capitalise(text: str) -> str:
    """First character upper-cased, the rest unchanged (Python's str.capitalize would lower the rest)."""
    return text[:1].upper() + text[1:]


def load_karpathy_split(json_path: str | os.PathLike, images_dir: str | os.PathLike, split: str = "test") -> RetrievalSplit:
    """Reads a Karpathy-format JSON and returns the images and captions of `split`.

    Raises:
        ValueError: naming the file for malformed JSON, an image without captions, or an empty split.
    """
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: not a Karpathy-format JSON ({e!r}); expected {{'images': [...]}}") from None
    paths, texts, owner = [], [], []
    for n, entry in enumerate(entries):
        if entry.get("split") != split:
            continue
        name = entry.get("filename")
        sentences = [s.get("raw", "") for s in entry.get("sentences", [])]
        if not name or not sentences:
            raise ValueError(f"{json_path}: images[{n}] has no filename or no sentences")
        sub = entry.get("filepath", "")
        paths.append(os.path.join(images_dir, sub, name))
        for s in sentences:
            texts.append(capitalise(s.strip()))
            owner.append(len(paths) - 1)
    if not paths:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    return RetrievalSplit(paths, texts, np.asarray(owner, dtype=np.int64))


def _ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of column positive[r] within row r of scores; ties go to the lower index."""
    s = scores[np.arange(len(positive)), positive][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    return (scores > s).sum(1) + ((scores == s) & (cols < positive[:, None])).sum(1)


def retrieval_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                    text_to_image: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks: (per image, its best-ranked caption among all captions; per caption, its image).

    R@K in each direction is the fraction of ranks below K (see the module docstring).
    """
    text_to_image = np.asarray(text_to_image)
    scores = np.asarray(text_embeddings, np.float64) @ np.asarray(image_embeddings, np.float64).T  # (T, I)
    t2i_rank = _ranks(scores, text_to_image)
    # Image->text: rank each of an image's captions within that image's row; keep the best.
    i2t_rank = np.empty(scores.shape[1], np.int64)
    for i, row in enumerate(scores.T):
        positives = np.flatnonzero(text_to_image == i)
        if positives.size == 0:
            raise ValueError(f"image {i} has no caption; every image needs at least one")
        i2t_rank[i] = _ranks(np.broadcast_to(row, (positives.size, row.size)), positives).min()
    return i2t_rank, t2i_rank


def retrieval_metrics(image_embeddings: np.ndarray, text_embeddings: np.ndarray, text_to_image: Sequence[int]) -> dict[str, float]:
    """R@1/5/10 in both directions and their mean, in percent (see the module docstring)."""
    i2t_rank, t2i_rank = retrieval_ranks(image_embeddings, text_embeddings, text_to_image)
    out = {}
    for k in KS:
        out[f"image_to_text_R@{k}"] = 100.0 * float(np.mean(i2t_rank < k))
    for k in KS:
        out[f"text_to_image_R@{k}"] = 100.0 * float(np.mean(t2i_rank < k))
    out["mean_recall"] = float(np.mean([out[key] for key in METRIC_KEYS[:-1]]))
    return out


def recall_curve(ranks: np.ndarray, max_k: int) -> list[float]:
    """R@K in percent for K = 1..max_k, from 0-based ranks (for the recall@K plots)."""
    ranks = np.asarray(ranks)
    return [100.0 * float(np.mean(ranks < k)) for k in range(1, max_k + 1)]


def random_ranking_mean_recall(num_images: int, captions_per_image: int = 5) -> float:
    """Expected mean recall (percent) of a random ranking, the floor a trained model must beat."""
    num_texts = num_images * captions_per_image
    t2i = [min(k, num_images) / num_images for k in (1, 5, 10)]
    # P(at least one of c captions in the top k of T texts) = 1 - C(T-c, k) / C(T, k)
    i2t = []
    for k in (1, 5, 10):
        p_none = np.prod([(num_texts - captions_per_image - i) / (num_texts - i) for i in range(min(k, num_texts))])
        i2t.append(1 - p_none)
    return 100.0 * float(np.mean(t2i + i2t))
