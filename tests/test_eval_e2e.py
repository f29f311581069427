"""The evaluator end to end on the bundled samples: sharding, cache, CLI, reports, bad input,
training workdirs and the paper suite (tiny models, 8 simulated CPU devices)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SAMPLES
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from rsclip_jax.checkpoint import CheckpointMismatchError, load_checkpoint
from rsclip_jax.cli.eval import register
from rsclip_jax.evaluate.datasets import DatasetError
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.evaluate.retrieval import METRIC_KEYS, load_karpathy_split, retrieval_metrics
from rsclip_jax.evaluate.suite import Evaluator, discover, run_tasks
from rsclip_jax.preprocess import ImageReadError

FEWSHOT = {"fewshot": {"shots": (1, 2, 4, 8), "seeds": (0, 1, 2)}}
RETRIEVAL = SAMPLES / "retrieval" / "dataset_samples.json"


def eval_cli(*argv: str) -> dict:
    """Runs `rsclip eval ARGV` in-process (exceptions propagate) and returns the JSON report."""
    parser = argparse.ArgumentParser(prog="rsclip")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *map(str, argv)])
    assert args.func(args) == 0
    return json.loads(Path(args.out).read_text())


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, model="tiny-ViT")


@pytest.fixture(scope="module")
def openclip_checkpoint(tmp_path_factory) -> Path:
    """A random-weight open_clip (PyTorch) tiny ViT, converted with the OpenCLIP state_dict."""
    from openclip_reference import build, state_dict_numpy

    from rsclip_jax.checkpoint import save_state_dict
    from rsclip_jax.models import get_model_config

    path = tmp_path_factory.mktemp("openclip") / "openclip_tiny.safetensors"
    save_state_dict(state_dict_numpy(build(get_model_config("tiny-ViT-quickgelu"), seed=3)), path)
    return path


def _metrics(results):
    """Every number of the results except the solver's iteration count: embeddings computed with
    another number of rows per device differ in the last float bits (~1e-7), which moves the step
    at which L-BFGS reaches its tolerance (not the probe it finds: see `_probe_numbers`)."""
    return [(r.task, r.dataset, {k: v for k, v in r.metrics.items() if k != "iterations"}) for r in results]


def _probe_numbers(metrics):
    """The linear probe's and few-shot's choices and accuracies, from a list of metrics dicts."""
    out = []
    for m in metrics:
        if "shots" in m:  # few-shot
            out.append({n: (v["l2"], v["runs"]) for n, v in m["shots"].items()})
        elif "l2" in m:  # linear probe
            out.append((m["l2"], m["val_accuracy"], m["top1"], m["top5"], m["per_class"]))
    return out


def test_sharded_eval_equals_one_device(model):
    """8 devices, 1 device and a (data, fsdp, model) mesh with sharded weights give the same numbers.

    The batch sizes (24, 5, 16) divide none of the sample sets (80 scenes, 36 + 180 retrieval, 22
    counting), so every run ends on a padded, masked batch. With 3 rows per device (8 devices)
    and 5 (1 device) the embeddings differ in their last bits, yet the linear probe and few-shot
    pick the same l2 and give the same accuracies, exactly (float64 solve, linear_probe.py).
    """
    specs = discover(str(SAMPLES), options=FEWSHOT)
    devices = np.array(jax.devices())
    ev8, ev1 = Evaluator(specs, batch_size=24), Evaluator(specs, 5, mesh=jax.sharding.Mesh(devices[:1], ("data",)))
    eight, one = ev8.results(model), ev1.results(model)
    probe8, probe1 = _probe_numbers([r.metrics for r in eight]), _probe_numbers([r.metrics for r in one])
    assert len(probe8) == 2 and probe8 == probe1
    assert len(eight) == 6 and _metrics(eight) == _metrics(one)
    paths = [str(p) for p in sorted((SAMPLES / "scenes" / "forest").iterdir())[:13]]
    np.testing.assert_allclose(ev8.extractor.images(paths).embeddings, ev1.extractor.images(paths).embeddings,
                               atol=1e-5)

    mesh = jax.sharding.Mesh(devices.reshape(2, 4, 1), ("data", "fsdp", "model"))
    from flax import nnx

    graphdef, state = nnx.split(model)
    # Weights sharded as training would (FSDP over 4 devices) before the evaluator sees them.
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 4 == 0
                                                                  else P())), state)
    some = [s for s in specs if s["task"] in ("retrieval", "knn", "counting")]
    fsdp = Evaluator(some, batch_size=16, mesh=mesh).results(nnx.merge(graphdef, state))
    assert _metrics(fsdp) == [m for m in _metrics(eight) if m[0] in ("retrieval", "knn", "counting")]


def test_suite_on_samples_with_a_converted_open_clip_checkpoint(openclip_checkpoint, tmp_path, monkeypatch):
    argv = ["--checkpoint", openclip_checkpoint, "--model", "tiny-ViT-quickgelu", "--suite", "remoteclip",
            "--data-dir", SAMPLES, "--shots", "1,4", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "r.json"]
    report = eval_cli(*argv)
    tasks = [r["task"] for r in report["results"]]
    assert sorted(tasks) == sorted(["retrieval", "zeroshot", "linear_probe", "knn", "fewshot", "counting"])
    assert set(METRIC_KEYS) <= set(report["retrieval"]) and report["retrieval"]["num_images"] == 36
    assert 0 <= report["retrieval"]["mean_recall"] <= 100
    # Sentinel-2 land-use classes: 4 classes, chance is 25%; frozen random features separate them.
    assert report["linear_probe"]["top1"] > 25 and report["knn"]["top1"] > 25
    assert report["zeroshot"]["classnames"] == ["farmland", "forest", "meadow", "residential"]
    assert len(report["zeroshot"]["per_class"]) == 4 and np.sum(report["zeroshot"]["confusion"]) == 16
    assert set(report["fewshot"]["shots"]) == {"1", "4"} and len(report["fewshot"]["shots"]["4"]["runs"]) == 3
    assert report["counting"]["top10"] == 100.0 and report["counting"]["num_images"] == 22
    assert report["config"]["model"]["model"] == "tiny-ViT-quickgelu" and len(report["config"]["model"]["fingerprint"]) == 64
    assert {r["config"]["task"] for r in report["results"]} == set(tasks)  # each result carries its config
    md = (tmp_path / "r.md").read_text()
    assert "| Test set | Model | I→T R@1 |" in md and "| Model | scenes | Average |" in md
    plots = sorted(p.name for p in (tmp_path / "r_plots").iterdir())
    assert plots == ["confusion_openclip_tiny_scenes.png", "counting.png", "fewshot.png", "recall_samples.png",
                     "tsne_openclip_tiny_scenes.png"]
    for p in plots:
        with Image.open(tmp_path / "r_plots" / p) as im:
            assert im.size[0] > 200

    # Second run: every embedding comes from the disk cache, and the numbers are the same.
    assert len(list((tmp_path / "cache").glob("*.npz"))) >= 5
    monkeypatch.setattr(Extractor, "_run", lambda *a, **k: pytest.fail("cache miss"))
    again = eval_cli(*argv[:-1], tmp_path / "again.json")
    assert [r["metrics"] for r in again["results"]] == [r["metrics"] for r in report["results"]]


def test_retrieval_cli_contract(tiny_checkpoint, model, tmp_path):
    report = eval_cli("--checkpoint", tiny_checkpoint, "--model", "tiny-ViT", "--task", "retrieval",
                      "--karpathy-json", RETRIEVAL, "--images", SAMPLES / "retrieval" / "images", "--split", "test",
                      "--no-cache", "--no-plots", "--out", tmp_path / "report.json")
    # Independently: unbatched, unsharded model calls and the retrieval metric.
    from rsclip_jax.preprocess import load_and_preprocess, normalize_images
    from rsclip_jax.tokenizer import tokenize

    split = load_karpathy_split(RETRIEVAL, SAMPLES / "retrieval" / "images")
    pixels = np.stack([load_and_preprocess(p, model.config.vision.image_size) for p in split.image_paths])
    img = np.asarray(model.encode_image(normalize_images(pixels), normalize=True))
    txt = np.asarray(model.encode_text(tokenize(split.texts), normalize=True))
    want = retrieval_metrics(img, txt, split.text_to_image)
    for k in METRIC_KEYS:
        assert report["retrieval"][k] == pytest.approx(want[k]), k


def _copy_scenes(dst: Path, per_class: int = 6) -> Path:
    for c in ("farmland", "forest"):
        (dst / c).mkdir(parents=True)
        for p in sorted((SAMPLES / "scenes" / c).iterdir())[:per_class]:
            shutil.copy(p, dst / c / p.name)
    return dst


def test_bad_input_is_named_or_skipped_and_counted(tiny_checkpoint, tmp_path):
    base = ["--checkpoint", tiny_checkpoint, "--model", "tiny-ViT", "--no-cache", "--no-plots"]
    doc = json.loads(RETRIEVAL.read_text())
    doc["images"][3]["filename"] = "missing.jpg"
    (tmp_path / "k.json").write_text(json.dumps(doc))
    retrieval = [*base, "--task", "retrieval", "--karpathy-json", tmp_path / "k.json",
                 "--images", SAMPLES / "retrieval" / "images"]
    with pytest.raises(DatasetError, match=r"k.json: image .*missing.jpg does not exist"):
        eval_cli(*retrieval, "--out", tmp_path / "a.json")
    r = eval_cli(*retrieval, "--skip-missing", "--out", tmp_path / "a.json")["retrieval"]
    assert r["num_skipped"] == 1 and r["num_images"] == 35 and r["num_texts"] == 175

    scenes = _copy_scenes(tmp_path / "scenes")
    (scenes / "forest" / "zz_broken.png").write_bytes(b"not a png")
    knn = [*base, "--task", "knn", "--scenes", scenes]
    with pytest.raises(ImageReadError, match="zz_broken.png"):
        eval_cli(*knn, "--out", tmp_path / "b.json")
    (scenes / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"scenes/empty: class folder has no images"):
        eval_cli(*knn, "--out", tmp_path / "b.json")
    r = eval_cli(*knn, "--skip-missing", "--out", tmp_path / "b.json")["knn"]
    # forest: 7 files -> 5 train + 2 test, one of them the broken file (sorted last).
    assert r["num_skipped"] == 2 and r["num_test"] == 3 and r["classes"] == ["farmland", "forest"]

    with pytest.raises(CheckpointMismatchError, match=str(tiny_checkpoint.name)):
        eval_cli("--checkpoint", tiny_checkpoint, "--model", "ViT-B-32", *knn[5:], "--out", tmp_path / "c.json")
    with pytest.raises(ValueError, match="--task knn needs --scenes"):
        eval_cli(*base, "--task", "knn", "--out", tmp_path / "d.json")
    with pytest.raises(ValueError, match=r"few-shot shots \(--shots, or the task's 'shots'\) must be a list of "
                                         r"positive integers .*got \(0, 1\): 0 is not one; pass e.g. --shots 1,2"):
        eval_cli(*base, "--task", "fewshot", "--scenes", scenes, "--shots", "0,1", "--out", tmp_path / "e.json")


def test_python_api_for_training(model, tmp_path):
    from rsclip_jax.models import create_model

    specs = [{"task": "knn", "root": str(SAMPLES / "scenes")}, {"task": "retrieval", "karpathy_json": str(RETRIEVAL)}]
    evaluator = Evaluator(specs, batch_size=16)
    first = evaluator(model)
    assert {"knn/scenes/top1", "knn/scenes/top5", "retrieval/samples/mean_recall"} <= set(first)
    assert all(isinstance(v, float) for v in first.values())
    compiled = evaluator.extractor._images_fn
    second = evaluator(create_model("tiny-ViT", seed=7))  # new weights, same architecture
    assert evaluator.extractor._images_fn is compiled and second != first
    assert evaluator(model) == first


def test_training_workdir_checkpoint(model, tmp_path):
    """`--checkpoint WORKDIR` evaluates an rsclip training workdir's latest step."""
    from rsclip_jax.models import create_model
    from rsclip_jax.train.checkpointing import Checkpointer
    from rsclip_jax.train.config import default_config
    from rsclip_jax.train.setup import build_run
    from rsclip_jax.train.step import init_train_state

    config = default_config()
    config.model.name, config.batch_size = "tiny-ViT", 8
    run = build_run(config)
    _, state = init_train_state(create_model("tiny-ViT", seed=5), run.tx)  # what a run saves at step 0

    class NoData:
        def get_state(self):
            return {}

    ckpt = Checkpointer(str(tmp_path / "wd"), use_async=False)
    ckpt.save(3, state, NoData(), config.to_dict(), run.model_config)
    ckpt.close()
    scenes = _copy_scenes(tmp_path / "scenes")
    report = eval_cli("--checkpoint", tmp_path / "wd", "--task", "knn", "--scenes", scenes, "--no-cache",
                      "--no-plots", "--out", tmp_path / "w.json")
    assert report["config"]["model"]["format"] == "rsclip-workdir" and report["config"]["model"]["step"] == 3
    from flax import nnx

    direct = run_tasks(nnx.merge(run.graphdef, state.params, state.rest), [{"task": "knn", "root": str(scenes)}])
    assert report["knn"]["top1"] == direct["knn/scenes/top1"]
    with pytest.raises(CheckpointMismatchError, match="wd"):
        eval_cli("--checkpoint", tmp_path / "wd", "--model", "ViT-B-32", "--task", "knn", "--scenes", scenes,
                 "--out", tmp_path / "x.json")


