"""Evaluations during training: any evaluator task, by name, on the training mesh.

`config.evals` maps a name to a task spec of the evaluator's registry plus an optional cadence:

    c.evals.rsitmd = ConfigDict({"task": "retrieval", "every_steps": 500,
                                 "karpathy_json": "dataset_rsitmd.json", "images": "RSITMD/images"})
    c.evals.scenes = ConfigDict({"task": "knn", "root": "data/samples/scenes"})   # every eval_every_steps

Metrics are logged as `<name>/<metric>` (e.g. `rsitmd/mean_recall`, `scenes/top1`; few-shot:
`<name>/<n>shot`), which is what `best_metric` names. Every eval also runs at the last step.
Embedding runs under the training mesh with the parameters sharded as training holds them, so an
FSDP-sharded ViT-L is never gathered onto one device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx

from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.evaluate.registry import Task
from rsclip_jax.evaluate.tasks import make_task
from rsclip_jax.evaluate.suite import scalar_metrics

# Keys of a `config.evals.<name>` entry that belong to the schedule, not to the task.
SCHEDULE_KEYS = ("every_steps",)


def eval_task_specs(evals: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], int | None]]:
    """{name: (task spec, every_steps or None)} of `config.evals`; errors name the offending key."""
    out = {}
    for name, entry in evals.items():
        if not isinstance(entry, (Mapping, ml_collections.ConfigDict)):
            raise ValueError(f"config.evals.{name} must be a section like {{'task': 'knn', 'root': ...}}, got {entry!r}")
        spec = dict(entry.items()) if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
        every = spec.pop("every_steps", None)
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 0):
            raise ValueError(f"config.evals.{name}.every_steps must be an int >= 0, got {every!r}")
        if "task" not in spec:
            raise ValueError(f"config.evals.{name} has no 'task'; set --config.evals.{name}.task=retrieval|zeroshot|"
                             "linear_probe|knn|fewshot|counting")
        out[name] = ({k: _plain(v) for k, v in spec.items()}, every)
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def build_tasks(evals: Mapping[str, Any]) -> dict[str, tuple[Task, int | None]]:
    """Validated tasks (nothing is loaded yet); a bad option names `config.evals.<name>`."""
    tasks = {}
    for name, (spec, every) in eval_task_specs(evals).items():
        spec.setdefault("name", name)
        try:
            tasks[name] = (make_task(spec), every)
        except ValueError as e:
            raise ValueError(f"config.evals.{name}: {e}") from None
    return tasks


class TrainingEvals:
    """The named evaluations of a run, sharing one compiled `Extractor` on the training mesh.

    Args:
        config: the training config (`evals`, `eval_every_steps`, `eval_batch_size`, `total_steps`).
        mesh: the training mesh.
        graphdef: the model's graph definition (state is swapped in per call).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, graphdef: nnx.GraphDef):
        self.tasks = build_tasks(config.evals)
        self.default_every = config.eval_every_steps
        self.best_metric = config.best_metric
        self.total_steps = config.total_steps
        self.batch_size = config.eval_batch_size
        self.mesh, self.graphdef = mesh, graphdef
        self.extractor: Extractor | None = None

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def due(self, step: int) -> list[str]:
        """The evals that run at `step`: each at its own cadence (0: only at the end), all at the end."""
        names = []
        for name, (_, every) in self.tasks.items():
            every = self.default_every if every is None else every
            if step == self.total_steps or (every > 0 and step % every == 0):
                names.append(name)
        return names

    def check_metric(self, metric: str, results: Mapping[str, float]) -> None:
        """Fails on the first eval of `metric`'s eval that does not produce it (e.g. a typo)."""
        name = metric.split("/", 1)[0]
        produced = sorted(k for k in results if k.startswith(name + "/"))
        if produced and metric not in results:
            raise ValueError(f"best_metric {metric!r} is not a metric of eval {name!r}; it gives {', '.join(produced)}")

    def __call__(self, state: Any, names: list[str]) -> dict[str, float]:
        """`<name>/<metric>` scalars of the named evals for the train state's current weights."""
        model = nnx.merge(self.graphdef, state.params, state.rest)
        if self.extractor is None:
            self.extractor = Extractor(model, self.batch_size, self.mesh, cache_dir=None, progress=False)
        else:
            self.extractor.set_model(model)
        out: dict[str, float] = {}
        for name in names:
            task = self.tasks[name][0]
            result = task.run(self.extractor)
            out.update({f"{name}/{k}": v for k, v in scalar_metrics(task.kind, result.metrics).items()})
        return out
