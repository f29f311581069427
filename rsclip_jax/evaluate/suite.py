"""Running tasks: the Python API (also used by training) and the data-dir layout of the suites.

    from rsclip_jax.evaluate.suite import Evaluator, run_tasks
    metrics = run_tasks(model, [{"task": "knn", "root": "data/samples/scenes"}])   # flat floats
    evaluator = Evaluator(specs, mesh=run.mesh)     # in training: compile once, call per eval
    metrics = evaluator(model)                      # {"knn/scenes/top1": ..., ...}

Data-dir layout (`discover`), every part optional:

    DIR/retrieval/  *.json + images/            one Karpathy split per JSON (sharing images/), or
                    <NAME>/{*.json, images/}    one dataset per subfolder
    DIR/scenes/     <class>/<image>             one scene dataset (zeroshot, linear_probe, knn, fewshot), or
                    <NAME>/<class>/<image>      one per subfolder (also <NAME>/{train,test}/<class>/)
    DIR/counting/   *.json + images/            one counting set per JSON, or <NAME>/{*.json, images/}
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax

from rsclip_jax.evaluate.embeddings import Extractor, TextTokenizer
from rsclip_jax.evaluate.registry import Task, TaskResult
from rsclip_jax.evaluate.tasks import make_task
from rsclip_jax.models import CLIP
from rsclip_jax.preprocess import is_image_name

SCENE_TASKS = ("zeroshot", "linear_probe", "knn", "fewshot")
ALL_TASKS = ("retrieval", *SCENE_TASKS, "counting")
# Headline scalar per task, for training logs and summaries.
HEADLINE = {"retrieval": "mean_recall", "zeroshot": "top1", "linear_probe": "top1", "knn": "top1", "counting": "top1"}


@dataclass
class Result:
    """One task on one dataset (and, in the paper suite, one model)."""

    task: str
    dataset: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    seconds: float
    model: str = ""
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)


class Evaluator:
    """Runs a fixed list of tasks on successive models, reusing one compiled `Extractor`.

    Args:
        tasks: task specs ({"task": KIND, ...}) or Task objects; data is loaded on first use.
        batch_size, mesh, cache_dir: see `Extractor` (cache_dir None: no disk cache).
    """

    def __init__(self, tasks: Sequence[Mapping[str, Any] | Task], batch_size: int = 64,
                 mesh: jax.sharding.Mesh | None = None, cache_dir: str | None = None, verbose: bool = False,
                 tokenizer: TextTokenizer | None = None):
        self.tasks = [make_task(t) for t in tasks]
        self.batch_size, self.mesh, self.cache_dir, self.verbose = batch_size, mesh, cache_dir, verbose
        self.tokenizer = tokenizer
        self.extractor: Extractor | None = None

    def results(self, model: CLIP, label: str = "") -> list[Result]:
        """Every task's full result for `model`."""
        if self.extractor is None:
            self.extractor = Extractor(model, self.batch_size, self.mesh, self.cache_dir, tokenizer=self.tokenizer)
        else:
            self.extractor.set_model(model)
        out = []
        for task in self.tasks:
            t0 = time.time()
            r: TaskResult = task.run(self.extractor)
            out.append(Result(task.kind, task.name, r.metrics, task.config(), time.time() - t0, label, r.artifacts))
            if self.verbose:
                print(f"[eval] {label + ' ' if label else ''}{task.kind} on {task.name}: "
                      f"{_headline(out[-1])} ({out[-1].seconds:.1f}s)", file=sys.stderr)
        return out

    def __call__(self, model: CLIP) -> dict[str, float]:
        """Flat scalar metrics `<task>/<dataset>/<metric>` (for training logs)."""
        return scalars(self.results(model))


def run_tasks(model: CLIP, tasks: Sequence[Mapping[str, Any] | Task], batch_size: int = 64,
              mesh: jax.sharding.Mesh | None = None, cache_dir: str | None = None) -> dict[str, float]:
    """One-shot form of `Evaluator(tasks, ...)(model)`."""
    return Evaluator(tasks, batch_size, mesh, cache_dir)(model)


