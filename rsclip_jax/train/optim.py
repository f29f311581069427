"""The optax optimiser: AdamW with CLIP's settings, warmup + cosine, per-tower rates and freezing.

* AdamW with CLIP's beta2 = 0.98 and eps = 1e-6 (more stable than 0.999 / 1e-8 for contrastive
  training with large batches).
* Weight decay on weight matrices and kernels only: never on biases, norms (LayerNorm/BatchNorm
  scales), embeddings (token, positional, class) or the temperature. CLIP decays "all weights
  except gains or biases"; embeddings are also left out here, as the project's training spec asks
  (OpenCLIP does decay its token and positional embeddings).
* Gradient clipping by global norm over the trainable parameters.
* Per-tower learning-rate multipliers (`visual`, `text`, `logit`) and freezing of whole towers: a
  frozen tower gets no optimiser state at all (LiT's locked image tower costs no Adam memory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

TOWERS = ("visual", "text", "logit")
_NO_DECAY_NAMES = ("token_embedding", "positional_embedding", "class_embedding")


def tower_of(path: Sequence[Any]) -> str:
    """`visual`, `logit` (temperature and bias) or `text` for a parameter path."""
    head = _key_name(path[0])
    if head == "visual":
        return "visual"
    if head in ("logit_scale", "logit_bias"):
        return "logit"
    return "text"


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _names(path: Sequence[Any]) -> list[str]:
    return [_key_name(k) for k in path]


def decays(path: Sequence[Any], leaf: Any) -> bool:
    """Whether weight decay applies: matrices and kernels only, never embeddings, norms or biases."""
    names = _names(path)
    # By name first: a stacked or head-split bias (e.g. qkv_bias, (layers, 3, heads, head_dim)) is
    # still a bias. Then by rank, for 1-D gains and the scalar temperature.
    if any(n in _NO_DECAY_NAMES or "bias" in n for n in names):
        return False
    core_ndim = leaf.ndim - (1 if "transformer" in names else 0)  # stacked blocks carry a layers axis
    return core_ndim >= 2


SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(
    lr: float, total_steps: int, warmup_steps: int, schedule: str = "cosine", end_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup to `lr`, then `cosine` decay to `lr * end_lr_ratio`, `linear` decay, or `constant`."""
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, lr * end_lr_ratio, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose {', '.join(SCHEDULES)}")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _scale_by_tower(lr_mult: Mapping[str, float]) -> optax.GradientTransformation:
    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u * lr_mult.get(tower_of(p), 1.0), updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-6,
    weight_decay: float = 0.2,
    grad_clip_norm: float | None = 1.0,
    lr_mult: Mapping[str, float] | None = None,
    freeze: Sequence[str] = (),
) -> optax.GradientTransformation:
    """AdamW over the trainable towers; `freeze` lists towers (visual, text, logit) left untouched."""
    unknown = set(freeze) - set(TOWERS) or set(lr_mult or {}) - set(TOWERS)
    if unknown:
        raise ValueError(f"unknown tower(s) {sorted(unknown)}; towers are {', '.join(TOWERS)}")
    chain: list[optax.GradientTransformation] = []
    if grad_clip_norm:
        chain.append(optax.clip_by_global_norm(grad_clip_norm))
    chain += [
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=lambda p: jax.tree_util.tree_map_with_path(decays, p)),
        optax.scale_by_learning_rate(schedule),
        _scale_by_tower(dict(lr_mult or {})),
    ]
    trainable = optax.chain(*chain)
    if not freeze:
        return trainable
    labels: Callable[[Any], Any] = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, _: "frozen" if tower_of(p) in freeze else "trainable", params
    )
    return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
