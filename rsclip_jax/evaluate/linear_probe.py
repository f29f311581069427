"""Linear probe: multinomial logistic regression on frozen features, in JAX, in float64.

The objective is scikit-learn's `LogisticRegression` (lbfgs, multinomial, unpenalised intercept):
mean cross-entropy + l2/2 * ||W||^2, i.e. sklearn's C = 1 / (l2 * N). It is minimised with
full-batch L-BFGS (optax, zoom line search), which uses no randomness.

Same numbers on any mesh. Features embedded on different meshes differ in their last bits (XLA
sums in another order when each device holds another number of rows: up to ~1e-7 here). The
probe must not amplify that into other choices or accuracies, so:
- the solve runs on one device, the host CPU, in float64, whatever the mesh, the number of
  devices or processes, or the accelerator (TPUs have no float64);
- it runs until the gradient norm is below `tol` = 1e-10. The objective is l2-strongly convex in
  W, so W is then within tol / l2 (1e-4 for the grid's smallest l2) of the exact optimum, a
  smooth function of the features: a 1e-7 change of the features moves the scores by ~1e-4 at
  l2 = 1e-6 and far less at larger l2, so a prediction changes only if its margin is that close
  to zero. (A float32 solve stopped at 1e-5 left W up to 1e-5 / l2 away from the optimum, at a
  point that depended on the iterates, and 1e-7 changes of the features flipped predictions.)

Regularisation is chosen on a validation split carved from the training set (per class, a seeded
20%), then the probe is refitted on the whole training set. The validation score of an l2 is the
number of validation images its fit classifies correctly: an integer, compared exactly, so the tie
tolerance is zero and no rounding can make or break a tie. Ties (frequent with few validation
images) go to the largest l2, the simplest model that validates as well. A set with fewer than two
images in some class cannot be validated; it uses `default_l2` (recorded in the results).

The grid is solved as a path, from the largest l2 down: at each l2 the fit with the validation
rows weighted 0 and the fit with every row weighted 1 run together (vmapped), starting from the
previous l2's solutions. That is a fraction of the work of cold starts, and since every fit
converges to the unique optimum, where it started does not matter. The features are centred
first: the unpenalised intercept absorbs the shift, so the optimum W is the same, and it is far
better conditioned (embeddings share a large common direction).

Compiling the solver costs seconds, so the rows are zero-weight padded to a power of two (at
least 64): one compilation serves a dataset's probe, and the few-shot sets share a few more.
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
TOL = 1e-10  # gradient norm (float64): W within TOL / l2 of the optimum
MAX_ITER = 1000  # per l2 of the path
# L-BFGS history: weakly regularised probes are ill-conditioned, and a long history cuts their
# iterations ~4x at a cost (O(memory * D * C) per iteration) small next to the data's O(N * D * C).
LBFGS_MEMORY = 100


@dataclass(frozen=True)
class ProbeConfig:
    """Linear-probe options (all have the documented defaults)."""

    l2_grid: tuple[float, ...] = L2_GRID
    default_l2: float = DEFAULT_L2
    val_fraction: float = VAL_FRACTION
    max_iter: int = MAX_ITER
    tol: float = TOL
    seed: int = 0


@partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(x: jax.Array, y: jax.Array, weights: jax.Array, l2: jax.Array, init: dict, num_classes: int,
         max_iter: int, tol: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
    """Fits one probe per row of (weights (M, N), l2 (M,), init {W (M, D, C), b (M, C)}), vmapped,
    on x (N, D) and y (N,). Returns (params, iterations (M,), final gradient norm (M,))."""
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)

    def solve(w: jax.Array, lam: jax.Array, params: dict) -> tuple[dict, jax.Array, jax.Array]:
        total = jnp.maximum(w.sum(), 1.0)

        def loss(p: dict) -> jax.Array:
            logits = x @ p["W"] + p["b"]
            ce = -(onehot * jax.nn.log_softmax(logits)).sum(-1)
            return (w * ce).sum() / total + 0.5 * lam * (p["W"] ** 2).sum()

        opt = optax.lbfgs(memory_size=LBFGS_MEMORY)
        value_and_grad = optax.value_and_grad_from_state(loss)

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
        # The state's gradient is that of the final iterate (the last step's line search computed it).
        return p, optax.tree_utils.tree_get(state, "count"), optax.tree_utils.tree_norm(
            optax.tree_utils.tree_get(state, "grad"))

    return jax.vmap(solve)(weights, l2, init)


def padded_size(n: int) -> int:
    """max(MIN_PADDED, the next power of two >= n): the few row counts the solver compiles for."""
    return max(MIN_PADDED, 1 << max(n - 1, 0).bit_length())


def _solver_device() -> jax.Device:
    """The host CPU: float64 everywhere, and the same device whatever the mesh."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: this host's first device
        return jax.local_devices()[0]


