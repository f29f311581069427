"""Trimming the captions' padding (`data.trim_text_multiple`): the width rule, and that features
and gradients are those of the full 77-token step (docs/training.md, "Caption padding")."""

from __future__ import annotations

import csv
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SAMPLES, contrastive_loss_and_grads

from rsclip_jax.data import shards
from rsclip_jax.data.pipeline import trim_text_padding
from rsclip_jax.models import create_model
from rsclip_jax.tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, max_token_count, tokenize, trimmed_length
from rsclip_jax.train.config import load_config
from rsclip_jax.train.setup import fixed_caption_width

CAPTIONS = SAMPLES / "train" / "captions.csv"


def _titles(csv_path) -> list[str]:
    with open(csv_path, encoding="utf-8") as f:
        return [row["title"] for row in csv.DictReader(f)]


def _demo_tokens(n: int | None = None) -> np.ndarray:
    return tokenize(_titles(CAPTIONS)[:n])


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


def test_build_manifest_records_the_longest_caption(train_shards, tmp_path):
    manifest = json.loads((train_shards / "manifest.json").read_text())
    rows = tokenize(_titles(train_shards.parent / "train.csv"))
    longest = max(int(np.flatnonzero(row == EOT_TOKEN_ID)[0]) + 1 for row in rows)
    assert manifest["max_caption_tokens"] == longest and max_token_count(["a field " * 60]) == CONTEXT_LENGTH
    assert [s["max_caption_tokens"] for s in manifest["shards"]] == [longest] * len(manifest["shards"])
    assert shards.max_caption_tokens([train_shards, train_shards]) == longest
    # shards built before the field existed: no width can be promised
    old = tmp_path / "old"
    shutil.copytree(train_shards, old)
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "max_caption_tokens"}))
    assert shards.max_caption_tokens(old) is None and shards.max_caption_tokens([train_shards, old]) is None


def test_multi_process_run_cuts_every_batch_to_the_manifests_width(train_shards, tmp_path, monkeypatch):
    config = load_config(str(REPO / "configs" / "demo.py"), [f"--config.data.train={train_shards}"])
    longest = shards.max_caption_tokens(train_shards)
    assert fixed_caption_width(config, CONTEXT_LENGTH) == (None, None)  # one process trims batch by batch
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    width = -(-longest // 8) * 8
    assert fixed_caption_width(config, CONTEXT_LENGTH) == (width, longest) and width < CONTEXT_LENGTH
    batch = {"images": np.zeros((3, 4, 4, 3), np.uint8), "tokens": tokenize(["a forest", "two ships in a harbour", "x"])}
    assert trim_text_padding(batch, 8) is batch  # no width agreed: a process cannot trim on its own
    assert trim_text_padding(batch, 8, width)["tokens"].shape == (3, width)
    assert fixed_caption_width(config, 16) == (min(width, 16), longest)  # never wider than the model's context
    too_long = {**batch, "tokens": tokenize(["a field " * 20])}
    with pytest.raises(ValueError, match=r"takes \d+ tokens, more than the 8 .*max_caption_tokens"):
        trim_text_padding(too_long, 8, 8)
    config.data.trim_text_multiple = 0
    assert fixed_caption_width(config, CONTEXT_LENGTH) == (None, None)
