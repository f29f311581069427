"""The task registry (big_vision style): a task is a small class built from a plain dict.

    spec = {"task": "knn", "root": "data/samples/scenes", "k": 20}
    task = make_task(spec)          # (tasks.py) validates the keys, loads nothing yet
    result = task.run(extractor)    # -> TaskResult(metrics, artifacts)

Specs are plain dicts so that training configs (ml_collections) and JSON files can hold them.
Every option is a dataclass field with its default; an unknown key is an error naming the task.
"""

from __future__ import annotations

import abc

import dataclasses
from collections.abc import Callable
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