class _Problem:
    """Features, labels and per-fit row weights, padded and placed on the solver device in float64."""

    def __init__(self, x: np.ndarray, y: np.ndarray, weights: np.ndarray, num_classes: int, pad_to: int | None):
        n, self.dim, self.num_classes = len(x), x.shape[1], num_classes
        size = max(pad_to or 0, padded_size(n))
        # Centred: the same optimum W, better conditioned (see the module docstring).
        self.mean = np.asarray(x, np.float64).mean(axis=0)
        xp = np.zeros((size, self.dim), np.float64)
        xp[:n] = x - self.mean
        yp = np.zeros(size, np.int32)
        yp[:n] = y
        wp = np.zeros((len(weights), size), np.float64)
        wp[:, :n] = weights
        self.device = _solver_device()
        with jax.enable_x64(True):
            self.x, self.y, self.w = (jax.device_put(a, self.device) for a in (xp, yp, wp))

    def zeros(self) -> dict:
        m = self.w.shape[0]
        return {"W": np.zeros((m, self.dim, self.num_classes)), "b": np.zeros((m, self.num_classes))}

    def solve(self, l2: np.ndarray, init: dict, max_iter: int, tol: float) -> tuple[dict, np.ndarray, np.ndarray]:
        with jax.enable_x64(True):
            put = partial(jax.device_put, device=self.device)
            params, iters, gnorm = _fit(self.x, self.y, self.w, put(np.asarray(l2, np.float64)),
                                        jax.tree.map(put, init), num_classes=self.num_classes, max_iter=max_iter,
                                        tol=put(np.float64(tol)))
            return jax.tree.map(np.asarray, params), np.asarray(iters), np.asarray(gnorm)

    def uncentred(self, params: dict) -> dict:
        """Params for the original features: x W + b = (x - mean) W + (b - mean W)."""
        return {"W": params["W"], "b": params["b"] - self.mean @ params["W"]}


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float | tuple[float, ...],
                            weights: np.ndarray | None = None, max_iter: int = MAX_ITER, tol: float = TOL,
                            pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fits multinomial logistic regression, one independent fit (from zero) per value of l2.

    Args:
        l2: M values; weights: (M, N) per-fit sample weights (default: all 1);
        pad_to: rows to pad to (default `padded_size(N)`), so different N reuse one compilation.

    Returns:
        (W (M, D, C), b (M, C), iterations (M,)), float64 numpy arrays (iterations int).
    """
    grid = np.atleast_1d(np.asarray(l2, np.float64))
    w = np.ones((len(grid), len(x))) if weights is None else np.broadcast_to(weights, (len(grid), len(x)))
    problem = _Problem(x, y, w, num_classes, pad_to)
    params, iters, _ = problem.solve(grid, problem.zeros(), max_iter, tol)
    params = problem.uncentred(params)
    return params["W"], params["b"], iters


def regularisation_path(x: np.ndarray, y: np.ndarray, num_classes: int, l2_grid: tuple[float, ...],
                        weights: np.ndarray, max_iter: int = MAX_ITER, tol: float = TOL,
                        pad_to: int | None = None) -> dict[float, dict[str, np.ndarray]]:
    """Fits every row of `weights` (K, N) at every l2, from the largest l2 down, each l2 starting
    from the previous one's solutions (the K fits run vmapped).

    Returns:
        {l2: {"W" (K, D, C), "b" (K, C), "iterations" (K,), "grad_norm" (K,)}}, float64.
    """
    problem = _Problem(x, y, np.asarray(weights), num_classes, pad_to)
    params, out = problem.zeros(), {}
    for lam in sorted({float(v) for v in l2_grid}, reverse=True):
        params, iters, gnorm = problem.solve(np.full(len(weights), lam), params, max_iter, tol)
        out[lam] = {**problem.uncentred(params), "iterations": iters, "grad_norm": gnorm}
    return out


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
    if not val:  # no classes at all
        return None
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(val, np.int64))


def select_l2(correct: dict[float, int]) -> float:
    """The l2 with the most correctly classified validation images; ties go to the largest l2.

    Counts are integers, so the comparison is exact: float noise can neither make nor break a tie.
    """
    best = max(correct.values())
    return max(lam for lam, c in correct.items() if c == best)


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
        "default"), val_accuracy ({l2: percent}), iterations of the final fit (from the previous
        l2's solution), converged (its gradient norm reached `tol`), num_train, num_test.
    """
    config = config or ProbeConfig()
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    if len(train_x) == 0:
        raise ValueError("the linear probe needs at least one training image")
    n, grid = len(train_x), tuple(float(v) for v in config.l2_grid)
    split = validation_split(train_y, config.val_fraction, config.seed)
    full = np.ones(n)
    val_acc: dict[str, float] = {}
    if split is None:  # two identical rows: the validated runs' shapes, so the compiled solver is reused
        path = regularisation_path(train_x, train_y, num_classes, (config.default_l2,), np.stack([full, full]),
                                   config.max_iter, config.tol, pad_to)
        chosen, how = float(config.default_l2), "default"
    else:
        masked = full.copy()
        masked[split[1]] = 0.0
        path = regularisation_path(train_x, train_y, num_classes, grid, np.stack([masked, full]),
                                   config.max_iter, config.tol, pad_to)
        va = split[1]
        correct = {lam: int(np.sum(np.argmax(train_x[va] @ fit["W"][0] + fit["b"][0], axis=1) == train_y[va]))
                   for lam, fit in path.items()}
        val_acc = {f"{lam:g}": 100.0 * correct[float(lam)] / len(va) for lam in grid}
        chosen, how = select_l2(correct), "validation"
    fit = path[chosen]
    scores = np.asarray(test_x, np.float64) @ fit["W"][1] + fit["b"][1]
    pred = np.argmax(scores, axis=1)
    return {
        "top1": accuracy_topk(scores, test_y, 1),
        "top5": accuracy_topk(scores, test_y, 5),
        "per_class": per_class_accuracy(pred, np.asarray(test_y), num_classes).tolist(),
        "l2": chosen,
        "l2_selection": how,
        "val_accuracy": val_acc,
        "iterations": int(fit["iterations"][1]),
        "converged": bool(fit["grad_norm"][1] < config.tol),
        "num_train": int(n),
        "num_test": len(test_x),
    }
