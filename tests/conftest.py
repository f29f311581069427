"""Shared fixtures. Tests run on CPU; tiny models unless a test is about full-size parity."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices, so sharded code paths (meshes, shard_map losses, sharded
# embedding) run in every test session. Must be set before JAX initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
TILES = SAMPLES / "tiles"
SHARED_SAMPLES = REPO.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def tiles() -> list[Path]:
    """The bundled real remote-sensing tiles, sorted by name."""
    paths = sorted(p for p in TILES.iterdir() if p.is_file())
    assert len(paths) >= 5, f"expected bundled sample tiles in {TILES}"
    return paths


@pytest.fixture(scope="session")
def rgb_tiles(tiles: list[Path]) -> list[Path]:
    """Bundled tiles that are 8-bit RGB files (where our transform equals open_clip's exactly)."""
    from PIL import Image

    out = []
    for p in tiles:
        with Image.open(p) as im:
            if im.mode == "RGB":
                out.append(p)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny-ViT saved as an OpenCLIP-format .safetensors file."""
    from rsclip_jax.checkpoint import save_checkpoint
    from rsclip_jax.models import create_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(create_model("tiny-ViT", seed=1), path)
    return path
