"""A small exact t-SNE in numpy, for the embedding plots (scikit-learn is only a test dependency).

van der Maaten & Hinton (2008): Gaussian affinities calibrated to a perplexity by binary search,
Student-t affinities in 2-D, gradient descent with momentum, per-parameter gains and early
exaggeration. The initialisation is the PCA projection, so results are deterministic. It is
O(N^2) in time and memory: `embed_2d` subsamples to `MAX_POINTS` first.
"""

from __future__ import annotations

import numpy as np

MAX_POINTS = 1000


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection on the top two principal components (signs fixed for determinism)."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    vt = vt[:2] * np.sign(vt[:2, [0]] + 1e-30)
    y = x @ vt.T
    return y if y.shape[1] == 2 else np.pad(y, ((0, 0), (0, 2 - y.shape[1])))


def _affinities(x: np.ndarray, perplexity: float) -> np.ndarray:
    sq = np.sum(x * x, axis=1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    n = len(x)
    p = np.zeros((n, n))
    target = np.log(perplexity)
    for i in range(n):
        di = np.delete(d[i], i)
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(64):  # binary search on the precision beta = 1 / (2 sigma^2)
            w = np.exp(-(di - di.min()) * beta)
            pi = w / w.sum()
            entropy = -np.sum(pi * np.log(np.maximum(pi, 1e-300)))
            if abs(entropy - target) < 1e-5:
                break
            if entropy > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = pi
    p = (p + p.T) / (2 * n)
    return np.maximum(p, 1e-12)


def tsne(x: np.ndarray, perplexity: float = 30.0, iterations: int = 500, seed: int = 0) -> np.ndarray:
    """(N, 2) t-SNE coordinates of the rows of x. `seed` only breaks PCA ties (jitter)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n < 4:
        return pca_2d(x)
    perplexity = min(perplexity, (n - 1) / 3)
    p = _affinities(x, perplexity)
    y = pca_2d(x)
    y = y / (np.std(y[:, 0]) + 1e-12) * 1e-4 + np.random.default_rng(seed).normal(scale=1e-8, size=y.shape)
    lr = max(n / 12 / 4, 50.0)  # the "auto" learning rate of openTSNE / scikit-learn
    velocity, gains = np.zeros_like(y), np.ones_like(y)
    exaggeration_steps = min(250, iterations // 4)
    for it in range(iterations):
        pe = p * 12.0 if it < exaggeration_steps else p
        sq = np.sum(y * y, axis=1)
        num = 1.0 / (1.0 + sq[:, None] + sq[None, :] - 2 * y @ y.T)
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        w = (pe - q) * num
        grad = 4.0 * (np.diag(w.sum(axis=1)) - w) @ y
        momentum = 0.5 if it < exaggeration_steps else 0.8
        same = np.sign(grad) == np.sign(velocity)
        gains = np.maximum(np.where(same, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
    return y - y.mean(axis=0)


def embed_2d(x: np.ndarray, labels: np.ndarray, max_points: int = MAX_POINTS, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of at most `max_points` rows (a seeded subsample); returns (coords, their labels)."""
    idx = np.arange(len(x))
    if len(x) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
    return tsne(x[idx], seed=seed), np.asarray(labels)[idx]
