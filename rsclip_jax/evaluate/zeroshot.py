"""Zero-shot classification: images scored against prompt-ensemble class embeddings.

Each class embedding is the mean of the L2-normalised embeddings of its prompts (one per
template), renormalised (`Extractor.classifier`). The prediction is the class of highest cosine
similarity; the logit scale does not change the ranking, so it is not applied.
"""

from __future__ import annotations

import numpy as np

from rsclip_jax.evaluate.linear_probe import accuracy_topk, per_class_accuracy


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(pred)), 1)
    return cm


def zeroshot_metrics(image_embeddings: np.ndarray, labels: np.ndarray, class_embeddings: np.ndarray) -> dict:
    """Top-1, top-5, per-class accuracy (percent), their mean, and the confusion matrix."""
    scores = np.asarray(image_embeddings, np.float32) @ np.asarray(class_embeddings, np.float32).T
    pred = np.argmax(scores, axis=1)
    num_classes = class_embeddings.shape[0]
    per_class = per_class_accuracy(pred, np.asarray(labels), num_classes)
    return {
        "top1": accuracy_topk(scores, labels, 1),
        "top5": accuracy_topk(scores, labels, 5),
        "per_class": per_class.tolist(),
        "mean_per_class": float(np.nanmean(per_class)),
        "confusion": confusion_matrix(pred, labels, num_classes).tolist(),
        "num_images": len(labels),
    }
