"""Batched, jitted embedding of images and texts, and zero-shot classifiers.

The model is split once into (graphdef, state); two jitted pure functions map a uint8 image batch
or a token batch to L2-normalised float32 embeddings. Every batch is padded to the same size, so
each function compiles exactly once. With several local devices the batch is sharded over them.
Images are decoded on a thread pool (PIL releases the GIL) while the device computes.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from rsclip_jax.models import CLIP
from rsclip_jax.preprocess import ImageReadError, load_and_preprocess, normalize_images
from rsclip_jax.tokenizer import get_tokenizer

# Logits are exp(logit_scale) * cosine, clamped as in CLIP training (ln 100).
MAX_LOGIT_SCALE = 100.0


def _mesh() -> jax.sharding.Mesh:
    devices = jax.local_devices()
    return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


class Embedder:
    """Embeds images and texts with a CLIP model, in fixed-size batches.

    Args:
        model: the CLIP model (its parameters are replicated over the local devices).
        batch_size: rounded up to a multiple of the local device count.
        num_threads: image decoding threads.
    """

    def __init__(self, model: CLIP, batch_size: int = 64, num_threads: int | None = None):
        self.model = model
        self.image_size = model.config.vision.image_size
        self.context_length = model.config.text.context_length
        mesh = _mesh()
        n = mesh.devices.size
        self.batch_size = -(-batch_size // n) * n
        self.num_threads = num_threads or min(8, (os.cpu_count() or 1) + 1)
        graphdef, state = nnx.split(model)
        self._graphdef, self._replicated = graphdef, NamedSharding(mesh, P())
        self._state = jax.device_put(state, self._replicated)
        batch = NamedSharding(mesh, P("data"))
        self._batch_sharding = batch

        def images_fn(state: Any, images: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).encode_image(normalize_images(images), normalize=True)

        def texts_fn(state: Any, tokens: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).encode_text(tokens, normalize=True)

        self._images_fn = jax.jit(images_fn, in_shardings=(None, batch), out_shardings=batch)
        self._texts_fn = jax.jit(texts_fn, in_shardings=(None, batch), out_shardings=batch)
        self.logit_scale = float(min(np.exp(np.asarray(state["logit_scale"][...])), MAX_LOGIT_SCALE))

    def set_model(self, model: CLIP) -> None:
        """Swaps in new weights of the same architecture without recompiling (e.g. during training)."""
        graphdef, state = nnx.split(model)
        if graphdef != self._graphdef:
            raise ValueError("set_model needs a model of the same architecture and options")
        if jax.process_count() > 1:
            # Training shards parameters over every host; each host embeds with a full local copy.
            from jax.experimental import multihost_utils

            state = multihost_utils.process_allgather(state, tiled=True)
        self._state = jax.device_put(state, self._replicated)
        self.logit_scale = float(min(np.exp(np.asarray(self._state["logit_scale"][...])), MAX_LOGIT_SCALE))

    def _run(self, fn: Any, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n < self.batch_size:  # pad so every call has the compiled shape
            pad = np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        out = fn(self._state, jax.device_put(batch, self._batch_sharding))
        return np.asarray(out)[:n]

    def embed_texts(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        """(M, D) float32 L2-normalised text embeddings, in input order."""
        tokens = get_tokenizer()(list(texts), context_length=self.context_length)
        out = [np.zeros((0, self.model.config.embed_dim), np.float32)]
        bar = tqdm(total=len(texts), desc="texts", unit="txt", file=sys.stderr, disable=not _show(progress, len(texts), self.batch_size))
        for i in range(0, len(tokens), self.batch_size):
            out.append(self._run(self._texts_fn, tokens[i : i + self.batch_size]))
            bar.update(len(out[-1]))
        bar.close()
        return np.concatenate(out)

    def _decoded(self, paths: Sequence[str], skip_bad: bool) -> Iterator[tuple[str, np.ndarray | None]]:
        with ThreadPoolExecutor(self.num_threads) as pool:
            def load(p: str) -> np.ndarray | None:
                try:
                    return load_and_preprocess(p, self.image_size)
                except ImageReadError as e:
                    if not skip_bad:
                        raise
                    warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
                    return None

            yield from zip(paths, pool.map(load, paths))

    def embed_images(
        self, paths: Sequence[str], skip_bad: bool = False, progress: bool = True
    ) -> tuple[np.ndarray, list[str], list[str]]:
        """Embeds image files.

        Returns:
            (embeddings (N, D) float32 L2-normalised, the N embedded paths in input order,
            the skipped paths). Without `skip_bad`, an unreadable image raises ImageReadError.
        """
        kept, skipped, out, batch = [], [], [], []
        bar = tqdm(total=len(paths), desc="images", unit="img", file=sys.stderr, disable=not _show(progress, len(paths), self.batch_size))
        for path, pixels in self._decoded(paths, skip_bad):
            bar.update(1)
            if pixels is None:
                skipped.append(path)
                continue
            kept.append(path)
            batch.append(pixels)
            if len(batch) == self.batch_size:
                out.append(self._run(self._images_fn, np.stack(batch)))
                batch = []
        if batch:
            out.append(self._run(self._images_fn, np.stack(batch)))
        bar.close()
        emb = np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim), np.float32)
        return emb, kept, skipped

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """Zero-shot class embeddings (C, D): the renormalised mean of each class's prompt embeddings."""
        prompts = [t.format(c) for c in classnames for t in templates]
        emb = self.embed_texts(prompts, progress=False).reshape(len(classnames), len(templates), -1)
        mean = emb.mean(axis=1)
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def _show(progress: bool, total: int, batch_size: int) -> bool:
    """A progress bar only for inputs longer than one batch."""
    return progress and total > batch_size


def softmax_probs(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))

