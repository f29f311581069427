"""The architecture travels with the weights: files and workdirs load back as the model they hold.

Shapes cannot tell GELU from QuickGELU, so before this a GELU export reloaded as QuickGELU and gave
other embeddings. `tiny-ViT` is a GELU architecture, which is exactly the case that went wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from conftest import REPO, TILES
from openclip_reference import build
from rsclip_jax.checkpoint import CheckpointMismatchError, WorkdirError, load_checkpoint, save_checkpoint, sidecar_path
from rsclip_jax.checkpoint.torch_format import load_safetensors_metadata, save_state_dict
from rsclip_jax.cli import main
from rsclip_jax.models import create_model, get_model_config
from rsclip_jax.train.checkpointing import Checkpointer
from rsclip_jax.train.config import ConfigError, check_resume_compatible, load_config
from rsclip_jax.train.loop import train
from rsclip_jax.train.setup import build_run, initial_state
from rsclip_jax.tokenizer import tokenize

TEXTS = ["Many trees in the middle of the picture .", "a parking lot next to buildings"]


def _embed(checkpoint, out, *extra):
    images = sorted(str(p) for p in TILES.iterdir() if p.suffix in (".jpg", ".png"))[:3]
    texts = out.with_suffix(".txt")
    texts.write_text("\n".join(TEXTS), encoding="utf-8")
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", *images, "--texts", str(texts),
                 "--out", str(out), *extra]) == 0
    with np.load(out) as f:
        return f["image_embeddings"], f["text_embeddings"]


def _text_embedding(model):
    return np.asarray(model.encode_text(tokenize(TEXTS), normalize=True))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_written_files_reload_as_written_with_or_without_model(suffix, tmp_path, capsys):
    path = tmp_path / f"a{suffix}"
    assert main(["init", "--model", "tiny-ViT", "--out", str(path)]) == 0
    if suffix == ".safetensors":
        record = json.loads(load_safetensors_metadata(path)["rsclip_jax.model"])
    else:
        record = json.loads(sidecar_path(path).read_text())
    assert record["name"] == "tiny-ViT" and record["config"]["quick_gelu"] is False
    assert load_checkpoint(path).config == get_model_config("tiny-ViT")

    without = _embed(path, tmp_path / "without.npz")
    with_model = _embed(path, tmp_path / "with.npz", "--model", "tiny-ViT")
    for a, b in zip(without, with_model):
        np.testing.assert_array_equal(a, b)
    assert "warning" not in capsys.readouterr().err  # nothing had to be guessed


def test_pt_sidecar_keeps_open_clip_strict_loading(tmp_path):
    model = create_model("tiny-ViT", seed=3)
    save_checkpoint(model, tmp_path / "m.pt")
    assert sidecar_path(tmp_path / "m.pt").name == "m.pt.json"
    torch_model = build(model.config).eval()  # open_clip's own CLIP, GELU as recorded
    torch_model.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    with torch.no_grad():
        want = torch_model.encode_text(torch.from_numpy(tokenize(TEXTS).astype(np.int64)), normalize=True).numpy()
    np.testing.assert_allclose(_text_embedding(load_checkpoint(tmp_path / "m.pt")), want, atol=1e-5)


def test_without_a_record_the_activation_guess_is_named(tmp_path, capsys):
    model = create_model("tiny-ViT", seed=4)
    save_checkpoint(model, tmp_path / "m.pt")
    sidecar_path(tmp_path / "m.pt").unlink()  # as a file from another tool: weights only
    guessed = load_checkpoint(tmp_path / "m.pt")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QuickGELU" in err[0] and "--model" in err[0] and "m.pt" in err[0]
    assert guessed.config.quick_gelu
    # the guess matters: GELU weights read as QuickGELU embed differently
    settled = load_checkpoint(tmp_path / "m.pt", model=model.config)
    assert not np.allclose(_text_embedding(guessed), _text_embedding(settled), atol=1e-4)
    np.testing.assert_allclose(_text_embedding(settled), _text_embedding(model), atol=1e-6)


def test_stale_sidecar_is_ignored_and_explicit_model_wins(tmp_path, capsys):
    from rsclip_jax.checkpoint import export_state_dict
    from rsclip_jax.checkpoint.torch_format import save_torch_state_dict

    save_checkpoint(create_model("tiny-ViT", seed=1), tmp_path / "m.pt")
    # another tool overwrites the weights with a same-size file: QuickGELU weights, sidecar kept
    save_torch_state_dict(export_state_dict(create_model("tiny-ViT-quickgelu", seed=2)), tmp_path / "m.pt")
    assert sidecar_path(tmp_path / "m.pt").exists()
    assert load_checkpoint(tmp_path / "m.pt").config.quick_gelu  # fell back to the shapes
    assert "ignoring the sidecar" in capsys.readouterr().err
    # our own low-level writer drops the sidecar it invalidates
    save_checkpoint(create_model("tiny-ViT", seed=1), tmp_path / "n.pt")
    save_state_dict(export_state_dict(create_model("tiny-ViT", seed=2)), tmp_path / "n.pt")
    assert not sidecar_path(tmp_path / "n.pt").exists()

    # a damaged record stops a load only when no --model says what the weights are
    save_checkpoint(create_model("tiny-ViT", seed=1), tmp_path / "d.pt")
    sidecar_path(tmp_path / "d.pt").write_text("{not json")
    with pytest.raises(ValueError, match="d.pt.json: not a valid JSON sidecar"):
        load_checkpoint(tmp_path / "d.pt")
    assert load_checkpoint(tmp_path / "d.pt", model="tiny-ViT").config == get_model_config("tiny-ViT")
    assert "using --model as given" in capsys.readouterr().err

    save_checkpoint(create_model("tiny-ViT", seed=1), tmp_path / "g.safetensors")
    chosen = load_checkpoint(tmp_path / "g.safetensors", model="tiny-ViT-quickgelu")
    assert chosen.config.quick_gelu
    assert "records the architecture tiny-ViT (GELU); using tiny-ViT-quickgelu" in capsys.readouterr().err


class _NoData:
    def get_state(self):
        return {}


def _workdir(tmp_path, steps=(3, 6), metrics=None):
    """A GELU tiny-ViT workdir with a checkpoint per step, each with different weights."""
    config = load_config(str(REPO / "configs/demo.py"), ["--config.batch_size=8", "--config.evals={}",
                                                          *(["--config.evals.scenes.task=knn",
                                                             "--config.evals.scenes.root=x",
                                                             "--config.best_metric=scenes/top1"] if metrics else [])])
    run = build_run(config)
    state = initial_state(run)
    ckpt = Checkpointer(str(tmp_path / "wd"), best_metric=config.best_metric, use_async=False)
    for i, step in enumerate(steps):
        bumped = state.replace(params=jax_tree_add(state.params, 0.01 * i))
        ckpt.save(step, bumped, _NoData(), config.to_dict(), run.model_config,
                  {"scenes/top1": metrics[i]} if metrics else None)
    ckpt.close()
    return tmp_path / "wd"


def jax_tree_add(tree, value):
    return jax.tree.map(lambda x: x + value, tree)


def test_workdir_and_its_conversion_load_as_trained(tmp_path, capsys):
    wd = _workdir(tmp_path)
    model = load_checkpoint(wd)
    assert model.config == get_model_config("tiny-ViT")
    assert main(["convert", str(wd), str(tmp_path / "c.safetensors")]) == 0
    assert main(["convert", str(wd), str(tmp_path / "c.pt")]) == 0
    capsys.readouterr()
    embeddings = [_embed(p, tmp_path / f"{i}.npz") for i, p in enumerate([wd, tmp_path / "c.safetensors",
                                                                          tmp_path / "c.pt"])]
    embeddings.append(_embed(tmp_path / "c.pt", tmp_path / "m.npz", "--model", "tiny-ViT"))
    for other in embeddings[1:]:
        for a, b in zip(embeddings[0], other):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert "warning" not in capsys.readouterr().err


def test_step_and_best_choose_a_checkpoint(tmp_path):
    wd = _workdir(tmp_path, steps=(3, 6, 9), metrics=[10.0, 50.0, 20.0])
    latest, at_3, best = (load_checkpoint(wd), load_checkpoint(wd, step=3), load_checkpoint(wd, best=True))
    assert not np.allclose(_text_embedding(latest), _text_embedding(at_3))
    np.testing.assert_allclose(_text_embedding(best), _text_embedding(load_checkpoint(wd, step=6)), atol=1e-7)
    with pytest.raises(WorkdirError, match="no checkpoint at step 4; it has steps 3, 6, 9"):
        load_checkpoint(wd, step=4)
    with pytest.raises(ValueError, match="training workdir"):
        load_checkpoint(_single_file(tmp_path), step=3)
    plain = _workdir(tmp_path / "plain")
    with pytest.raises(WorkdirError, match="best_metric"):
        load_checkpoint(plain, best=True)


def _single_file(tmp_path):
    save_checkpoint(create_model("tiny-ViT"), tmp_path / "single.safetensors")
    return tmp_path / "single.safetensors"


def test_workdir_model_loads_without_training_code(tmp_path):
    wd = _workdir(tmp_path)
    code = ("import sys; from rsclip_jax.checkpoint import load_checkpoint; "
            f"m = load_checkpoint({str(wd)!r}); "
            "assert not [k for k in sys.modules if k.startswith('rsclip_jax.train')], 'training imported'; "
            "print(m.config.quick_gelu)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
    assert "read_only" not in proc.stderr  # orbax's CheckpointManager warnings are gone


def test_init_from_a_file_of_another_activation_is_refused(tmp_path):
    save_checkpoint(create_model("tiny-ViT", seed=1), tmp_path / "gelu.safetensors")
    config = load_config(str(REPO / "configs/demo.py"), [
        "--config.batch_size=8", "--config.model.name=tiny-ViT-quickgelu",
        f"--config.model.init_from={tmp_path / 'gelu.safetensors'}"])
    with pytest.raises(ValueError, match="config.model.init_from=.*holds tiny-ViT.*tiny-ViT-quickgelu"):
        initial_state(build_run(config))


def test_resume_refuses_another_architecture_batch_or_loss(tmp_path):
    saved = load_config(str(REPO / "configs/demo.py")).to_dict()
    same = load_config(str(REPO / "configs/demo.py"))
    check_resume_compatible("wd", saved, same)
    bigger = load_config(str(REPO / "configs/demo.py"), ["--config.batch_size=64"])
    with pytest.raises(ConfigError, match="batch_size: 32 in the checkpoint, 64 now.*--allow-config-change"):
        check_resume_compatible("wd", saved, bigger)
    check_resume_compatible("wd", saved, bigger, allow_change=True)
    chunked = load_config(str(REPO / "configs/demo.py"), ["--config.loss.chunk_size=8"])
    with pytest.raises(ConfigError, match="loss.chunk_size: 0 in the checkpoint, 8 now"):
        check_resume_compatible("wd", saved, chunked)
    check_resume_compatible("wd", saved, chunked, allow_change=True)
    # clip -> siglip adds a learnable bias: the weights would not fit, whatever the flag says
    siglip = load_config(str(REPO / "configs/demo.py"), ["--config.loss.name=siglip"])
    with pytest.raises(ConfigError, match="loss.name: 'clip' in the checkpoint, 'siglip' now"):
        check_resume_compatible("wd", saved, siglip, allow_change=True)
    other = load_config(str(REPO / "configs/demo.py"), ["--config.model.name=tiny-RN"])
    with pytest.raises(ConfigError, match="another architecture.*--config.model.init_from=wd"):
        check_resume_compatible("wd", saved, other, allow_change=True)
    # the checkpoint's own record decides, whatever names the configs use
    gelu, quick = get_model_config("tiny-ViT"), get_model_config("tiny-ViT-quickgelu")
    check_resume_compatible("wd", saved, same, saved_model=gelu, model_config=gelu)
    with pytest.raises(ConfigError, match="cannot resume: the checkpoint holds tiny-ViT"):
        check_resume_compatible("wd", saved, same, allow_change=True, saved_model=gelu, model_config=quick)


def test_resuming_with_siglip_is_refused_before_restoring(train_shards, tmp_path):
    base = [f"--config.data.train={train_shards}", "--config.batch_size=8", "--config.total_steps=1",
            "--config.evals={}", "--config.checkpoint_every_steps=1"]
    train(load_config(str(REPO / "configs/demo.py"), base), str(tmp_path))
    longer = base[:2] + ["--config.total_steps=2", "--config.loss.name=siglip"] + base[3:]
    with pytest.raises(ConfigError, match="cannot resume with another architecture or loss head"):
        train(load_config(str(REPO / "configs/demo.py"), longer), str(tmp_path), allow_config_change=True)


def test_workdir_checkpoint_with_wrong_model_is_refused(tmp_path):
    wd = _workdir(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="do not fit"):
        load_checkpoint(wd, model="tiny-RN")