def scalars(results: Sequence[Result]) -> dict[str, float]:
    """The numeric top-level metrics of each result as `<task>/<dataset>/<metric>` (few-shot:
    `fewshot/<dataset>/<n>shot`)."""
    out: dict[str, float] = {}
    for r in results:
        out.update({f"{r.task}/{r.dataset}/{k}": v for k, v in scalar_metrics(r.task, r.metrics).items()})
    return out


def scalar_metrics(task: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """A task result's numeric top-level metrics (few-shot: `<n>shot`, the mean over seeds)."""
    if task == "fewshot":
        return {f"{n}shot": float(v["mean"]) for n, v in metrics["shots"].items()}
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("num_")}


def _headline(r: Result) -> str:
    if r.task == "fewshot":
        return ", ".join(f"{n}-shot {v['mean']:.2f}" for n, v in r.metrics["shots"].items())
    key = HEADLINE[r.task]
    return f"{key} {r.metrics[key]:.2f}"


# -- data-dir layout ---------------------------------------------------------------------------

def _jsons(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json"))


def _subdirs(folder: str) -> list[str]:
    return sorted(os.path.join(folder, d) for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def _has_images(folder: str) -> bool:
    return any(is_image_name(f) for f in os.listdir(folder))


def _json_sets(folder: str, kind: str, key: str) -> list[dict[str, Any]]:
    """Specs for `folder/*.json` (images in folder/images) or one per subfolder holding a JSON."""
    if _jsons(folder):
        return [{"task": kind, key: j, "images": os.path.join(folder, "images")} for j in _jsons(folder)]
    out = []
    for sub in _subdirs(folder):
        found = _jsons(sub)
        if found:
            preferred = [j for j in found if os.path.basename(j).startswith("dataset")] or found
            out.append({"task": kind, key: preferred[0], "images": os.path.join(sub, "images"),
                        "name": os.path.basename(sub)})
    return out


def scene_roots(folder: str) -> list[tuple[str, str]]:
    """[(name, root)]: `folder` itself if its subfolders hold images (or train/ and test/), else
    each subfolder."""
    subs = _subdirs(folder)
    names = {os.path.basename(s) for s in subs}
    if {"train", "test"} <= names or any(_has_images(s) for s in subs):
        return [(os.path.basename(os.path.normpath(folder)), folder)]
    return [(os.path.basename(s), s) for s in subs]


def discover(data_dir: str, tasks: Sequence[str] = ALL_TASKS, options: Mapping[str, Mapping[str, Any]] | None = None,
             skip_missing: bool = False) -> list[dict[str, Any]]:
    """Task specs for everything under `data_dir` in the layout of the module docstring.

    `options` maps a task name to extra options for all its specs (e.g. {"knn": {"k": 10}}).

    Raises:
        FileNotFoundError: when `data_dir` is missing or holds none of the requested tasks' data.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such data directory")
    specs: list[dict[str, Any]] = []
    part = lambda name: os.path.join(data_dir, name)
    if "retrieval" in tasks and os.path.isdir(part("retrieval")):
        specs += _json_sets(part("retrieval"), "retrieval", "karpathy_json")
    if os.path.isdir(part("scenes")):
        for name, root in scene_roots(part("scenes")):
            specs += [{"task": t, "root": root, "name": name} for t in SCENE_TASKS if t in tasks]
    if "counting" in tasks and os.path.isdir(part("counting")):
        specs += _json_sets(part("counting"), "counting", "json")
    if not specs:
        raise FileNotFoundError(f"{data_dir}: found no data for tasks {', '.join(tasks)}; expected retrieval/, "
                                "scenes/ or counting/ (see docs/evaluation.md)")
    for s in specs:
        s.update((options or {}).get(s["task"], {}))
        s["skip_missing"] = skip_missing
    return specs
