"""Faults `rsclip train` survives: a second run on a live workdir, a stale lock, too many NaN steps,
an update that makes parameters non-finite, Ctrl-C (save, then exit 130; twice: at once), a
checkpoint that cannot be written, corrupt checkpoints."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO
from test_train_loop import _checkpoint_steps, _cmd, _env
from rsclip_jax.train.config import ConfigError, default_config, validate
from rsclip_jax.train.workdir_lock import OWNER_NAME, WorkdirLock, WorkdirLockedError


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_lock_refuses_a_second_run_at_once(tmp_path, train_shards):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirLockedError):  # the same check in-process: flock is per open file
            WorkdirLock(str(tmp_path)).acquire()
        t0 = time.time()
        proc = subprocess.run(_cmd(tmp_path, train_shards), env=_env(), capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == 1
        assert time.time() - t0 < 60  # refused before building or compiling anything
        line = proc.stderr.strip().splitlines()[-1]
        assert "in use by another live run" in line and f"pid {os.getpid()}" in line
        assert f"host {socket.gethostname()}" in line and "started" in line and "another --workdir" in line
        assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / OWNER_NAME).exists()  # released


def test_stale_lock_taken_over_then_ctrl_c_saves_and_exits_130(tmp_path, train_shards):
    dead = _dead_pid()
    (tmp_path / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                                   "started_at": time.time() - 60}))
    cmd = _cmd(tmp_path, train_shards, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    owner = json.loads((tmp_path / OWNER_NAME).read_text())
    assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert f"taking over the stale lock of {tmp_path} left by host {socket.gethostname()}, pid {dead}" in err
    summary = json.loads(out)
    assert summary["ended"] == "interrupted"
    assert _checkpoint_steps(tmp_path) == [summary["step"]]
    assert "SIGINT: checkpoint saved at step" in err and "interrupted (Ctrl-C)" in err
    assert not (tmp_path / OWNER_NAME).exists()  # released on the way out
    WorkdirLock(str(tmp_path)).acquire().release()


def test_second_ctrl_c_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from rsclip_jax.train.loop import _Preemption\n"
        "p = _Preemption(sigint=True, on_abort=lambda: print('aborted', flush=True))\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "assert p.requested and p.signal_name == 'SIGINT'\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n"
        "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script], env=_env(1), capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 130, proc.stderr
    assert "aborted" in proc.stdout and "not reached" not in proc.stdout
    assert "second Ctrl-C" in proc.stderr


def test_nan_skip_limit_stops_the_run(tmp_path, train_shards):
    blowup = ["--config.optim.lr=1e30", "--config.optim.warmup_steps=0", "--config.optim.grad_clip_norm=0",
              "--config.total_steps=8", "--config.nan_policy=skip", "--config.max_skipped_steps=2"]
    proc = subprocess.run(_cmd(tmp_path, train_shards, *blowup), env=_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert "more than max_skipped_steps=2" in proc.stderr and "steps skipped" in proc.stderr
    assert '"completed"' not in proc.stdout
    assert not (tmp_path / OWNER_NAME).exists()  # the lock is released on the error path too


@pytest.mark.parametrize("key,value", [("max_skipped_steps", -1), ("max_skipped_fraction", 1.5),
                                       ("max_skipped_fraction", -0.1)])
def test_skip_limits_validated(key, value):
    c = default_config()
    c[key] = value
    with pytest.raises(ConfigError, match=key):
        validate(c)


def test_skip_fraction_limit():
    from rsclip_jax.train.loop import SKIPPED_FRACTION_MIN_STEPS, TooManySkippedStepsError, _check_skip_limits

    c = default_config()
    c.max_skipped_steps = 0
    _check_skip_limits(c, 5, SKIPPED_FRACTION_MIN_STEPS - 1)  # too few steps to judge a fraction
    _check_skip_limits(c, 2, SKIPPED_FRACTION_MIN_STEPS)  # 10%: at the limit, not over it
    with pytest.raises(TooManySkippedStepsError, match="3 of 20 steps skipped.*max_skipped_fraction=0.1"):
        _check_skip_limits(c, 3, 20)
    c.max_skipped_fraction = 0.0
    _check_skip_limits(c, 1000, 1000)  # 0: no limit


def test_update_making_params_nonfinite_is_skipped():
    """Loss and gradient finite, the update not (an infinite step size): the update is dropped."""
    from rsclip_jax.models import create_model
    from rsclip_jax.tokenizer import tokenize
    from rsclip_jax.train.optim import learning_rate_schedule
    from rsclip_jax.train.sharding import make_mesh, state_shardings
    from rsclip_jax.train.step import init_train_state, jit_train_step, make_train_step

    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    schedule = learning_rate_schedule(1e-3, 0, 1)
    tx = optax.chain(optax.sgd(1e-3), optax.scale(jnp.inf))
    graphdef, abstract = nnx.eval_shape(lambda: init_train_state(create_model("tiny-ViT", seed=0), tx))
    shardings = state_shardings(abstract, mesh, fsdp_min_size=1024)
    state = jax.jit(lambda: init_train_state(create_model("tiny-ViT", seed=0), tx)[1], out_shardings=shardings)()
    before = jax.tree.map(np.asarray, state.params)
    step = jit_train_step(make_train_step(graphdef, tx, schedule, mesh), shardings, mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
             "tokens": tokenize([f"{j} trees and buildings" for j in range(8)])}
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert bool(metrics["nonfinite"])
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


# -- checkpoints: a failed save, a corrupt checkpoint ---------------------------------------------

@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory, train_shards):
    """A finished tiny run of 8 steps with checkpoints at steps 4 and 8."""
    workdir = tmp_path_factory.mktemp("eight_steps")
    proc = subprocess.run(_cmd(workdir, train_shards, "--config.total_steps=8"), env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _checkpoint_steps(workdir) == [4, 8]
    return workdir


def _flip_a_byte(step_dir):
    """Flips one byte in the middle of the largest array data file of a checkpoint's state."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    data.write_bytes(bytes(raw))


