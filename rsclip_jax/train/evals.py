"""Evaluations run inside training (the hook the evaluator plugs into).

For now: image-text retrieval on the test split of a Karpathy JSON, with RemoteCLIP's metric
semantics (`rsclip_jax.evaluate.retrieval`). Images and tokens are prepared once; each eval only
swaps the current weights into a compiled embedder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.evaluate.retrieval import load_karpathy_split, retrieval_metrics
from rsclip_jax.train.loop import EvalHook
from rsclip_jax.train.setup import Run


def retrieval_hook(run: Run) -> EvalHook:
    """An eval hook reporting `retrieval/<metric>` for `config.evals.retrieval_json`'s test split.

    Embeds on the training mesh, so weights sharded over hosts need no gathering to one host.
    """
    ev = run.config.evals
    split = load_karpathy_split(ev.retrieval_json, ev.retrieval_images, "test")
    extractor: Extractor | None = None

    def hook(step: int, state: Any) -> dict[str, float]:
        nonlocal extractor
        model = nnx.merge(run.graphdef, state.params, state.rest)
        if extractor is None:
            extractor = Extractor(model, batch_size=ev.batch_size, mesh=run.mesh, progress=False)
        else:
            extractor.set_model(model)
        images = extractor.images(split.image_paths)
        metrics = retrieval_metrics(images.embeddings, extractor.texts(split.texts), split.text_to_image)
        return {f"retrieval/{k}": v for k, v in metrics.items()}

    return hook


def eval_hooks(run: Run) -> list[EvalHook]:
    """The evaluations the config asks for (`config.evals`)."""
    return [retrieval_hook(run)] if run.config.evals.retrieval_json else []


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