def test_paper_suite_layout_and_tables(tiny_checkpoint, tmp_path):
    weights, data = tmp_path / "weights", tmp_path / "data"
    weights.mkdir()
    for name in ("RemoteCLIP-tiny.safetensors", "CLIP-tiny.safetensors"):
        shutil.copy(tiny_checkpoint, weights / name)
    rsitmd = data / "retrieval" / "RSITMD"
    (rsitmd / "images").mkdir(parents=True)
    doc = json.loads(RETRIEVAL.read_text())
    doc["images"] = doc["images"][:10]
    (rsitmd / "dataset_rsitmd.json").write_text(json.dumps(doc))
    for e in doc["images"]:
        shutil.copy(SAMPLES / "retrieval" / "images" / e["filename"], rsitmd / "images")
    # Scene folders named as the public releases name them; the paper's names come from the aliases.
    for dataset, folders in (("AID", ("Farmland", "Forest")), ("NWPU-RESISC45", ("forest", "meadow"))):
        for folder in folders:
            src = SAMPLES / "scenes" / folder.lower()
            (data / "scenes" / dataset / folder).mkdir(parents=True)
            for p in sorted(src.iterdir())[:5]:
                shutil.copy(p, data / "scenes" / dataset / folder)

    report = eval_cli("--suite", "remoteclip-paper", "--weights-dir", weights, "--data-dir", data, "--task", "retrieval",
                      "--task", "zeroshot", "--no-cache", "--out", tmp_path / "paper.json")
    assert {(r["model"], r["task"], r["dataset"]) for r in report["results"]} == {
        (m, t, d) for m in ("CLIP-tiny", "RemoteCLIP-tiny")
        for t, d in (("retrieval", "RSITMD"), ("zeroshot", "AID"), ("zeroshot", "RESISC45"))}
    assert "retrieval" not in report  # several results per task: only the list
    assert report["config"]["missing_datasets"]["retrieval"] == ["RSICD", "UCM"]
    assert "EuroSAT" in report["config"]["missing_datasets"]["scenes"]
    assert set(report["config"]["weights"]) == {"CLIP-tiny", "RemoteCLIP-tiny"}
    zs = next(r for r in report["results"] if r["dataset"] == "AID")
    assert zs["metrics"]["classnames"] == ["farmland", "forest"]
    md = (tmp_path / "paper.md").read_text()
    assert "| RSITMD | RemoteCLIP-ViT-B-32 (paper) | 27.88 | 50.66 | 65.71 | 22.17 | 56.46 | 73.41 | 49.38 |" in md
    assert "| RSITMD | RemoteCLIP-tiny |" in md and "| RSITMD | CLIP-tiny |" in md
    assert "| Model | AID | RESISC45 | Average |" in md
    assert "| RemoteCLIP-ViT-B-32 (paper) | 77.96 | – | – |" in md
    assert "arXiv 2306.11029" in md


