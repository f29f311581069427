"""Evaluations during training go through the evaluator registry, on the training mesh."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from flax import nnx

from conftest import REPO, SAMPLES
from rsclip_jax.checkpoint import load_checkpoint
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.train.config import ConfigError, load_config
from rsclip_jax.train.loop import read_metrics, train
from rsclip_jax.train.setup import build_run, initial_state

SCENES = str(SAMPLES / "scenes")
RETRIEVAL_JSON = str(SAMPLES / "retrieval" / "dataset_samples.json")


def _fsdp_run(*overrides):
    """tiny-ViT on an 8-way FSDP mesh with every parameter large enough sharded."""
    return build_run(load_config(str(REPO / "configs/demo.py"), [
        "--config.batch_size=8", "--config.mesh.shape=(1, 8, 1)", "--config.mesh.fsdp_min_size=64", *overrides]))


def test_eval_keeps_training_shardings_and_matches_a_replicated_model():
    run = _fsdp_run()
    state = initial_state(run)
    model = nnx.merge(run.graphdef, state.params, state.rest)
    extractor = Extractor(model, batch_size=8, mesh=run.mesh, progress=False)
    sharded = [x for x in jax.tree.leaves(extractor._state) if x.ndim and not x.sharding.is_fully_replicated]
    assert sharded, "the FSDP layout was replaced by full copies"
    for x in jax.tree.leaves(extractor._state):
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == run.mesh
    # and it computes what the same weights give fully replicated on the default mesh
    host = jax.device_get(nnx.state(model))
    plain = nnx.merge(nnx.graphdef(model), host)
    texts = ["Many trees in the middle .", "a road next to buildings"]
    images = sorted(str(p) for p in (SAMPLES / "scenes").rglob("*.jpg"))[:8]
    ours, ref = extractor, Extractor(plain, batch_size=8, progress=False)
    np.testing.assert_allclose(ours.texts(texts), ref.texts(texts), atol=2e-6)
    np.testing.assert_allclose(ours.images(images).embeddings, ref.images(images).embeddings, atol=2e-6)


def test_named_evals_run_any_task_at_their_cadence_and_pick_the_best(train_shards, tmp_path):
    config = load_config(str(REPO / "configs/demo.py"), [
        f"--config.data.train={train_shards}", "--config.batch_size=8", "--config.total_steps=4",
        "--config.checkpoint_every_steps=2", "--config.log_every_steps=2", "--config.eval_every_steps=2",
        "--config.eval_batch_size=16", "--config.mesh.shape=(1, 8, 1)", "--config.mesh.fsdp_min_size=64",
        f"--config.evals.retrieval.karpathy_json={RETRIEVAL_JSON}", "--config.evals.retrieval.every_steps=4",
        "--config.evals.scenes.task=knn", f"--config.evals.scenes.root={SCENES}", "--config.evals.scenes.k=5",
        "--config.best_metric=scenes/top1", "--config.keep_checkpoints=1"])
    summary = train(config, str(tmp_path))
    records = read_metrics(str(tmp_path), "eval")
    assert [r["step"] for r in records] == [2, 4]
    assert "scenes/top1" in records[0] and "retrieval/mean_recall" not in records[0]  # every_steps=4
    assert {"scenes/top1", "retrieval/mean_recall", "retrieval/image_to_text_R@1"} <= set(records[1])
    assert summary["evals"] == {k: v for k, v in records[1].items() if k != "step"}
    best_step = 2 if records[0]["scenes/top1"] > records[1]["scenes/top1"] else 4
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert best_step in steps and 4 in steps  # the latest plus the best survive keep_checkpoints=1
    # metrics persist on disk, so --best knows the best after the run (and after a resume)
    saved = json.loads((tmp_path / "checkpoints" / str(best_step) / "metrics" / "metrics").read_text())
    assert saved["scenes/top1"] == max(r["scenes/top1"] for r in records)
    best = load_checkpoint(tmp_path, best=True)
    at_best = load_checkpoint(tmp_path, step=best_step)
    np.testing.assert_array_equal(np.asarray(best.logit_scale[...]), np.asarray(at_best.logit_scale[...]))


@pytest.mark.parametrize("override, message", [
    ("--config.evals.x.root=data", "config.evals.x has no 'task'"),
    ("--config.evals.retrieval.every_steps=-1", "every_steps must be an int >= 0"),
    ("--config.evals.retrieval.split=test2,", None),
    ("--config.best_metric=retrieval", "best_metric 'retrieval' .*<eval name>/<metric>"),
    ("--config.best_metric=retrieval/mean_recall", None),
])
def test_eval_config_errors_name_the_key(override, message):
    if message is None:  # accepted: a string option, and a best_metric naming a configured eval
        load_config(str(REPO / "configs/demo.py"), [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "configs/demo.py"), [override])
