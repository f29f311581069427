"""`rsclip train` as a user runs it: exact resume after kill -9, preemption, reshape, NaN policy.

Each run is a real subprocess (so it can be killed), with a tiny model on real sample crops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO


def _cmd(workdir, shards, *overrides):
    return [sys.executable, "-m", "rsclip_jax", "train", "--config", str(REPO / "configs/demo.py"),
            "--workdir", str(workdir), f"--config.data.train={shards}", "--config.evals={}",
            "--config.batch_size=8", "--config.total_steps=12", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=4", "--config.optim.warmup_steps=2", *overrides]


def _env(devices=8):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(cmd, devices=8, timeout=300):
    proc = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(workdir):
    with open(Path(workdir) / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _checkpoint_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_shards):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(_cmd(workdir, train_shards))
    return workdir


def test_resume_after_kill_is_bit_exact(uninterrupted, train_shards, tmp_path):
    cmd = _cmd(tmp_path, train_shards)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 240
    while 4 not in _checkpoint_steps(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else 0
    assert 4 <= killed_at < 12, f"kill landed at step {killed_at}; the test needs it mid-run"
    resumed = _run(cmd)
    assert "resumed from" in resumed.stderr
    want, got = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(got) == list(range(1, 13))  # no duplicate or missing steps after the resume
    assert got == want  # bit for bit, every step, before and after the resume


def test_sigterm_saves_and_exits_promptly(train_shards, tmp_path):
    cmd = _cmd(tmp_path, train_shards, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    # A hang guard, not a speed check: 100000 steps would take hours, a prompt stop seconds.
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out)
    assert summary["ended"] == "preempted"
    assert _checkpoint_steps(tmp_path) == [summary["step"]]
    assert "rerun the same command to resume" in err


def test_restore_onto_fewer_devices(uninterrupted, train_shards, tmp_path):
    """A checkpoint written on 8 devices resumes on 4, continuing the same loss curve."""
    import shutil

    shutil.copytree(uninterrupted / "checkpoints" / "8", tmp_path / "checkpoints" / "8")
    resumed = _run(_cmd(tmp_path, train_shards), devices=4)
    assert "resumed from" in resumed.stderr and "at step 8" in resumed.stderr
    want, got = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(got) == [9, 10, 11, 12]
    for step in got:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])


def test_nan_policy_stop_and_skip(train_shards, tmp_path):
    blowup = ["--config.optim.lr=1e30", "--config.optim.warmup_steps=0", "--config.optim.grad_clip_norm=0",
              "--config.checkpoint_every_steps=1", "--config.total_steps=6"]
    proc = subprocess.run(_cmd(tmp_path / "stop", train_shards, *blowup, "--config.nan_policy=stop"),
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "nan_policy='stop'" in proc.stderr
    from rsclip_jax.train.checkpointing import all_finite  # every saved checkpoint is finite
    import orbax.checkpoint as ocp

    for step in _checkpoint_steps(tmp_path / "stop"):
        restored = ocp.StandardCheckpointer().restore(tmp_path / "stop" / "checkpoints" / str(step) / "state")
        assert all_finite(restored["params"]), step

    skip = _run(_cmd(tmp_path / "skip", train_shards, *blowup, "--config.nan_policy=skip"))
    assert json.loads(skip.stdout)["skipped_steps"] > 0

