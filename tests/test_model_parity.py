"""Numerical parity of our towers with open_clip_torch on real images and varied texts.

Each model gets fully random weights (see openclip_reference.randomize_), is exported from torch
as a state_dict, imported here without torch, and both frameworks embed the same inputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from openclip_reference import build, state_dict_numpy
from rsclip_jax.checkpoint import model_from_state_dict
from rsclip_jax.models import get_model_config
from rsclip_jax.tokenizer import tokenize

TEXTS = [
    "Many small-vehicles in the middle of the picture .",
    "4 large vehicles, a small vehicle and 5 planes at the edge of the picture .",
    "Café &amp; Straße: ¿dónde está el aeropuerto? 机场 ✈️",
    "&lt;b&gt;Harbour&lt;/b&gt; with   ships\tand\ncranes",
    "a remote sensing image of " + "dense residential buildings and narrow roads " * 12,  # > 77 tokens
    "",
]
ATOL = 1e-5


def _encode_jax(model, images_nchw: np.ndarray, tokens: np.ndarray):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, images, tokens):
        m = nnx.merge(graphdef, state)
        return m.encode_image(images, normalize=True), m.encode_text(tokens, normalize=True), jnp.exp(m.logit_scale[...])

    img, txt, scale = f(state, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), jnp.asarray(tokens))
    return np.asarray(img), np.asarray(txt), float(scale)


def _check_parity(torch_model, our_model, rgb_tiles, preprocess_size: int):
    import open_clip

    preprocess = open_clip.image_transform(preprocess_size, is_train=False)
    from PIL import Image

    images = torch.stack([preprocess(Image.open(p)) for p in rgb_tiles[:3]])
    tokens = open_clip.tokenize(TEXTS)
    np.testing.assert_array_equal(tokenize(TEXTS), tokens.numpy())
    with torch.no_grad():
        t_img = torch_model.encode_image(images, normalize=True).numpy()
        t_txt = torch_model.encode_text(tokens, normalize=True).numpy()
        t_logits = torch_model.get_logits(images, tokens)[0].numpy()
    j_img, j_txt, scale = _encode_jax(our_model, images.numpy(), tokens.numpy().astype(np.int32))
    np.testing.assert_allclose(j_img, t_img, rtol=0, atol=ATOL)
    np.testing.assert_allclose(j_txt, t_txt, rtol=0, atol=ATOL)
    np.testing.assert_allclose(scale * j_img @ j_txt.T, t_logits, rtol=0, atol=ATOL)
    return j_img, j_txt


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "ViT-B-32-quickgelu"])
def test_full_size_parity(name, rgb_tiles):
    torch_model = build(name, seed=1)
    ours = model_from_state_dict(state_dict_numpy(torch_model), name)
    _check_parity(torch_model, ours, rgb_tiles, ours.config.vision.image_size)


def test_vit_l14_reduced_depth_parity(rgb_tiles):
    """ViT-L/14 widths, patch and heads at 2+2 layers (the full depth is the slow test below)."""
    base = get_model_config("ViT-L-14")
    cfg = dataclasses.replace(
        base, vision=dataclasses.replace(base.vision, layers=2), text=dataclasses.replace(base.text, layers=2)
    )
    torch_model = build(cfg, seed=2)
    ours = model_from_state_dict(state_dict_numpy(torch_model), cfg, scan_layers=False)
    _check_parity(torch_model, ours, rgb_tiles, 224)


@pytest.mark.slow
def test_vit_l14_full_parity(rgb_tiles):
    torch_model = build("ViT-L-14", seed=3)
    ours = model_from_state_dict(state_dict_numpy(torch_model), "ViT-L-14")
    _check_parity(torch_model, ours, rgb_tiles, 224)


def test_inferred_architecture_and_quickgelu(rgb_tiles):
    """Without a name, a RemoteCLIP-shaped checkpoint is read as QuickGELU (as its weights need)."""
    torch_model = build("ViT-B-32-quickgelu", seed=4)
    ours = model_from_state_dict(state_dict_numpy(torch_model))
    assert ours.config == get_model_config("RemoteCLIP-ViT-B-32")
    _check_parity(torch_model, ours, rgb_tiles, 224)


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_bfloat16_close_to_float32(name, rgb_tiles):
    torch_model = build(name, seed=5)
    sd = state_dict_numpy(torch_model)
    images = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    tokens = tokenize(TEXTS)
    f32 = _encode_jax(model_from_state_dict(sd, name), images, tokens)
    bf16 = _encode_jax(model_from_state_dict(sd, name, dtype="bfloat16"), images, tokens)
    for a, b in zip(f32[:2], bf16[:2]):
        assert b.dtype == np.float32  # outputs and parameters stay float32
        cos = np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() >= 0.999, cos
        assert not np.allclose(a, b, atol=1e-6)  # bf16 really ran


def test_scan_unrolled_and_remat_agree():
    from rsclip_jax.models import create_model

    images = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    tokens = tokenize(TEXTS[:2])
    outs = [
        _encode_jax(create_model("tiny-ViT", seed=7, scan_layers=scan, remat_policy=remat), images, tokens)
        for scan, remat in [(True, "none"), (False, "none"), (True, "dots_saveable"), (False, "full")]
    ]
    for other in outs[1:]:
        np.testing.assert_allclose(other[0], outs[0][0], atol=1e-6)
        np.testing.assert_allclose(other[1], outs[0][1], atol=1e-6)
