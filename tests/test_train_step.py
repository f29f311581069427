"""The sharded train step: equal to one device, exact gradient accumulation, freezing, NaN guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsclip_jax.models import create_model
from rsclip_jax.tokenizer import tokenize
from rsclip_jax.train.optim import decays, learning_rate_schedule, make_optimizer
from rsclip_jax.train.sharding import make_mesh, partition_spec, state_shardings
from rsclip_jax.train.step import MAX_LOG_LOGIT_SCALE, init_train_state, jit_train_step, make_train_step

B = 16


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"images": rng.integers(0, 256, (B, 64, 64, 3), dtype=np.uint8),
         "tokens": tokenize([f"{rng.integers(100)} trees and {j} buildings at the edge" for j in range(B)])}
        for _ in range(n)
    ]


def _train(mesh_shape, *, devices=None, accum=1, freeze=(), steps=3, lr=1e-3, batches=None, model="tiny-ViT"):
    mesh = make_mesh(mesh_shape, devices=devices)
    schedule = learning_rate_schedule(lr, 10, 1)
    tx = make_optimizer(schedule, freeze=freeze)
    graphdef, abstract = nnx.eval_shape(lambda: init_train_state(create_model(model, seed=0), tx))
    shardings = state_shardings(abstract, mesh, fsdp_min_size=1024)
    state = jax.jit(lambda: init_train_state(create_model(model, seed=0), tx)[1], out_shardings=shardings)()
    step = jit_train_step(make_train_step(graphdef, tx, schedule, mesh, grad_accum_steps=accum), shardings, mesh)
    losses, metrics = [], None
    # one batch repeated: the loss must then fall, so the tests compare real learning updates
    for batch in batches if batches is not None else _batches(1) * steps:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, metrics


def _max_param_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


@pytest.fixture(scope="module")
def one_device():
    return _train((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_one_device(one_device, mesh_shape):
    losses, state, _ = _train(mesh_shape)
    np.testing.assert_allclose(losses, one_device[0], rtol=0, atol=1e-5)
    assert _max_param_diff(state, one_device[1]) < 1e-5
    assert losses[-1] < losses[0]  # it is learning, so the comparison covers real updates


def test_parameters_are_born_sharded():
    mesh = make_mesh((2, 2, 2))
    _, state, _ = _train((2, 2, 2), steps=1)
    qkv = state.params["transformer"]["qkv_kernel"][...]
    assert qkv.sharding.spec == partition_spec(qkv.shape, ("layers", "embed", None, "heads", "kv"), mesh,
                                               {"heads": "model"}, 1024)
    assert qkv.sharding.spec[3] == "model" and "fsdp" in qkv.sharding.spec
    assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.size == qkv.size // 4


def test_gradient_accumulation_equals_full_batch(one_device):
    losses, state, _ = _train((1, 1, 1), devices=jax.devices()[:1], accum=4)
    np.testing.assert_allclose(losses, one_device[0], rtol=0, atol=1e-5)
    assert _max_param_diff(state, one_device[1]) < 1e-5


def test_frozen_tower_is_untouched():
    _, start, _ = _train((8, 1, 1), steps=0, batches=[])
    _, state, _ = _train((8, 1, 1), freeze=("visual",))
    for a, b in zip(jax.tree.leaves(start.params["visual"]), jax.tree.leaves(state.params["visual"])):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.params["transformer"]),
                                                          jax.tree.leaves(state.params["transformer"]))]
    assert any(changed)


def test_nonfinite_loss_leaves_state_untouched():
    batches = _batches(2)
    _, before, _ = _train((8, 1, 1), batches=batches[:1])
    # Poison one LayerNorm with NaN: the loss becomes NaN, and the step must not apply the update.
    mesh = make_mesh((8, 1, 1))
    schedule = learning_rate_schedule(1e-3, 10, 1)
    tx = make_optimizer(schedule)
    graphdef, abstract = nnx.eval_shape(lambda: init_train_state(create_model("tiny-ViT", seed=0), tx))
    shardings = state_shardings(abstract, mesh)
    step = jit_train_step(make_train_step(graphdef, tx, schedule, mesh), shardings, mesh)
    poisoned = before.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, x: x * jnp.nan if "ln_final" in jax.tree_util.keystr(p) else x, before.params))
    expected = jax.tree.map(np.asarray, poisoned)
    after, metrics = step(poisoned, batches[1])
    assert bool(metrics["nonfinite"])
    for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(a, b)  # NaN == NaN positionally: nothing was updated
    assert int(after.step) == int(expected.step) + 1


def test_logit_scale_is_clamped():
    # Step 1 has lr 0 (warmup); step 2 moves every parameter by about lr = 1e3, far past both bounds.
    _, state, metrics = _train((8, 1, 1), steps=2, lr=1e3)
    value = float(state.params["logit_scale"][...])
    assert value in (0.0, pytest.approx(MAX_LOG_LOGIT_SCALE)), value
    assert float(metrics["logit_scale"]) <= 100.0 + 1e-4


def test_weight_decay_mask():
    model = create_model("tiny-RN")
    params = nnx.state(model, nnx.Param)
    decayed = {jax.tree_util.keystr(p): decays(p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    assert decayed["['transformer']['fc_kernel'].value"] and decayed["['visual']['attnpool']['q_kernel'].value"]
    assert decayed["['visual']['conv1']['kernel'].value"]
    for name in ["['transformer']['fc_bias'].value", "['transformer']['qkv_bias'].value", "['token_embedding'].value",
                 "['positional_embedding'].value", "['visual']['attnpool']['q_bias'].value",
                 "['logit_scale'].value", "['ln_final']['scale'].value", "['visual']['bn1']['scale'].value"]:
        assert not decayed[name], name
