"""Each distributed loss against its naive single-device version: loss and gradients to 1e-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rsclip_jax.losses import clip_loss, naive_clip_loss, naive_siglip_loss, siglip_loss

B, D = 64, 32


def _mesh(shape, names):
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _embeddings(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, B, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _compare(distributed, naive, args, argnums):
    want_loss, want_grads = jax.value_and_grad(naive, argnums=argnums)(*args)
    loss, grads = jax.jit(jax.value_and_grad(distributed, argnums=argnums))(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    return float(loss)


MESHES = [((8,), ("data",)), ((2, 4), ("data", "fsdp")), ((2, 2, 2), ("data", "fsdp", "model"))]


@pytest.mark.parametrize("shape,names", MESHES)
@pytest.mark.parametrize("chunk_size", [None, 16, 64])
def test_clip_loss_matches_naive(shape, names, chunk_size):
    mesh = _mesh(shape, names)
    axes = tuple(n for n in names if n != "model")
    img, txt = (jax.device_put(a, NamedSharding(mesh, P(axes))) for a in _embeddings(0))
    scale = jnp.float32(14.3)
    fn = lambda a, b, s: clip_loss(a, b, s, mesh=mesh, batch_axes=axes, chunk_size=chunk_size)  # noqa: E731
    loss = _compare(fn, naive_clip_loss, (img, txt, scale), (0, 1, 2))
    assert loss > 1.0  # random embeddings: far from solved, so the comparison is meaningful


@pytest.mark.parametrize("shape,names", MESHES)
def test_siglip_loss_matches_naive(shape, names):
    mesh = _mesh(shape, names)
    axes = tuple(n for n in names if n != "model")
    img, txt = (jax.device_put(a, NamedSharding(mesh, P(axes))) for a in _embeddings(1))
    fn = lambda a, b, s, c: siglip_loss(a, b, s, c, mesh=mesh, batch_axes=axes)  # noqa: E731
    _compare(fn, naive_siglip_loss, (img, txt, jnp.float32(10.0), jnp.float32(-10.0)), (0, 1, 2, 3))


def test_losses_see_every_negative():
    """Swapping two texts held on different devices must change the loss (negatives are global)."""
    mesh = _mesh((8,), ("data",))
    img, txt = _embeddings(2)
    txt_swapped = txt.copy()
    txt_swapped[[0, B - 1]] = txt[[B - 1, 0]]
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    a = clip_loss(put(img), put(txt), jnp.float32(10.0), mesh=mesh, batch_axes=("data",))
    b = clip_loss(put(img), put(txt_swapped), jnp.float32(10.0), mesh=mesh, batch_axes=("data",))
    np.testing.assert_allclose(b, naive_clip_loss(img, txt_swapped, 10.0), atol=1e-5)
    assert abs(float(a) - float(b)) > 1e-3


def test_chunk_size_must_divide_batch():
    mesh = _mesh((8,), ("data",))
    img, txt = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in _embeddings(3))
    with pytest.raises(ValueError, match="chunk_size 24 must divide the global batch 64"):
        clip_loss(img, txt, jnp.float32(1.0), mesh=mesh, batch_axes=("data",), chunk_size=24)