_TWO_HOSTS = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from rsclip_jax.checkpoint import load_checkpoint
from rsclip_jax.evaluate.suite import Evaluator
specs = json.loads(sys.argv[4])
evaluator = Evaluator(specs, batch_size=24)
metrics = evaluator.results(load_checkpoint(sys.argv[3], model="tiny-ViT"))
assert len(evaluator.extractor.fingerprint) == 64  # replicated weights hash on every host (rsclip eval's report)
print("RESULT " + json.dumps([r.metrics for r in metrics]))
"""


def _two_hosts(specs, tiny_checkpoint, tmp_path, meanwhile):
    """Runs `Evaluator(specs, batch_size=24).results` on 2 local processes x 4 CPU devices
    (jax.distributed over gloo, on a free port), calling `meanwhile()` while they run.

    Returns:
        (each process's metrics, what `meanwhile` returned).
    """
    (tmp_path / "worker.py").write_text(_TWO_HOSTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), f"127.0.0.1:{port}", str(i),
                               str(tiny_checkpoint), json.dumps(specs)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        local = meanwhile()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:  # never leave a worker behind (e.g. waiting for a peer that died)
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    got = [json.loads(next(line for line in o.splitlines() if line.startswith("RESULT "))[7:]) for o, _ in outs]
    return got, local


def test_sharded_eval_on_two_hosts_equals_one_device(model, tiny_checkpoint, tmp_path):
    """2 processes x 4 devices (jax.distributed over gloo): each host decodes its own rows, and
    every host ends with all the numbers, equal to one device's; a missing image is skipped on all.

    The hosts embed 3 rows per device and the one device 5, so the embeddings differ in their last
    bits: the linear probe and few-shot still choose the same l2 and give the same accuracies."""
    doc = json.loads(RETRIEVAL.read_text())
    doc["images"][5]["filename"] = "missing.jpg"
    (tmp_path / "k.json").write_text(json.dumps(doc))
    scenes = str(SAMPLES / "scenes")
    specs = [{"task": "knn", "root": scenes},
             {"task": "retrieval", "karpathy_json": str(tmp_path / "k.json"),
              "images": str(SAMPLES / "retrieval" / "images"), "skip_missing": True},
             {"task": "linear_probe", "root": scenes}, {"task": "fewshot", "root": scenes, **FEWSHOT["fewshot"]}]
    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    got, one = _two_hosts(specs, tiny_checkpoint, tmp_path, lambda: Evaluator(specs, 5, mesh=one_device).results(model))
    want = json.loads(json.dumps([r.metrics for r in one]))
    assert want[1]["num_skipped"] == 1 and len(_probe_numbers(want)) == 2
    assert _probe_numbers(got[0]) == _probe_numbers(got[1]) == _probe_numbers(want)
    drop = lambda ms: [{k: v for k, v in m.items() if k != "iterations"} for m in ms]  # as in _metrics
    assert drop(got[0]) == drop(got[1]) == drop(want)
