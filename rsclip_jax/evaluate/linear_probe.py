"""Linear probe: multinomial logistic regression on frozen features, in JAX.

The objective is scikit-learn's `LogisticRegression` (lbfgs, multinomial, unpenalised intercept):
mean cross-entropy + l2/2 * ||W||^2, i.e. sklearn's C = 1 / (l2 * N). It is minimised with
full-batch L-BFGS (optax, zoom line search) until the gradient norm falls below `tol`: no
randomness, so a fit is deterministic.

Regularisation is chosen on a validation split carved from the training set (per class, a seeded
20%), then the probe is refitted on the whole training set. Both happen in ONE vmapped solve: for
every l2 of the grid, one fit with the validation rows weighted 0 and one with every row weighted
1; the full-data fit of the best-validating l2 is the probe. A set with fewer than two images in
some class cannot be validated; it uses `default_l2` (recorded in the results).

Compiling the solver costs seconds, so the training set is zero-weight padded to a power of two
(at least 64), and few-shot runs pad to the size of the full training set: one compilation per
dataset serves the probe and every few-shot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

# l2 on L2-normalised features; 1e-4 ~ sklearn's default C=1 at N=10k.
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_L2 = 1e-3
VAL_FRACTION = 0.2
MIN_PADDED = 64


@dataclass(frozen=True)
class ProbeConfig:
    """Linear-probe options (all have the documented defaults)."""

    l2_grid: tuple[float, ...] = L2_GRID
    default_l2: float = DEFAULT_L2
    val_fraction: float = VAL_FRACTION
    max_iter: int = 1000
    tol: float = 1e-5
    seed: int = 0


@partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(x: jax.Array, y: jax.Array, weights: jax.Array, l2: jax.Array, num_classes: int, max_iter: int, tol: float):
    """Fits one probe per row of (weights (M, N), l2 (M,)), vmapped, on x (N, D) and y (N,)."""
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)

    def solve(w: jax.Array, lam: jax.Array) -> tuple[dict, jax.Array]:
        total = jnp.maximum(w.sum(), 1.0)

        def loss(p: dict) -> jax.Array:
            logits = x @ p["W"] + p["b"]
            ce = -(onehot * jax.nn.log_softmax(logits)).sum(-1)
            return (w * ce).sum() / total + 0.5 * lam * (p["W"] ** 2).sum()

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss)
        params = {"W": jnp.zeros((x.shape[1], num_classes), x.dtype), "b": jnp.zeros((num_classes,), x.dtype)}

        def step(carry):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
            return optax.apply_updates(p, updates), state

        def go_on(carry):
            _, state = carry
            count = optax.tree_utils.tree_get(state, "count")
            grad = optax.tree_utils.tree_get(state, "grad")
            return (count == 0) | ((count < max_iter) & (optax.tree_utils.tree_norm(grad) >= tol))

        p, state = jax.lax.while_loop(go_on, step, (params, opt.init(params)))
        return p, optax.tree_utils.tree_get(state, "count")

    return jax.vmap(solve)(weights, l2)


def padded_size(n: int) -> int:
    """max(MIN_PADDED, the next power of two >= n): the few row counts the solver compiles for."""
    return max(MIN_PADDED, 1 << max(n - 1, 0).bit_length())


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float | tuple[float, ...],
                            weights: np.ndarray | None = None, max_iter: int = 1000, tol: float = 1e-5,
                            pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fits multinomial logistic regression, one fit per value of l2 (and row of weights).

    Args:
        l2: M values; weights: (M, N) per-fit sample weights (default: all 1);
        pad_to: rows to pad to (default `padded_size(N)`), so different N reuse one compilation.

    Returns:
        (W (M, D, C), b (M, C), iterations (M,)), numpy arrays.
    """
    grid = np.atleast_1d(np.asarray(l2, np.float32))
    n = len(x)
    size = max(pad_to or 0, padded_size(n))
    xp = np.zeros((size, x.shape[1]), np.float32)
    xp[:n] = x
    yp = np.zeros(size, np.int32)
    yp[:n] = y
    w = np.zeros((len(grid), size), np.float32)
    w[:, :n] = 1.0 if weights is None else weights
    params, iters = _fit(jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(w), jnp.asarray(grid),
                         num_classes=num_classes, max_iter=max_iter, tol=tol)
    return np.asarray(params["W"]), np.asarray(params["b"]), np.asarray(iters)


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(train indices, validation indices): per class a seeded `fraction` (at least one) goes to
    validation, keeping at least one for training. None if some class has fewer than two."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            return None
        idx = rng.permutation(idx)
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(train), np.sort(val)


def accuracy_topk(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Top-k accuracy in percent; ties broken by the lower class index (stable sort)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return 100.0 * float(np.mean((top == np.asarray(labels)[:, None]).any(axis=1)))


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) accuracy in percent of each class (NaN for a class absent from `labels`)."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        m = labels == c
        if m.any():
            out[c] = 100.0 * float(np.mean(pred[m] == c))
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, config: ProbeConfig | None = None, pad_to: int | None = None) -> dict:
    """Chooses l2 on a validation split of the training set, refits on all of it, tests.

    Returns:
        top1, top5 (percent), per_class (list), l2 (chosen), l2_selection ("validation" or
        "default"), val_accuracy ({l2: percent}), iterations of the final fit.
    """
    config = config or ProbeConfig()
    n, grid = len(train_x), tuple(config.l2_grid)
    split = validation_split(np.asarray(train_y), config.val_fraction, config.seed)
    full = np.ones((len(grid), n), np.float32)
    if split is None:  # same shapes as with validation, so the compiled solver is reused
        l2s, weights = (config.default_l2,) * 2 * len(grid), np.concatenate([full, full])
    else:
        masked = full.copy()
        masked[:, split[1]] = 0.0
        l2s, weights = grid + grid, np.concatenate([masked, full])
    W, b, iters = fit_logistic_regression(train_x, train_y, num_classes, l2s, weights, config.max_iter,
                                          config.tol, pad_to)
    val_acc: dict[str, float] = {}
    if split is None:
        best, how = len(grid), "default"
    else:
        va = split[1]
        accs = [accuracy_topk(train_x[va] @ W[i] + b[i], train_y[va], 1) for i in range(len(grid))]
        val_acc = {f"{lam:g}": a for lam, a in zip(grid, accs)}
        # Ties go to the strongest regularisation: the simplest model that validates as well.
        best = len(grid) + max(range(len(grid)), key=lambda i: (accs[i], grid[i]))
        how = "validation"
    scores = test_x @ W[best] + b[best]
    pred = np.argmax(scores, axis=1)
    return {
        "top1": accuracy_topk(scores, test_y, 1),
        "top5": accuracy_topk(scores, test_y, 5),
        "per_class": per_class_accuracy(pred, np.asarray(test_y), num_classes).tolist(),
        "l2": float(l2s[best]),
        "l2_selection": how,
        "val_accuracy": val_acc,
        "iterations": int(iters[best]),
        "num_train": int(n),
        "num_test": len(test_x),
    }
