"""Model FLOPs (rsclip_jax.models.flops) against XLA's own count, and the MFU the loop logs.

XLA's `cost_analysis()` counts a `lax.scan` body once, whatever its trip count, so the check uses
the unrolled model (`scan_layers=False`). Only lowering is needed, no compile, so full-size
architectures are cheap. XLA also counts elementwise work (LayerNorm, softmax, activations), which
the model FLOPs leave out by convention, and counts a padded convolution's border taps as the
work they are (fewer), so the two agree to a few percent, not exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from rsclip_jax.models import create_model, get_model_config
from rsclip_jax.models.flops import forward_flops_per_pair, train_step_flops


def _lowered_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def _abstract(name: str, scan: bool):
    config = get_model_config(name)
    graphdef, params, rest = nnx.split(create_model(config, scan_layers=scan, abstract=True), nnx.Param, ...)
    return config, graphdef, params, rest


def _inputs(config, batch: int):
    size = config.vision.image_size
    return (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, config.text.context_length), jnp.int32))


@pytest.mark.parametrize("name, tolerance", [("ViT-B-32", 0.03), ("ViT-L-14", 0.03), ("RN50", 0.05)])
def test_forward_flops_per_tower_match_xla(name, tolerance):
    config, graphdef, params, rest = _abstract(name, scan=False)
    images, tokens = _inputs(config, 2)
    xla_image = _lowered_flops(lambda p, r, x: nnx.merge(graphdef, p, r).encode_image(x), params, rest, images) / 2
    xla_text = _lowered_flops(lambda p, r, t: nnx.merge(graphdef, p, r).encode_text(t), params, rest, tokens) / 2
    image, text = forward_flops_per_pair(config)
    assert image == pytest.approx(xla_image, rel=tolerance)
    assert text == pytest.approx(xla_text, rel=tolerance)


def _contrastive_grad_flops(name: str, scan: bool, batch: int) -> tuple[float, float]:
    config, graphdef, params, rest = _abstract(name, scan)

    def loss(p, r, images, tokens):
        img, txt, scale = nnx.merge(graphdef, p, r)(images, tokens)
        return -jnp.mean(jax.nn.log_softmax(scale * img @ txt.T))

    return _lowered_flops(jax.grad(loss), params, rest, *_inputs(config, batch)), train_step_flops(config, batch).total


def test_train_step_flops_are_three_forwards_as_xla_counts_them():
    xla, ours = _contrastive_grad_flops("ViT-B-32", scan=False, batch=8)
    assert ours == pytest.approx(xla, rel=0.03)


def test_scanned_model_hides_the_layers_from_xla():
    """Why the count is analytic: with scan, XLA sees one layer of twelve."""
    xla, ours = _contrastive_grad_flops("ViT-B-32", scan=True, batch=8)
    assert xla < ours / 5


def test_flops_scale_with_batch_and_split_by_tower():
    config = get_model_config("ViT-B-32")
    one, two = train_step_flops(config, 16), train_step_flops(config, 32)
    assert two.image_tower == 2 * one.image_tower and two.text_tower == 2 * one.text_tower
    assert two.loss == 4 * one.loss  # the (B, B) logits
    assert one.total == one.image_tower + one.text_tower + one.loss
    # ViT-B/32: ~4.4 GFLOPs per image forward, as commonly quoted (50 tokens of width 768, 12 layers)
    assert forward_flops_per_pair(config)[0] == pytest.approx(8.8e9, rel=0.02)


def test_mfu_is_logged_with_a_configured_peak(tmp_path):
    from rsclip_jax.train.config import load_config
    from rsclip_jax.train.loop import read_metrics, train

    config = load_config("configs/demo.py", ["--config.total_steps=2", "--config.log_every_steps=1",
                                             f"--config.data.train={tmp_path / 'data'}",
                                             "--config.peak_tflops_per_device=0.5"])
    train(config, str(tmp_path / "run"))
    record = read_metrics(str(tmp_path / "run"))[-1]
    # the demo's captions are trimmed (data.trim_text_multiple): the step counts the width it ran at
    assert record["text_tokens"] < get_model_config(config.model.name).text.context_length
    flops = train_step_flops(get_model_config(config.model.name), config.batch_size,
                             int(record["text_tokens"])).total / jax.device_count()
    achieved = record["tflops_per_device"] * 1e12
    assert record["mfu"] == pytest.approx(achieved / 0.5e12, rel=1e-6)
    assert achieved == pytest.approx(flops * record["samples_per_sec"] / config.batch_size, rel=1e-6)


def test_input_wait_fraction_shows_when_the_step_waits_on_its_batches(tmp_path, monkeypatch):
    """The share of wall time the loop spends getting batches ready: a few ms per step for the demo's
    pipeline, all of a 0.5 s delay in placing each batch on the devices (a slow host)."""
    import time

    from rsclip_jax.train import loop
    from rsclip_jax.train.config import load_config

    def input_seconds_per_step(name: str) -> float:
        config = load_config("configs/demo.py", ["--config.total_steps=6", "--config.log_every_steps=3",
                                                 f"--config.data.train={tmp_path / 'data'}", "--config.evals={}"])
        loop.train(config, str(tmp_path / name))
        records = loop.read_metrics(str(tmp_path / name))
        assert all(0.0 <= r["input_wait_fraction"] <= 1.0 for r in records)
        last = records[-1]  # compiled: its three steps ran back to back
        return last["input_wait_fraction"] * config.batch_size / last["samples_per_sec"]

    fast = input_seconds_per_step("fast")
    real = loop.to_global_batch
    monkeypatch.setattr(loop, "to_global_batch", lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1])
    slow = input_seconds_per_step("slow")
    assert 0.49 <= slow < 0.5 + 0.25 and fast < 0.25, (fast, slow)
