"""Weighted k-NN classification on frozen features (DINO style, as ITRA evaluates).

For each test feature: cosine similarities to all training features (both L2-normalised), the k
most similar neighbours, each voting for its class with weight exp(similarity / T). Defaults
k = 20, T = 0.07; k is capped at the training set size.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rsclip_jax.evaluate.linear_probe import accuracy_topk, per_class_accuracy

K = 20
TEMPERATURE = 0.07
CHUNK = 1024  # test rows per step, bounding the (chunk, N_train) similarity matrix


@partial(jax.jit, static_argnames=("k", "num_classes"))
def _votes(test: jax.Array, train: jax.Array, train_labels: jax.Array, k: int, num_classes: int,
           temperature: float) -> jax.Array:
    sims = test @ train.T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    onehot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)
    return (weights[..., None] * onehot).sum(axis=1)


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, num_classes: int,
               k: int = K, temperature: float = TEMPERATURE) -> np.ndarray:
    """(N_test, C) summed neighbour weights per class."""
    if temperature <= 0:
        raise ValueError(f"k-NN temperature must be positive, got {temperature}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k-NN k (--k, or the task's 'k') must be a positive integer, got {k!r}")
    k = min(k, len(train_x))
    train = jnp.asarray(train_x, jnp.float32)
    labels = jnp.asarray(train_y, jnp.int32)
    out = []
    for i in range(0, len(test_x), CHUNK):
        chunk = np.asarray(test_x[i : i + CHUNK], np.float32)
        n = len(chunk)
        if n < CHUNK and len(test_x) > CHUNK:  # keep one compiled shape
            chunk = np.concatenate([chunk, np.zeros((CHUNK - n, chunk.shape[1]), np.float32)])
        out.append(np.asarray(_votes(jnp.asarray(chunk), train, labels, k, num_classes, temperature))[:n])
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, k: int = K, temperature: float = TEMPERATURE) -> dict:
    """Top-1/top-5 and per-class accuracy (percent) of the weighted k-NN vote."""
    scores = knn_scores(train_x, train_y, test_x, num_classes, k, temperature)
    pred = np.argmax(scores, axis=1)
    return {
        "top1": accuracy_topk(scores, test_y, 1),
        "top5": accuracy_topk(scores, test_y, 5),
        "per_class": per_class_accuracy(pred, np.asarray(test_y), num_classes).tolist(),
        "k": int(min(k, len(train_x))),
        "temperature": float(temperature),
        "num_train": len(train_x),
        "num_test": len(test_x),
    }
