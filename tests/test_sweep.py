"""`rsclip sweep`: sweep files expand into validated, named runs; a local queue runs them K at once,
a rerun skips what finished and resumes the rest; `--collect` tables and plots every run.

The acceptance test is real: 4 tiny runs of configs/demo.py (2 steps each) through the CLI with
--max-parallel 2. The queue's signal and failure handling run on small Python jobs; the SLURM and
TPU dry runs are compared byte for byte with tests/fixtures/launch/.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from test_train_loop import _env

from rsclip_jax.cli import main
from rsclip_jax.launch import sweep_collect
from rsclip_jax.launch.supervisor import Process
from rsclip_jax.launch.sweep import (IntUniform, LogUniform, Uniform, load_sweep, product, random_search, run_status,
                                     zipped)
from rsclip_jax.launch.sweep_queue import JobQueue

FIXTURES = REPO / "tests" / "fixtures" / "launch"
DEMO = str(REPO / "configs" / "demo.py")


def _sweep_file(tmp_path: Path, body: str, name: str = "s.py") -> str:
    path = tmp_path / name
    path.write_text("from rsclip_jax.launch.sweep import *\n\n\ndef get_sweep():\n    return " + body + "\n")
    return str(path)


# -- expansion --------------------------------------------------------------------------------------


def test_product_zip_and_concatenation():
    assert product({"optim.lr": [1, 2]}, seed=[0, 1]) == [
        {"optim.lr": 1, "seed": 0}, {"optim.lr": 1, "seed": 1}, {"optim.lr": 2, "seed": 0}, {"optim.lr": 2, "seed": 1}]
    assert zipped({"optim.lr": [1, 2], "seed": [5, 6]}) == [{"optim.lr": 1, "seed": 5}, {"optim.lr": 2, "seed": 6}]
    assert product(seed=[0]) + zipped(batch_size=[8, 16]) == [{"seed": 0}, {"batch_size": 8}, {"batch_size": 16}]
    with pytest.raises(ValueError, match="equal lengths"):
        zipped({"optim.lr": [1, 2], "seed": [5]})
    with pytest.raises(ValueError, match="non-empty list"):
        product({"optim.lr": []})


def test_random_search_is_deterministic_per_seed():
    space = {"optim.lr": LogUniform(1e-5, 1e-2), "optim.weight_decay": Uniform(0.0, 0.3),
             "batch_size": IntUniform(8, 64), "loss.name": ["clip", "siglip"]}
    a, b, c = random_search(6, space, seed=3), random_search(6, space, seed=3), random_search(6, space, seed=4)
    assert a == b and a != c
    assert len(a) == 6 and len({json.dumps(r, sort_keys=True) for r in a}) == 6  # distinct runs
    for run in a:
        assert 1e-5 <= run["optim.lr"] <= 1e-2 and run["optim.lr"] == float(f"{run['optim.lr']:.3g}")
        assert 0.0 <= run["optim.weight_decay"] <= 0.3 and 8 <= run["batch_size"] <= 64
        assert run["loss.name"] in ("clip", "siglip")
    with pytest.raises(ValueError, match="only 2 distinct runs of 3"):
        random_search(3, {"seed": [0, 1]})


def test_runs_are_named_and_their_values_reach_the_config(tmp_path):
    path = _sweep_file(tmp_path, f"""{{"config": {DEMO!r}, "overrides": {{"total_steps": 7}},
        "runs": product({{"optim.lr": [1e-05, 0.003]}}, **{{"data.hflip": [False], "mesh.shape": [(2, 1, 1)]}})
        + [{{"model.name": "tiny-ViT-quickgelu", "loss.name": "siglip"}}]}}""")
    sweep = load_sweep(path, cli_overrides=["--config.batch_size=16"])
    assert [r.name for r in sweep.runs] == ["lr=1e-05,hflip=False,shape=2,1,1", "lr=0.003,hflip=False,shape=2,1,1",
                                           "model.name=tiny-ViT-quickgelu,loss.name=siglip"]  # two leaves "name"
    assert sweep.root == os.path.join("runs", "s")
    assert sweep.runs[0].workdir == os.path.join("runs", "s", sweep.runs[0].name)
    c = sweep.runs[0].config
    assert (c.optim.lr, c.data.hflip, tuple(c.mesh.shape)) == (1e-5, False, (2, 1, 1))
    assert (c.total_steps, c.batch_size) == (7, 16)  # the sweep's common overrides, then the command line's
    assert sweep.runs[1].config.optim.lr == 0.003
    assert sweep.runs[2].config.model.name == "tiny-ViT-quickgelu" and sweep.runs[2].config.loss.name == "siglip"
    assert sweep.swept_keys == ["optim.lr", "data.hflip", "mesh.shape", "model.name", "loss.name"]


@pytest.mark.parametrize("body, extra, message", [
    (f'{{"config": {DEMO!r}, "runs": [{{"optim.lr": 1e-3}}, {{"optim.lrr": 1e-4}}]}}', [],
     "s.py: run 2 (lrr=0.0001): override '--config.optim.lrr=0.0001': unknown key 'optim.lrr'"),
    (f'{{"config": {DEMO!r}, "runs": [{{"batch_size": "big"}}]}}', [], "s.py: run 1 (batch_size=big): override"),
    (f'{{"config": {DEMO!r}, "runs": []}}', [], "s.py: get_sweep()['runs'] must be a non-empty list"),
    ('{"runs": [{"seed": 1}]}', [], "s.py: get_sweep() must name the base config"),
    (f'{{"config": {DEMO!r}, "runs": [{{"seed": 1}}], "metrics": "loss"}}', [], "unknown key(s) 'metrics'"),
    (f'{{"config": {DEMO!r}, "runs": [{{"seed": 1}}, {{"seed": 1}}]}}', [], "runs 1 and 2 have the same overrides"),
    (f'{{"config": {DEMO!r}, "runs": [{{"--config.seed": 1}}]}}', [], "without --config."),
    (f'{{"config": {DEMO!r}, "runs": [{{"seed": 1}}]}}', ["--config.seed=2"], "the sweep varies seed"),
    (f'{{"config": {DEMO!r}, "runs": [{{"seed": 1}}]}}', ["--bogus"], "unrecognized argument '--bogus'"),
    ('{"config": "configs/nope.py", "runs": [{"seed": 1}]}', [], "configs/nope.py: config file not found"),
])
def test_bad_sweep_is_one_clear_line_before_anything_runs(tmp_path, capsys, body, extra, message):
    path = _sweep_file(tmp_path, body)
    assert main(["sweep", path, "--root", str(tmp_path / "root"), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "root").exists()


# -- dry runs, byte for byte --------------------------------------------------------------------------

DRY_RUNS = {
    "sweep_slurm.sh": ["--launcher", "slurm", "--max-parallel", "2",
                       "--launcher-args=--nodes 2 --time 24:00:00 --partition gpu", "--config.data.train=/data/shards"],
    "sweep_tpu.sh": ["--launcher", "tpu", "--launcher-args=--name my-tpu --zone us-central2-b",
                     "--root", "/mnt/shared/sweeps/remoteclip_lr", "--config.data.train=/mnt/shared/shards"],
}


@pytest.mark.parametrize("name", sorted(DRY_RUNS))
def test_dry_run_matches_expected_file(name, tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the repository's relative paths, without its runs/
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "configs/sweeps/remoteclip_lr.py", *DRY_RUNS[name], "--dry-run"]) == 0
    assert capsys.readouterr().out == (FIXTURES / name).read_text(encoding="utf-8")
    assert not (tmp_path / "runs").exists()


def test_launcher_options_are_checked_by_the_launcher(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "configs/sweeps/remoteclip_lr.py", "--launcher", "tpu", "--launcher-args=--zone z",
                 "--dry-run"]) == 1
    assert "error: --launcher-args: the following arguments are required: --name" in capsys.readouterr().err
    assert main(["sweep", "configs/sweeps/demo_lr.py", "--max-parallel", "2", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[3].endswith(
        "--config.optim.lr=0.1 >> runs/demo_lr/lr=0.1/run.log 2>&1"), lines


# -- the local queue ----------------------------------------------------------------------------------

JOB = """import os, signal, sys, time
d, i = sys.argv[1], sys.argv[2]
def stop(signum, frame):
    open(os.path.join(d, f"stopped_{i}"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(os.path.join(d, f"running_{i}"), "w").close()
print("running", len([n for n in os.listdir(d) if n.startswith("running_")]), flush=True)
deadline = time.monotonic() + 60  # argv[5]: wait until that many jobs run (their handlers are set)
while len([n for n in os.listdir(d) if n.startswith("running_")]) < int(sys.argv[5]) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(float(sys.argv[3]))
os.remove(os.path.join(d, f"running_{i}"))
sys.exit(int(sys.argv[4]))
"""


def _jobs(tmp_path, *specs):
    """Jobs of (seconds, exit code[, jobs to wait for before the seconds start])."""
    def argv(i, spec):
        return [sys.executable, "-c", JOB, str(tmp_path), str(i), *(str(v) for v in (*spec, 0)[:3])]

    return [(f"job{i}", Process(argv(i, spec), dict(os.environ), str(tmp_path / f"job{i}.log")))
            for i, spec in enumerate(specs)]


def test_queue_runs_at_most_k_and_a_failure_does_not_stop_the_others(tmp_path):
    exits = []
    jobs = _jobs(tmp_path, (0.5, 3), (0.5, 0), (0.5, 0), (0.5, 0))
    assert JobQueue(jobs, 2, on_exit=lambda i, code, stopped: exits.append((i, code, stopped))).run() == 0
    assert sorted(exits) == [(0, 3, False), (1, 0, False), (2, 0, False), (3, 0, False)]
    for _, p in jobs:
        text = Path(p.log).read_text()
        assert text.startswith("==== rsclip sweep: job") and int(text.split("running ")[1].split()[0]) <= 2


def _signal_when_running(tmp_path, count, signum=signal.SIGTERM):
    def send():
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("running_*"))) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    threading.Thread(target=send, daemon=True).start()


def test_queue_forwards_sigterm_and_starts_nothing_more(tmp_path, capsys):
    exits = []
    jobs = _jobs(tmp_path, (60, 0), (60, 0), (60, 0))
    _signal_when_running(tmp_path, 2)
    assert JobQueue(jobs, 2, on_exit=lambda i, code, stopped: exits.append((i, code, stopped))).run() == 143
    assert sorted(exits) == [(0, 0, True), (1, 0, True)]  # each saved (here: its handler ran) and exited
    assert (tmp_path / "stopped_0").exists() and (tmp_path / "stopped_1").exists()
    assert jobs[2][1].popen is None
    assert "SIGTERM: forwarded to the 2 running run(s)" in capsys.readouterr().err


def test_queue_fail_fast_stops_the_others(tmp_path, capsys):
    jobs = _jobs(tmp_path, (0, 3, 2), (60, 0), (60, 0))  # job 0 fails once job 1 can act on SIGTERM
    assert JobQueue(jobs, 2, fail_fast=True).run() == 1
    assert jobs[0][1].returncode == 3 and (tmp_path / "stopped_1").exists() and jobs[2][1].popen is None
    err = capsys.readouterr().err
    assert "job0 exited with code 3 after" in err and f"its log: {tmp_path}/job0.log" in err
    assert "--fail-fast: stopping the 1 running run(s)" in err


# -- collect ------------------------------------------------------------------------------------------


def _fake_run(workdir: Path, losses, recall=None, final=None, exit_code=None):
    """A workdir as `rsclip train` leaves it: metrics.jsonl, eval_metrics.jsonl, finished checkpoint folders."""
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": s + 1, "loss": v}) + "\n"
                                                   for s, v in enumerate(losses)))
    if recall is not None:
        (workdir / "eval_metrics.jsonl").write_text(json.dumps({"step": len(losses), "retrieval/mean_recall": recall,
                                                                "retrieval/image_to_text_R@1": recall / 2}) + "\n")
    if final:
        (workdir / "checkpoints" / str(final)).mkdir(parents=True)
    if exit_code is not None:
        (workdir / "sweep_status.json").write_text(json.dumps({"exit_code": exit_code, "stopped_by_sweep": False,
                                                               "log": str(workdir / "run.log")}))


def test_collect_lists_every_run_and_ranks_the_finished_ones(tmp_path, capsys):
    path = _sweep_file(tmp_path, f"""{{"config": {DEMO!r}, "overrides": {{"total_steps": 3}},
        "runs": product({{"optim.lr": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}})}}""")
    root = tmp_path / "root"
    _fake_run(root / "lr=0.0001", [3.0, 2.0, 1.5], recall=20.0, final=3)
    _fake_run(root / "lr=0.001", [3.0, 2.5, 2.1], recall=30.0, final=3)  # best recall
    _fake_run(root / "lr=0.01", [3.0], exit_code=1)  # failed
    _fake_run(root / "lr=0.1", [3.0, 2.0], recall=99.0)  # unfinished: high recall, but no final checkpoint
    argv = ["sweep", path, "--root", str(root), "--collect"]
    assert main([*argv, "--metric", "retrieval/mean_recall", "--mode", "max"]) == 0
    out, err = capsys.readouterr()
    assert f"best run: lr=0.001 (retrieval/mean_recall = 30, max) in {root}/lr=0.001" in err
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["lr=0.0001", "lr=0.001", "lr=0.01", "lr=0.1", "lr=1.0"]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "unfinished", "not started"]
    assert rows[0]["optim.lr"] == "0.0001" and rows[0]["step"] == "3" and float(rows[0]["loss"]) == 1.5
    assert rows[3]["retrieval/mean_recall"] == "99.0" and rows[4]["loss"] == ""
    md = (root / "results.md").read_text()
    assert md == out and "| **lr=0.001** (best) | 0.001 | completed | 3 | 2.1 | 15 | 30 |" in md
    assert f"- lr=0.01: failed (exit code 1; log: {root}/lr=0.01/run.log)" in md
    assert "- lr=0.1: unfinished (step 2 of 3)" in md and "- lr=1.0: not started" in md
    with Image.open(root / "results.png") as im:
        assert im.format == "PNG" and im.width > 200
    assert main(argv) == 0  # default metric: the train loss (demo has no best_metric), lowest first
    assert "best run: lr=0.0001 (loss = 1.5, min)" in capsys.readouterr().err
    assert main([*argv, "--metric", "retrieval/nope", "--mode", "max"]) == 1
    assert "no run logged it; metrics: loss, retrieval/mean_recall" in capsys.readouterr().err


def test_plot_uses_a_log_axis_from_two_decades():
    assert sweep_collect._x_positions(["1e-4", "1e-2"], [1e-4, 1e-2])[2] is True
    assert sweep_collect._x_positions(["1e-3", "1e-2"], [1e-3, 1e-2])[2] is False
    assert sweep_collect._x_positions(["a", "b", "a"], ["a", "b", "a"])[:2] == ([0.0, 1.0, 0.0], ["a", "b"])


# -- acceptance: 4 tiny runs, 2 at a time -------------------------------------------------------------


def _sweep_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "rsclip_jax", "sweep", *args], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def test_local_sweep_runs_skips_finished_resumes_and_collects(train_shards, tmp_path, capsys):
    path = _sweep_file(tmp_path, f"""{{"config": {DEMO!r}, "name": "tiny",
        "overrides": {{"data.train": {str(train_shards)!r}, "data.build_from": "", "evals": {{}}, "batch_size": 8,
                      "total_steps": 2, "log_every_steps": 1, "checkpoint_every_steps": 1, "optim.warmup_steps": 1}},
        "runs": product({{"seed": [0, 1], "optim.lr": [1e-3, 1e-1]}})}}""")
    root = tmp_path / "root"
    argv = [path, "--max-parallel", "2", "--root", str(root)]
    # One device (the quickest compile) and one XLA cache: the second pair of runs (seed 1) reuses
    # the steps the first pair (seed 0) compiled.
    env = _env(devices=1) | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    first = _sweep_cli(*argv, env=env)  # a child process: the runs are forked from a process without JAX
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["seed=0,lr=0.001", "seed=0,lr=0.1", "seed=1,lr=0.001", "seed=1,lr=0.1"]
    assert sorted(p.name for p in root.iterdir()) == names
    for name in names:
        record = json.loads((root / name / "sweep_run.json").read_text())
        assert record["swept"]["optim.lr"] in ("0.001", "0.1") and record["command"].startswith("rsclip train")
        assert '"ended": "completed"' in (root / name / "run.log").read_text()
    assert "0 finished, 4 to run" in first.stderr and "4 of 4 runs finished" in first.stderr

    logs = {n: (root / n / "run.log").read_text() for n in names}
    assert main(["sweep", *argv]) == 0
    err = capsys.readouterr().err
    assert "4 finished, 0 to run" in err and "started" not in err
    assert {n: (root / n / "run.log").read_text() for n in names} == logs  # nothing ran

    shutil.rmtree(root / names[2] / "checkpoints" / "2")  # as if killed before its last save
    assert str(run_status(load_sweep(path, str(root)).runs[2])) == "unfinished (step 2 of 2)"
    resumed = _sweep_cli(*argv, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 finished, 1 to run" in resumed.stderr and f"started {names[2]} (1/1)" in resumed.stderr
    assert "resumed from" in (root / names[2] / "run.log").read_text().split("==== rsclip sweep")[-1]

    assert main(["sweep", path, "--collect", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names and {r["status"] for r in rows} == {"completed"}
    assert all(r["step"] == "2" and float(r["loss"]) > 0 for r in rows)
    assert sum(line.startswith(("| seed=", "| **seed=")) for line in out.splitlines()) == 4
    with Image.open(root / "results.png") as im:
        assert im.format == "PNG"
    best = min(rows, key=lambda r: float(r["loss"]))["run"]
    assert f"best run: {best} (loss = " in err
