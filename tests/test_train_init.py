"""Initialisation from OpenCLIP weights and from our own workdirs; checkpoint retention policy."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from conftest import REPO
from rsclip_jax.checkpoint import export_state_dict, load_checkpoint, save_checkpoint
from rsclip_jax.models import create_model
from rsclip_jax.train.checkpointing import Checkpointer
from rsclip_jax.train.config import load_config
from rsclip_jax.train.setup import build_run, initial_state


def _config(*overrides):
    return load_config(str(REPO / "configs/demo.py"), ["--config.batch_size=8", *overrides])


def test_init_from_openclip_file_and_from_workdir(tmp_path):
    source = create_model("tiny-ViT", seed=123)
    save_checkpoint(source, tmp_path / "weights.safetensors")
    run = build_run(_config(f"--config.model.init_from={tmp_path / 'weights.safetensors'}"))
    state = initial_state(run)
    model = nnx.merge(run.graphdef, state.params, state.rest)
    want = export_state_dict(source)
    for key, value in export_state_dict(model).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    assert int(state.step) == 0

    # Our own workdir: its params, a fresh optimiser and step 0.
    ckpt = Checkpointer(str(tmp_path / "run"), use_async=False)
    trained = state.replace(step=state.step + 7)
    ckpt.save(7, trained, _FakeIterator(), run.config.to_dict(), run.model_config)
    ckpt.close()
    # ... even under another optimiser (LiT: a frozen image tower has no Adam state at all).
    again = initial_state(build_run(_config(f"--config.model.init_from={tmp_path / 'run'}",
                                            "--config.optim.freeze=visual", "--config.optim.grad_clip_norm=0")))
    assert int(again.step) == 0
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    # and the workdir loads as a model for embed/classify/convert
    assert load_checkpoint(tmp_path / "run").config == run.model_config


class _FakeIterator:
    def get_state(self):
        return {"next_index": 0}


def test_keeps_last_k_and_best(tmp_path):
    run = build_run(_config())
    state = initial_state(run)
    ckpt = Checkpointer(str(tmp_path), keep=2, best_metric="retrieval/mean_recall", best_mode="max", use_async=False)
    recalls = {1: 10.0, 2: 50.0, 3: 20.0, 4: 30.0, 5: 25.0}
    for step, recall in recalls.items():
        ckpt.save(step, state, _FakeIterator(), {}, run.model_config, {"retrieval/mean_recall": recall})
    ckpt.wait()
    kept = sorted(ckpt.manager.all_steps())
    ckpt.close()
    assert kept == [2, 4, 5]  # the last two, plus the best (step 2)


def test_siglip_starts_from_clip_weights(tmp_path):
    """OpenCLIP files have no logit_bias: SigLIP training keeps its initial -10 and loads the rest."""
    source = create_model("tiny-ViT", seed=5)
    save_checkpoint(source, tmp_path / "clip.safetensors")
    run = build_run(_config("--config.loss.name=siglip", f"--config.model.init_from={tmp_path / 'clip.safetensors'}"))
    state = initial_state(run)
    assert float(state.params["logit_bias"][...]) == -10.0
    want = export_state_dict(source)
    got = export_state_dict(nnx.merge(run.graphdef, state.params, state.rest))
    np.testing.assert_array_equal(got["visual.proj"], want["visual.proj"])
