"""The kernel options against their reference paths, forward and gradients, tolerance per dtype.

* the bfloat16 matmul whose backward also multiplies in bfloat16 (`layers.mm`), against autodiff
  of the same product and against float32;
* `model.attention`: `auto` resolves to XLA on CPU (and equals it); `cudnn` is compared with XLA
  where a GPU exists and refused clearly where none does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import contrastive_loss_and_grads

from rsclip_jax.models import create_model
from rsclip_jax.models.layers import mm, resolve_attention

SPECS = [("btd,dshk->sbthk", (2, 5, 8), (8, 3, 2, 4)), ("bthk,hkd->btd", (2, 5, 2, 4), (2, 4, 8)),
         ("bd,de->be", (3, 8), (8, 6))]


@pytest.mark.parametrize("spec, x_shape, w_shape", SPECS)
def test_bf16_matmul_backward_matches_autodiff(spec, x_shape, w_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    out_shape = jnp.einsum(spec, x, w).shape
    g = jax.random.normal(kg, out_shape)

    def plain(x, w):  # autodiff of the same bf16-input, f32-accumulated product
        return jnp.einsum(spec, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

    ours, vjp = jax.vjp(lambda x, w: mm(x, w, jnp.bfloat16, spec), x, w)
    ref, ref_vjp = jax.vjp(plain, x, w)
    np.testing.assert_array_equal(ours, ref)  # the forward is the same product
    f32_grads = jax.vjp(lambda x, w: mm(x, w, jnp.float32, spec), x, w)[1](g)
    for a, b, exact in zip(vjp(g), ref_vjp(g), f32_grads):
        assert a.dtype == jnp.float32 and a.shape == b.shape
        # bf16 rounds the cotangent too: within bf16's precision of both references
        np.testing.assert_allclose(a, b, rtol=0, atol=0.02 * float(jnp.abs(b).max()))
        np.testing.assert_allclose(a, exact, rtol=0, atol=0.02 * float(jnp.abs(exact).max()))


def _batch(size=64, n=4):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((n, size, size, 3)), jnp.float32)
    tokens = np.zeros((n, 77), np.int32)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, rng.integers(1, 49000, (n, 5)), 49407
    return images, jnp.asarray(tokens)


def test_bf16_model_gradients_follow_float32():
    images, tokens = _batch()
    loss32, g32 = contrastive_loss_and_grads(create_model("tiny-ViT", seed=1), images, tokens)
    loss16, g16 = contrastive_loss_and_grads(create_model("tiny-ViT", seed=1, dtype="bfloat16"), images, tokens)
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)
    for (path, a), b in zip(jax.tree.leaves_with_path(g16), jax.tree.leaves(g32)):
        a, b = np.ravel(a), np.ravel(b)
        if np.linalg.norm(b) < 1e-6:
            continue
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.98, (jax.tree_util.keystr(path), cosine)


def test_attention_auto_is_xla_on_cpu_and_equal():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU auto may pick cuDNN; see the GPU comparison below")
    assert resolve_attention("auto", jnp.bfloat16) == "xla"
    assert resolve_attention("auto", jnp.float32) == "xla"
    images, tokens = _batch()
    auto = create_model("tiny-ViT", seed=2, attention="auto")
    xla = create_model("tiny-ViT", seed=2, attention="xla")
    for a, b in zip(contrastive_loss_and_grads(auto, images, tokens), contrastive_loss_and_grads(xla, images, tokens)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_attention_choices_are_checked():
    with pytest.raises(ValueError, match="choose from xla, cudnn, auto"):
        resolve_attention("flash", jnp.bfloat16)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            create_model("tiny-ViT", attention="cudnn", dtype="bfloat16")
    from rsclip_jax.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.attention must be one of"):
        load_config("configs/demo.py", ["--config.model.attention=flash"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_attention_matches_xla_on_gpu():
    with pytest.raises(ValueError, match="needs model.dtype='bfloat16'"):
        create_model("tiny-ViT", attention="cudnn")
    images, tokens = _batch()
    cudnn = create_model("tiny-ViT", seed=3, dtype="bfloat16", attention="cudnn")
    xla = create_model("tiny-ViT", seed=3, dtype="bfloat16", attention="xla")
    (l1, g1), (l2, g2) = contrastive_loss_and_grads(cudnn, images, tokens), contrastive_loss_and_grads(xla, images, tokens)
    assert float(l1) == pytest.approx(float(l2), rel=1e-2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=0, atol=0.03 * float(np.abs(b).max()) + 1e-6)
