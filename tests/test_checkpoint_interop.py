"""Import -> export -> open_clip round trips, architecture inference and mismatch errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from openclip_reference import build, state_dict_numpy
from rsclip_jax.checkpoint import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    export_state_dict,
    load_checkpoint,
    model_from_state_dict,
    save_checkpoint,
)
from rsclip_jax.models import UnknownModelError, create_model, get_model_config


def _small(name: str):
    base = get_model_config(name)
    if base.vision.is_resnet:
        vision = dataclasses.replace(base.vision, layers=(1, 2, 1, 1), width=32, image_size=64)
    else:
        vision = dataclasses.replace(base.vision, layers=2, width=128, image_size=4 * base.vision.patch_size)
    # text heads = width // 64, as OpenCLIP: the head count cannot be read off the weights
    text = dataclasses.replace(base.text, width=128, heads=2, layers=2)
    return dataclasses.replace(base, embed_dim=64, vision=vision, text=text)


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-32-quickgelu"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_to_jax_to_torch_round_trip(arch, suffix, tmp_path):
    cfg = _small(arch)
    original = build(cfg, seed=11)
    torch.save(original.state_dict(), tmp_path / "original.pt")  # a real torch.save file
    ours = load_checkpoint(tmp_path / "original.pt", model=cfg)
    save_checkpoint(ours, tmp_path / f"exported{suffix}")

    if suffix == ".pt":
        sd = torch.load(tmp_path / "exported.pt", weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(tmp_path / "exported.safetensors")
    restored = build(cfg, seed=99)  # different weights until loaded
    restored.load_state_dict(sd, strict=True)
    for k, v in original.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)

    size = cfg.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor(np.random.default_rng(0).integers(1, 49407, (2, 77)))
    with torch.no_grad():
        for a, b in zip(original(images, tokens)[:2], restored(images, tokens)[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_full_size_export_loads_strictly_in_open_clip():
    """Every key open_clip RN50 expects, incl. BatchNorm counters, with the right shapes."""
    import open_clip

    sd = export_state_dict(create_model("RN50", seed=0))
    target = open_clip.create_model("RN50")
    target.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


def test_inference_of_architectures_from_shapes():
    for name in ["RN50", "ViT-B-16", "ViT-L-14-336"]:
        sd = export_state_dict(create_model(_small(name)))
        inferred = model_from_state_dict(sd).config
        assert inferred == dataclasses.replace(_small(name), quick_gelu=True)


def test_mismatch_lists_missing_unexpected_and_shapes():
    sd = state_dict_numpy(build(_small("ViT-B-32"), seed=0))
    with pytest.raises(CheckpointMismatchError) as e:
        model_from_state_dict(sd, _small("RN50"))
    msg = str(e.value)
    assert "missing keys" in msg and "visual.attnpool.q_proj.weight" in msg
    assert "unexpected keys" in msg and "visual.class_embedding" in msg

    sd["text_projection"] = sd["text_projection"][:, :32]
    with pytest.raises(CheckpointMismatchError, match=r"text_projection: checkpoint \(128, 32\), model \(128, 64\)"):
        model_from_state_dict(sd, _small("ViT-B-32"))


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError, match="ViT-B-33.*known models:.*RemoteCLIP-ViT-B-32"):
        get_model_config("ViT-B-33")


def test_hostile_checkpoint_through_public_loader(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"visual.proj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
