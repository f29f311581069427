"""Few-shot classification: the linear probe trained on n images per class.

For each n in `shots` and each seed, n training images per class are drawn (seeded, without
replacement) from the training split, and the linear probe (`linear_probe.py`, regularisation
chosen on a validation split of those n-shot images when every class has at least two) is
evaluated on the whole test split. A class with fewer than n training images contributes all of
them: `effective_shots` records the largest number actually used.
"""

from __future__ import annotations

import numpy as np

from rsclip_jax.evaluate.linear_probe import ProbeConfig, linear_probe, padded_size

SHOTS = (1, 2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)


def sample_shots(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of min(n, class size) images per class, drawn with `seed`; sorted."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.extend(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.asarray(picked, np.int64))


def fewshot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            num_classes: int, shots: tuple[int, ...] = SHOTS, seeds: tuple[int, ...] = SEEDS,
            config: ProbeConfig | None = None) -> dict:
    """{"shots": {n: {mean, std, runs, effective_shots, l2}}} with accuracies in percent.

    std is the population standard deviation over seeds (0 for a single seed).
    """
    if not shots or not seeds:
        raise ValueError("few-shot needs at least one value of n and one seed")
    config = config or ProbeConfig()
    class_sizes = np.bincount(np.asarray(train_y), minlength=num_classes)
    out = {}
    for n in shots:
        runs, l2s = [], []
        for seed in seeds:
            idx = sample_shots(np.asarray(train_y), n, seed)
            r = linear_probe(train_x[idx], train_y[idx], test_x, test_y, num_classes,
                             ProbeConfig(**{**config.__dict__, "seed": seed}), pad_to=padded_size(len(train_x)))
            runs.append(r["top1"])
            l2s.append(r["l2"])
        out[str(n)] = {
            "mean": float(np.mean(runs)),
            "std": float(np.std(runs)),
            "runs": runs,
            "seeds": list(seeds),
            "effective_shots": int(min(n, class_sizes[class_sizes > 0].max())),
            "l2": l2s,
        }
    return {"shots": out, "num_test": len(test_x)}
