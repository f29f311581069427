"""The task registry (big_vision style): a task is a small class built from a plain dict.

    spec = {"task": "knn", "root": "data/samples/scenes", "k": 20}
    task = make_task(spec)          # validates the keys, loads nothing yet
    result = task.run(extractor)    # -> TaskResult(metrics, artifacts)

Specs are plain dicts so that training configs (ml_collections) and JSON files can hold them.
Every option is a dataclass field with its default; an unknown key is an error naming the task.
"""

from __future__ import annotations

import abc

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

TASKS: dict[str, type[Task]] = {}


class TaskSpecError(ValueError):
    """A task spec names an unknown task or option, or lacks a required one."""


@dataclass
class TaskResult:
    """What one task returns: JSON-able metrics, and arrays for plots (kept out of the JSON)."""

    metrics: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Task(abc.ABC):
    """Base class: subclasses are dataclasses of options with a `run(extractor)` method.

    `name` is the dataset's display name in reports (default: derived from the data path);
    `skip_missing` skips and counts missing or unreadable images instead of stopping.
    """

    kind: ClassVar[str] = ""
    name: str = ""
    skip_missing: bool = False

    @abc.abstractmethod
    def run(self, extractor: Any) -> TaskResult:
        """Embeds what the task needs with `extractor` and computes its metrics."""

    def config(self) -> dict[str, Any]:
        """The options that produced a result (for the report)."""
        return {"task": self.kind, **dataclasses.asdict(self)}


def register(kind: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a task under `kind`."""

    def wrap(cls: type[Task]) -> type[Task]:
        cls.kind = kind
        TASKS[kind] = cls
        return cls

    return wrap


def task_names() -> list[str]:
    _load()
    return sorted(TASKS)


def make_task(spec: Mapping[str, Any] | Task) -> Task:
    """Builds a task from {"task": KIND, option: value, ...} (a Task passes through)."""
    if isinstance(spec, Task):
        return spec
    _load()
    spec = dict(spec)
    kind = spec.pop("task", None)
    if kind not in TASKS:
        raise TaskSpecError(f"unknown task {kind!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise TaskSpecError(f"task {kind!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    for key, f in fields.items():
        if key in spec and isinstance(spec[key], list) and "tuple" in str(f.type):
            spec[key] = tuple(spec[key])  # JSON and ml_collections give lists
    try:
        return cls(**spec)
    except TypeError as e:
        raise TaskSpecError(f"task {kind!r}: {e}") from None


def _load() -> None:
    # The task classes live in tasks.py, which imports this module; import it on first use.
    if not TASKS:
        import rsclip_jax.evaluate.tasks  # noqa: F401
