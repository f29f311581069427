"""Shared fixtures. Tests run on CPU; tiny models unless a test is about full-size parity."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated CPU devices, so sharded code paths (meshes, shard_map losses, sharded
# embedding) run in every test session. Must be set before JAX initialises its backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# One persistent XLA compilation cache for the whole session, this process and every `rsclip`
# subprocess a test starts: many tests train the same tiny model, and each would otherwise compile
# the same step again (seconds each on 2 cores). Only compiles over a second are stored.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rsclip-tests-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    _SESSION_CACHE: str | None = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _SESSION_CACHE = None

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
TILES = SAMPLES / "tiles"
REAL_FIXTURES = REPO / "tests" / "fixtures"  # small real package files (deepforest, solaris), see ATTRIBUTION.md


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


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory, tiles: list[Path]) -> Path:
    """ArrayRecord shards of 48 real crops (96 px) from the sample tiles, 2 captions each."""
    import csv

    from PIL import Image

    from rsclip_jax.cli import main

    root = tmp_path_factory.mktemp("train_data")
    rows = []
    for i in range(48):
        with Image.open(tiles[i % len(tiles)]) as im:
            im = im.convert("RGB")
            x, y = (i * 37) % max(1, im.width - 96), (i * 53) % max(1, im.height - 96)
            name = f"crop{i:02d}.png"
            im.crop((x, y, x + 96, y + 96)).save(root / name)
        rows += [(name, f"Tile {i % len(tiles)} crop at {x} {y} ."), (name, f"There are {i % 5 + 1} things here .")]
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    assert main(["data", "build", "--csv", str(root / "train.csv"), "--out", str(root / "shards")]) == 0
    return root / "shards"


def contrastive_loss_and_grads(model, images, tokens, jit: bool = False):
    """The symmetric CLIP loss of `model` on one batch, and its gradient with respect to every
    parameter; `jit` compiles them (op by op, even the tiny model's gradient takes seconds)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        img, txt, scale = nnx.merge(graphdef, p, rest)(images, tokens)
        logits = scale * img @ txt.T
        labels = jnp.arange(logits.shape[0])
        return -(jnp.mean(jax.nn.log_softmax(logits)[labels, labels])
                 + jnp.mean(jax.nn.log_softmax(logits.T)[labels, labels])) / 2

    value_and_grad = jax.value_and_grad(loss)
    return (jax.jit(value_and_grad) if jit else value_and_grad)(params)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README demo's model: configs/demo.py trained for its full 300 steps on the bundled samples
    (about a minute on 2 cores), without its evals, exported as an OpenCLIP .safetensors file."""
    from rsclip_jax.checkpoint import load_checkpoint, save_checkpoint
    from rsclip_jax.data.build import BuildConfig, build
    from rsclip_jax.train.config import load_config
    from rsclip_jax.train.loop import train

    root = tmp_path_factory.mktemp("demo_model")
    build(BuildConfig(csvs=(str(SAMPLES / "train" / "captions.csv"),), out_dir=str(root / "data")))
    overrides = [f"--config.data.train={root / 'data'}", "--config.evals={}"]
    config = load_config(str(REPO / "configs" / "demo.py"), overrides)
    train(config, str(root / "train"))
    save_checkpoint(load_checkpoint(root / "train"), root / "model.safetensors")
    return root / "model.safetensors"


# The README's test command runs pytest-xdist with --dist loadfile, which hands each worker the next
# test file in collection order. A long file that starts last runs alone at the end while the other
# worker idles, so the longest files (measured serially: 90 to 320 s each) are collected first.
LONGEST_FILES_FIRST = ("test_launch.py", "test_docs_commands.py", "test_train_faults.py", "test_train_loop.py",
                       "test_map.py", "test_train_step.py", "test_model_parity.py", "test_bench.py", "test_sweep.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts the files of LONGEST_FILES_FIRST first; the sort is stable, so any other order is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Removes the session's compilation cache (made above). Under pytest-xdist the workers inherit
    the controller's cache (its environment is theirs), so only the controller removes it, last."""
    if _SESSION_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
