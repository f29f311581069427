"""Object counting, RemoteCount style.

Each image has a caption template with `{}` for the number (e.g. "There are {} trees in the
picture ."). The candidate captions put each of the dataset's `numbers` (RemoteCount: 1..10) in it;
the image is scored against its own candidates, and top-k accuracy (k = 1..len(numbers)) is the
percentage of images whose true count is among the k best-scoring candidates. Ties go to the
earlier number. The last top-k is 100% by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsclip_jax.evaluate.datasets import COUNT_RANGE


def candidate_captions(template: str, numbers: Sequence[int] = COUNT_RANGE) -> list[str]:
    """One caption per candidate number, as digits (RemoteCount's captions use digits)."""
    return [template.format(n) for n in numbers]


def counting_metrics(image_embeddings: np.ndarray, candidate_embeddings: np.ndarray, counts: np.ndarray,
                     numbers: Sequence[int] = COUNT_RANGE) -> dict:
    """Top-k accuracies (percent) from (N, D) images, (N, K, D) candidates and (N,) true counts."""
    scores = np.einsum("nd,nkd->nk", np.asarray(image_embeddings, np.float64),
                       np.asarray(candidate_embeddings, np.float64))
    position = {n: i for i, n in enumerate(numbers)}
    truth = np.array([position[int(c)] for c in counts], np.int64)
    s = scores[np.arange(len(truth)), truth][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    rank = (scores > s).sum(1) + ((scores == s) & (cols < truth[:, None])).sum(1)
    out = {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in range(1, len(numbers) + 1)}
    out["num_images"] = len(truth)
    out["numbers"] = list(numbers)
    out["per_count_top1"] = {
        str(n): 100.0 * float(np.mean(rank[truth == i] < 1)) for i, n in enumerate(numbers) if (truth == i).any()
    }
    return out