def _metric_losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(eight_steps, train_shards, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(eight_steps, workdir)
    before = _metric_losses(workdir)
    _flip_a_byte(workdir / "checkpoints" / "8")
    proc = subprocess.run(_cmd(workdir, train_shards, "--config.total_steps=8"), env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {workdir}/checkpoints/8 does not verify, skipping it: " in proc.stderr
    assert "resuming from step 4, the newest checkpoint that verifies (1 newer one(s) moved to" in proc.stderr
    assert len(list((workdir / "checkpoints_rejected").glob("8-*"))) == 1  # kept for inspection
    assert _checkpoint_steps(workdir) == [4, 8]  # step 8 written again, from step 4
    after = _metric_losses(workdir)
    assert sorted(after) == list(range(1, 9))
    for step in range(5, 9):  # the same batches and updates as the first time: an exact resume
        assert after[step] == pytest.approx(before[step], abs=1e-6), step


def test_no_checkpoint_verifies_one_line_naming_each(eight_steps, train_shards, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(eight_steps, workdir)
    # step 8: a saved checksum that no longer matches (what a silently flipped byte looks like);
    # step 4: a damaged data file
    sums_path = workdir / "checkpoints" / "8" / "checksums" / "metadata"
    sums = json.loads(sums_path.read_text())
    key = sorted(k for k in sums if "params" in k)[0]
    sums[key] = (sums[key] + 1) % 2**32
    sums_path.write_text(json.dumps(sums))
    _flip_a_byte(workdir / "checkpoints" / "4")
    proc = subprocess.run(_cmd(workdir, train_shards, "--config.total_steps=12"), env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rsclip train: error: {workdir}/checkpoints: no checkpoint verifies (step 8: "), last
    assert f"1 array(s) differ from their saved checksums: {key}" in last and "; step 4: " in last
    assert "rerun to start from scratch" in last
    assert _checkpoint_steps(workdir) == []


def test_failed_save_is_reported_at_its_step_and_the_run_stops(tmp_path, train_shards):
    """Writes beyond 2 MB fail (RLIMIT_FSIZE, as a full disk would): the first checkpoint's arrays."""
    limit = 2 * 1024 * 1024
    t0 = time.monotonic()
    proc = subprocess.run(_cmd(tmp_path, train_shards), env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=REPO, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    print(f"failed save: the run ended {time.monotonic() - t0:.0f} s after it started")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rsclip train: error: saving the checkpoint of step 4 to {tmp_path}/checkpoints failed: ")
    assert "File too large" in last and "rerun the same command to resume" in last
    # Stopped by the next save at the latest (step 8 waits for step 4's background save), not an
    # interval late; usually earlier, when a step's check finds the failed save (steps 5-7), but a
    # loaded machine can take that long to fail the write (CI once logged step 8).
    assert max(_metric_losses(tmp_path)) <= 8
    assert _checkpoint_steps(tmp_path) == []
    assert not (tmp_path / OWNER_NAME).exists()  # released on the way out


# -- a corrupt record in a shard ------------------------------------------------------------------

CORRUPT_KEY = 5


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory, train_shards):
    """A copy of the training shards whose record 5 has a header but image bytes that do not decode."""
    from rsclip_jax.data import shards

    out = tmp_path_factory.mktemp("corrupt_shards")
    shutil.copy(train_shards / shards.MANIFEST_NAME, out)
    (name,) = [s["file"] for s in shards.load_manifest(train_shards)["shards"]]
    records = shards.read_shard(train_shards / name)
    header, start = shards.decode_header(records[CORRUPT_KEY])
    records[CORRUPT_KEY] = records[CORRUPT_KEY][:start] + b"\x89PNG\r\n\x1a\n truncated"
    shards.write_shard(out / name, records)
    return out


def _batches(shards_dir, skip_corrupt, n):
    from rsclip_jax.data import shards
    from rsclip_jax.data.augment import AugmentConfig
    from rsclip_jax.data.pipeline import train_dataset

    ds = train_dataset(shards.shard_paths(shards_dir), batch_size=8, seed=0, shuffle=False,
                       augment=AugmentConfig(image_size=32, hflip=False, vflip=False, rot90=False),
                       skip_corrupt=skip_corrupt)
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_corrupt_record_is_named_or_replaced_by_the_next_one(corrupt_shards, train_shards):
    from rsclip_jax.data.pipeline import CorruptRecordError

    with pytest.raises(CorruptRecordError, match=rf"shard-00000-of-00001.array_record record {CORRUPT_KEY}: .*"
                                                 r"data.skip_corrupt=N"):
        _batches(corrupt_shards, 0, 1)
    clean, replaced = _batches(train_shards, 1, 1)[0], _batches(corrupt_shards, 1, 1)[0]
    flags = np.zeros(8, bool)
    flags[CORRUPT_KEY] = True
    np.testing.assert_array_equal(replaced["corrupt"], flags)
    assert not clean["corrupt"].any()
    for key in ("images", "tokens"):  # every other example unchanged; the bad one is its neighbour
        keep = ~flags
        np.testing.assert_array_equal(replaced[key][keep], clean[key][keep])
    np.testing.assert_array_equal(replaced["images"][CORRUPT_KEY], clean["images"][CORRUPT_KEY + 1])
    again = _batches(corrupt_shards, 1, 1)[0]  # the same choice every time (and on every process)
    np.testing.assert_array_equal(again["images"], replaced["images"])


def test_skip_corrupt_counts_and_stops_past_the_limit(corrupt_shards, tmp_path):
    """48 records, batch 8: the corrupt record comes once per 6-step epoch, so a limit of 1 stops
    the run in its second epoch, after logging and counting the first."""
    proc = subprocess.run(_cmd(tmp_path, corrupt_shards, "--config.data.skip_corrupt=1",
                               "--config.checkpoint_every_steps=100"),
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"[data] skipping corrupt training record {corrupt_shards}/shard-00000-of-00001.array_record record " \
           f"{CORRUPT_KEY}" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "rsclip train: error: 2 corrupt training records met by step" in last
    assert "more than data.skip_corrupt=1" in last
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counts = [r["corrupt_records"] for r in rows]
    assert counts == sorted(counts) and counts[-1] == 1 and 6 <= len(rows) < 12  # counted, then stopped
