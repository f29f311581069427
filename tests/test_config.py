"""Training configs: the schema, overrides and errors before anything compiles."""

from __future__ import annotations

import pytest

from rsclip_jax.train.config import ConfigError, apply_overrides, default_config, load_config
from conftest import REPO


def test_shipped_configs_load():
    for spec in ["configs/demo.py", "configs/remoteclip.py:RN50", "configs/remoteclip.py:ViT-B-32", "configs/remoteclip.py:ViT-L-14"]:
        c = load_config(str(REPO / spec))
        for key in ("seed", "batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps"):
            assert key in c
    assert load_config(str(REPO / "configs/remoteclip.py:ViT-L-14")).model.name == "RemoteCLIP-ViT-L-14"


def test_overrides_are_typed():
    c = load_config(str(REPO / "configs/demo.py"), ["--config.optim.lr=1e-4", "--config.batch_size=64",
                                                     "--config.model.name=tiny-RN", "--config.mesh.shape=(2,2,2)",
                                                     "--config.optim.warmup_steps=0", "--config.optim.weight_decay=0"])
    assert c.optim.lr == 1e-4 and c.batch_size == 64 and c.model.name == "tiny-RN"
    assert tuple(c.mesh.shape) == (2, 2, 2) and c.optim.weight_decay == 0.0 and isinstance(c.optim.weight_decay, float)
    with pytest.raises(AttributeError):
        c.batch_sise = 3  # locked after loading: a typo cannot add a key


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.optim.lrr=1e-4", "unknown key 'optim.lrr'"),
        ("--config.optimizer.lr=1", "no config section 'optimizer'"),
        ("--config.batch_size=big", "batch_size must be int, got str"),
        ("--config.model.visual_scan=1", "visual_scan must be bool, got int"),
        ("--config.batch_size", "expected --config.KEY=VALUE"),
        ("--config.batch_size=0", "'batch_size' must be positive"),
        ("--config.nan_policy=ignore", "nan_policy must be 'skip' or 'stop'"),
        ("--config.optim.grad_accum_steps=3", "must be >= 1 and divide batch_size"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "configs/demo.py"), [override])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "typo.py"
    bad.write_text("from rsclip_jax.train.config import default_config\n"
                   "def get_config():\n    c = default_config()\n    c.optim.learning_rate = 1.0\n    return c\n")
    with pytest.raises(ConfigError, match=r"typo.py: unknown config key 'optim.learning_rate'"):
        load_config(str(bad))
    missing = tmp_path / "missing.py"
    missing.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'seed': 0})\n")
    with pytest.raises(ConfigError, match="missing required top-level keys: batch_size, total_steps"):
        load_config(str(missing))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.py"))


def test_string_keys_keep_strings():
    c = default_config()
    apply_overrides(c, ["--config.model.init_from=123"])
    assert c.model.init_from == "123"
