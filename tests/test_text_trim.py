"""Trimming the captions' padding (`data.trim_text_multiple`): the width rule, and that features
and gradients are those of the full 77-token step (docs/training.md, "Caption padding")."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SAMPLES, contrastive_loss_and_grads

from rsclip_jax.data.pipeline import trim_text_padding
from rsclip_jax.models import create_model
from rsclip_jax.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, tokenize, trimmed_length

CAPTIONS = SAMPLES / "train" / "captions.csv"


def _demo_tokens(n: int | None = None) -> np.ndarray:
    with open(CAPTIONS, encoding="utf-8") as f:
        titles = [row["title"] for row in csv.DictReader(f)]
    return tokenize(titles[:n])


def test_width_keeps_every_caption_token_rounded_up():
    tokens = _demo_tokens()
    last = max(int(np.flatnonzero(row == EOT_TOKEN_ID)[0]) for row in tokens) + 1  # EOT ends each caption
    assert trimmed_length(tokens, 1) == last
    assert trimmed_length(tokens, 8) == -(-last // 8) * 8 < CONTEXT_LENGTH
    assert trimmed_length(tokens, 100) == CONTEXT_LENGTH  # never wider than the rows
    # a caption long enough to be truncated keeps the full width
    assert trimmed_length(tokenize(["a field " * 60]), 8) == CONTEXT_LENGTH


def test_width_rejects_bad_input():
    with pytest.raises(ValueError, match=r"tokens must be \(N, T\)"):
        trimmed_length(np.zeros(77, np.int32))
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        trimmed_length(_demo_tokens(4), 0)


def test_trim_text_padding_cuts_tokens_only():
    tokens = _demo_tokens(8)
    images = np.zeros((8, 4, 4, 3), np.uint8)
    out = trim_text_padding({"images": images, "tokens": tokens}, 8)
    width = trimmed_length(tokens, 8)
    assert out["images"] is images and out["tokens"].shape == (8, width)
    np.testing.assert_array_equal(out["tokens"], tokens[:, :width])
    assert not tokens[:, width:].any()  # only padding was dropped
    full = {"tokens": tokenize(["a field " * 60])}
    assert trim_text_padding(full, 8) is full


def test_trimmed_features_and_gradients_equal_the_full_width():
    model = create_model("tiny-ViT", seed=4)
    tokens = _demo_tokens(6)
    trimmed = tokens[:, :trimmed_length(tokens, 8)]
    assert trimmed.shape[1] < CONTEXT_LENGTH
    full_text = model.encode_text(jnp.asarray(tokens))
    np.testing.assert_allclose(model.encode_text(jnp.asarray(trimmed)), full_text, rtol=1e-5, atol=1e-6)
    # cutting inside a caption does change its features: the check above can fail
    cut = model.encode_text(jnp.asarray(tokens[:, :2]))
    assert not np.allclose(cut, full_text, atol=1e-3)

    images = jnp.asarray(np.random.default_rng(0).standard_normal((6, 64, 64, 3)), jnp.float32)
    loss_full, grads_full = contrastive_loss_and_grads(model, images, jnp.asarray(tokens), jit=True)
    loss_trim, grads_trim = contrastive_loss_and_grads(model, images, jnp.asarray(trimmed), jit=True)
    assert float(loss_trim) == pytest.approx(float(loss_full), rel=1e-6)
    flat_full, flat_trim = jax.tree.leaves(grads_full), jax.tree.leaves(grads_trim)
    assert len(flat_full) == len(flat_trim)
    for a, b in zip(flat_trim, flat_full):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_encode_text_rejects_tokens_wider_than_the_context():
    model = create_model("tiny-ViT", seed=0)
    with pytest.raises(ValueError, match=r"0 < T <= 77"):
        model.encode_text(jnp.zeros((2, 78), jnp.int32))
