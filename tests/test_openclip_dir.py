"""OpenCLIP hub folders (open_clip_config.json + open_clip_model.safetensors), in and out, checked
against open_clip itself: `create_model_from_pretrained("local-dir:DIR")` reads what we write, and
we read what open_clip's own layout holds, with the architecture (activation included) it records."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from conftest import TILES
from openclip_reference import build
from rsclip_jax.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from rsclip_jax.checkpoint.openclip_dir import openclip_model_cfg
from rsclip_jax.cli import main
from rsclip_jax.models import create_model, get_model_config
from rsclip_jax.preprocess import load_and_preprocess, normalize_images
from rsclip_jax.tokenizer import tokenize

TEXTS = ["Many planes are parked next to a long runway .", "dense forest &amp; a river — 北京", "x " * 90]


def _ours(model, images):
    return (np.asarray(model.encode_image(normalize_images(images), normalize=True)),
            np.asarray(model.encode_text(tokenize(TEXTS, context_length=model.config.text.context_length),
                                         normalize=True)))


def _theirs(torch_model, images):
    x = torch.from_numpy(np.array(normalize_images(images))).permute(0, 3, 1, 2)
    tokens = torch.from_numpy(tokenize(TEXTS).astype(np.int64))
    with torch.no_grad():
        return (torch_model.encode_image(x, normalize=True).numpy(),
                torch_model.encode_text(tokens, normalize=True).numpy())


def _images(size):
    paths = sorted(p for p in TILES.iterdir() if p.suffix in (".jpg", ".png"))[:3]
    return np.stack([load_and_preprocess(str(p), size) for p in paths])


@pytest.mark.parametrize("name", ["tiny-ViT", "tiny-RN-quickgelu"])
def test_written_folder_loads_in_open_clip_with_the_same_outputs(name, tmp_path, capsys):
    model = create_model(name, seed=7)
    save_checkpoint(model, tmp_path / "src.safetensors")
    # a new folder is either layout: --to says which; an existing folder keeps its own
    assert main(["convert", str(tmp_path / "src.safetensors"), str(tmp_path / "hub")]) == 1
    assert "--to hf (transformers) or --to openclip-dir" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "src.safetensors"), str(tmp_path / "hub"), "--to", "openclip-dir"]) == 0
    assert main(["convert", str(tmp_path / "src.safetensors"), str(tmp_path / "hub")]) == 0
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["open_clip_config.json",
                                                                    "open_clip_model.safetensors"]
    torch_model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{tmp_path / 'hub'}")
    torch_model.eval()
    assert preprocess.transforms[0].size == model.config.vision.image_size
    images = _images(model.config.vision.image_size)
    for a, b in zip(_ours(model, images), _theirs(torch_model, images)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # and it loads back here as the same architecture, without --model
    again = load_checkpoint(tmp_path / "hub")
    assert again.config == get_model_config(name)
    for a, b in zip(_ours(again, images), _ours(model, images)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert "warning" not in capsys.readouterr().err


def test_reads_a_folder_in_open_clips_own_layout(tmp_path):
    cfg = get_model_config("tiny-ViT-quickgelu")
    torch_model = build(cfg, seed=3).eval()
    folder = tmp_path / "hub"
    folder.mkdir()
    # what the hub holds: OpenCLIP's model_cfg keys, weights from torch, no rsclip metadata at all
    model_cfg = {"embed_dim": cfg.embed_dim, "quick_gelu": True,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, folder / "open_clip_model.safetensors")
    ours = load_checkpoint(folder)
    assert ours.config.quick_gelu and ours.config == cfg
    images = _images(64)
    for a, b in zip(_ours(ours, images), _theirs(torch_model, images)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the folder's model_cfg is the record: a wrong --model is refused by the shapes
    with pytest.raises(CheckpointMismatchError, match="hub"):
        load_checkpoint(folder, model="tiny-RN")


def test_bad_folders_and_targets_are_named(tmp_path, capsys):
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 512, "vision_cfg": {"timm_model_name": "convnext_base"}, "text_cfg": {}}}))
    (tmp_path / "timm" / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="timm_model_name"):
        load_checkpoint(tmp_path / "timm")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="without weights; expected one of open_clip_model.safetensors"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(create_model("tiny-ViT"), tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "x.pt"), "--to", "openclip-dir"]) == 1
    assert "--to openclip-dir writes a folder" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "--to", "openclip"]) == 1
    assert "--to openclip writes one file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.pt").exists()


def test_model_cfg_round_trips_every_registry_architecture():
    from rsclip_jax.checkpoint.openclip_dir import config_from_model_cfg
    from rsclip_jax.models import list_models

    for name in list_models():
        config = get_model_config(name)
        assert config_from_model_cfg(openclip_model_cfg(config), name) == config, name
    # and OpenCLIP's own configs read as ours (activation from the name's -quickgelu, as open_clip does)
    for name in ("RN50", "ViT-B-32", "ViT-L-14"):
        assert config_from_model_cfg(open_clip.get_model_config(name), name) == get_model_config(name)


def test_init_from_an_openclip_folder(tmp_path):
    from conftest import REPO
    from flax import nnx

    from rsclip_jax.checkpoint import export_state_dict, save_openclip_dir
    from rsclip_jax.train.config import load_config
    from rsclip_jax.train.setup import build_run, initial_state

    source = create_model("tiny-ViT", seed=11)
    save_openclip_dir(source, tmp_path / "hub")
    run = build_run(load_config(str(REPO / "configs/demo.py"), [
        "--config.batch_size=8", f"--config.model.init_from={tmp_path / 'hub'}"]))
    state = initial_state(run)
    got = export_state_dict(nnx.merge(run.graphdef, state.params, state.rest))
    for key, value in export_state_dict(source).items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
