"""Few-shot classification: the linear probe trained on n images per class.

For each n in `shots` and each seed, n training images per class are drawn (seeded, without
replacement) from the training split, and the linear probe (`linear_probe.py`, regularisation
chosen on a validation split of those n-shot images when every class has at least two) is
evaluated on the whole test split.

n must be a positive integer. A class with fewer than n training images contributes all of them
(so an n larger than every class is the full-data probe): `effective_shots` and `min_shots`
record the largest and the smallest number of images per class actually used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsclip_jax.evaluate.linear_probe import ProbeConfig, linear_probe

SHOTS = (1, 2, 4, 8, 16, 32)
SEEDS = (0, 1, 2)


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_fewshot_options(shots: Sequence[int], seeds: Sequence[int]) -> None:
    """Raises ValueError, naming the flag and the task option and saying what to pass, unless
    `shots` is a non-empty list of positive integers and `seeds` one of non-negative integers."""
    for key, values, least, example in (("shots", shots, 1, "1,2,4,8,16,32"), ("seeds", seeds, 0, "0,1,2")):
        items = list(values) if isinstance(values, (list, tuple, np.ndarray)) else []  # a bare number too
        bad = [v for v in items if not _is_int(v) or v < least]
        if bad or not items:
            what = "positive integers (images per class)" if least else "non-negative integers"
            raise ValueError(f"few-shot {key} (--{key}, or the task's '{key}') must be a list of {what}, got "
                             f"{values!r}" + (f": {bad[0]!r} is not one" if bad else "")
                             + f"; pass e.g. --{key} {example}")


def sample_shots(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of min(n, class size) images per class, drawn with `seed`; sorted."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.extend(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.asarray(picked, np.int64))


def fewshot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            num_classes: int, shots: Sequence[int] = SHOTS, seeds: Sequence[int] = SEEDS,
            config: ProbeConfig | None = None) -> dict:
    """{"shots": {n: {mean, std, runs, seeds, effective_shots, min_shots, l2}}}, accuracies in percent.

    std is the population standard deviation over seeds (0 for a single seed).

    Raises:
        ValueError: for a shot count that is not a positive integer, or a seed that is not a
            non-negative integer (see `check_fewshot_options`), or an empty training split.
    """
    check_fewshot_options(shots, seeds)
    train_y = np.asarray(train_y)
    if len(train_y) == 0:
        raise ValueError("few-shot needs training images; the training split is empty")
    config = config or ProbeConfig()
    class_sizes = np.bincount(train_y, minlength=num_classes)
    present = class_sizes[class_sizes > 0]
    out = {}
    for n in shots:
        runs, l2s = [], []
        for seed in seeds:
            idx = sample_shots(train_y, n, seed)
            r = linear_probe(train_x[idx], train_y[idx], test_x, test_y, num_classes,
                             ProbeConfig(**{**config.__dict__, "seed": seed}))
            runs.append(r["top1"])
            l2s.append(r["l2"])
        out[str(n)] = {
            "mean": float(np.mean(runs)),
            "std": float(np.std(runs)),
            "runs": runs,
            "seeds": list(seeds),
            "effective_shots": int(min(n, present.max())),
            "min_shots": int(min(n, present.min())),
            "l2": l2s,
        }
    return {"shots": out, "num_test": len(test_x)}
