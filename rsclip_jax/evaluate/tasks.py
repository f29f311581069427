"""The six evaluation tasks, registered by name: zeroshot, linear_probe, knn, fewshot, retrieval,
counting. Each is a dataclass of options (see `registry.py`) whose `run(extractor)` loads its data
once, embeds it with the shared `Extractor` (which de-duplicates and caches embeddings, so tasks on
the same scene folder embed each image once) and returns metrics in percent.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from rsclip_jax.evaluate.counting import candidate_captions, counting_metrics
from rsclip_jax.evaluate.datasets import (
    DatasetError,
    SceneDataset,
    classnames_for,
    is_tfds,
    load_classname_overrides,
    load_counting,
    load_retrieval,
    load_scene_dataset,
    load_templates,
    load_tfds_retrieval,
    name_from_path,
    subset_retrieval,
)
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.evaluate.fewshot import SEEDS, SHOTS, check_fewshot_options, fewshot
from rsclip_jax.evaluate.knn import TEMPERATURE, K, knn_classify
from rsclip_jax.evaluate.linear_probe import DEFAULT_L2, L2_GRID, VAL_FRACTION, ProbeConfig, linear_probe
from rsclip_jax.evaluate.registry import TASKS, Task, TaskResult, TaskSpecError, register
from rsclip_jax.evaluate.retrieval import recall_curve, retrieval_metrics, retrieval_ranks
from rsclip_jax.evaluate.zeroshot import zeroshot_metrics

RECALL_CURVE_MAX_K = 50


@dataclass(kw_only=True)
class _SceneTask(Task):
    """Options shared by the tasks on a folder-per-class scene dataset.

    `root`: the folder, or `tfds:<folder>` for a scene dataset prepared by `rsclip data tfds`.
    """

    root: str
    _data: Any = field(default=None, init=False, repr=False, compare=False)

    def dataset(self) -> SceneDataset:
        if self._data is None:
            self._data = load_scene_dataset(self.root, self.name or None, self.skip_missing)
            self.name = self._data.name
        return self._data

    def embed(self, extractor: Extractor, which: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(features, labels, skipped paths) of a split; unreadable images dropped with their labels."""
        paths, labels = self.dataset().split(which)
        emb = extractor.images(paths, self.skip_missing, reader=self.dataset().reader)
        return emb.embeddings, labels[emb.kept], emb.skipped

    def info(self, skipped: list[str]) -> dict[str, Any]:
        ds = self.dataset()
        return {"classes": ds.folders, "split_rule": ds.split_rule, "num_train_images": len(ds.train_paths),
                "num_test_images": len(ds.test_paths), "skipped": ds.skipped + skipped,
                "num_skipped": len(ds.skipped) + len(skipped)}

    def features(self, extractor: Extractor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        train_x, train_y, s1 = self.embed(extractor, "train")
        test_x, test_y, s2 = self.embed(extractor, "test")
        return train_x, train_y, test_x, test_y, s1 + s2

    def artifacts(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Embeddings for the t-SNE plot."""
        return {"embeddings": x, "labels": y, "classnames": self.dataset().classnames}

    def config(self) -> dict[str, Any]:
        # The options only: asdict would deep-copy the loaded dataset (a TFDS reader holds a lock).
        return {"task": self.kind, **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}


@register("zeroshot")
@dataclass(kw_only=True)
class ZeroShot(_SceneTask):
    """Zero-shot top-1/top-5/per-class accuracy on a split (default: the 8:2 test split).

    `templates`: a template file (default: the dataset's bundled file, else remote_sensing.txt);
    `classnames`: a JSON {folder: class name} overriding the bundled names.
    """

    split: str = "test"
    templates: str | None = None
    classnames: str | None = None

    def run(self, extractor: Extractor) -> TaskResult:
        ds = self.dataset()
        overrides = load_classname_overrides(self.classnames) if self.classnames else None
        names = classnames_for(ds.name, ds.folders, overrides)
        templates = load_templates(self.templates, ds.name)
        x, y, skipped = self.embed(extractor, self.split)
        metrics = zeroshot_metrics(x, y, extractor.classifier(names, templates))
        metrics.update(classnames=names, templates=templates, split=self.split, **self.info(skipped))
        return TaskResult(metrics, {**self.artifacts(x, y), "classnames": names})


@register("linear_probe")
@dataclass(kw_only=True)
class LinearProbe(_SceneTask):
    """Logistic regression on frozen features; l2 chosen on a validation split of train."""

    l2_grid: tuple[float, ...] = L2_GRID
    default_l2: float = DEFAULT_L2
    val_fraction: float = VAL_FRACTION
    seed: int = 0

    def probe_config(self) -> ProbeConfig:
        return ProbeConfig(l2_grid=tuple(self.l2_grid), default_l2=self.default_l2,
                           val_fraction=self.val_fraction, seed=self.seed)

    def run(self, extractor: Extractor) -> TaskResult:
        train_x, train_y, test_x, test_y, skipped = self.features(extractor)
        metrics = linear_probe(train_x, train_y, test_x, test_y, self.dataset().num_classes, self.probe_config())
        metrics.update(self.info(skipped))
        return TaskResult(metrics, self.artifacts(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])))


@register("knn")
@dataclass(kw_only=True)
class KNN(_SceneTask):
    """Weighted k-NN vote (weights exp(sim / T))."""

    k: int = K
    temperature: float = TEMPERATURE

    def run(self, extractor: Extractor) -> TaskResult:
        train_x, train_y, test_x, test_y, skipped = self.features(extractor)
        metrics = knn_classify(train_x, train_y, test_x, test_y, self.dataset().num_classes, self.k, self.temperature)
        metrics.update(self.info(skipped))
        return TaskResult(metrics, self.artifacts(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])))


@register("fewshot")
@dataclass(kw_only=True)
class FewShot(LinearProbe):
    """The linear probe on n images per class, for each n and seed (mean and std over seeds)."""

    shots: tuple[int, ...] = SHOTS
    seeds: tuple[int, ...] = SEEDS

    def __post_init__(self) -> None:
        check_fewshot_options(self.shots, self.seeds)  # a bad --shots fails before any model loads

    def run(self, extractor: Extractor) -> TaskResult:
        train_x, train_y, test_x, test_y, skipped = self.features(extractor)
        metrics = fewshot(train_x, train_y, test_x, test_y, self.dataset().num_classes, tuple(self.shots),
                          tuple(self.seeds), self.probe_config())
        metrics.update(self.info(skipped))
        return TaskResult(metrics)


@register("retrieval")
@dataclass(kw_only=True)
class Retrieval(Task):
    """Image-text retrieval on a Karpathy split with RemoteCLIP's semantics (`retrieval.py`).

    `karpathy_json`: the JSON, or `tfds:<folder>` for a Karpathy dataset prepared by
    `rsclip data tfds` (which holds its images). `images` defaults to the `images/` folder beside the JSON.
    """

    karpathy_json: str
    images: str | None = None
    split: str = "test"

    def run(self, extractor: Extractor) -> TaskResult:
        reader, missing = None, []
        if is_tfds(self.karpathy_json):
            if self.images:
                raise DatasetError(f"retrieval: an images folder ({self.images}, --images) goes with a JSON; "
                                   f"{self.karpathy_json} holds its images, so leave it unset")
            data, reader, name = load_tfds_retrieval(self.karpathy_json, self.split)
            self.name = self.name or name
        else:
            images = self.images or os.path.join(os.path.dirname(self.karpathy_json), "images")
            self.name = self.name or name_from_path(self.karpathy_json)
            data, missing = load_retrieval(self.karpathy_json, images, self.split, self.skip_missing)
        emb = extractor.images(data.image_paths, self.skip_missing, reader=reader)
        if emb.skipped:  # unreadable images leave with their captions
            keep = np.zeros(len(data.image_paths), bool)
            keep[emb.kept] = True
            data = subset_retrieval(data, keep)
        txt = extractor.texts(data.texts)
        metrics = retrieval_metrics(emb.embeddings, txt, data.text_to_image)
        i2t, t2i = retrieval_ranks(emb.embeddings, txt, data.text_to_image)
        skipped = missing + emb.skipped
        metrics.update(
            recall_curve={"image_to_text": recall_curve(i2t, min(RECALL_CURVE_MAX_K, len(data.texts))),
                          "text_to_image": recall_curve(t2i, min(RECALL_CURVE_MAX_K, len(data.image_paths)))},
            num_images=len(data.image_paths), num_texts=len(data.texts), skipped=skipped, num_skipped=len(skipped),
        )
        return TaskResult(metrics)


@register("counting")
@dataclass(kw_only=True)
class Counting(Task):
    """RemoteCount-style counting: top-k (k = 1..10) accuracy of the true number's caption.

    `images` overrides the JSON's `images_dir` (default: `images/` beside the JSON).
    """

    json: str
    images: str | None = None

    def run(self, extractor: Extractor) -> TaskResult:
        self.name = self.name or name_from_path(self.json)
        data = load_counting(self.json, self.images, self.skip_missing)
        emb = extractor.images(data.image_paths, self.skip_missing)
        candidates = [candidate_captions(data.templates[i], data.numbers) for i in emb.kept]
        unique = sorted({c for cs in candidates for c in cs})  # images often share a template
        index = {c: i for i, c in enumerate(unique)}
        txt = extractor.texts(unique)
        cand = txt[np.array([[index[c] for c in cs] for cs in candidates], np.int64).reshape(len(candidates), -1)]
        metrics = counting_metrics(emb.embeddings, cand, data.counts[emb.kept], data.numbers)
        skipped = data.skipped + emb.skipped
        metrics.update(skipped=skipped, num_skipped=len(skipped))
        return TaskResult(metrics)


# -- building tasks from specs (here, where every task class is registered) ---------------------

def task_names() -> list[str]:
    """The registered task kinds, sorted."""
    return sorted(TASKS)


def make_task(spec: Mapping[str, Any] | Task) -> Task:
    """Builds a task from {"task": KIND, option: value, ...} (a Task passes through)."""
    if isinstance(spec, Task):
        return spec
    spec = dict(spec)
    kind = spec.pop("task", None)
    if kind not in TASKS:
        raise TaskSpecError(f"unknown task {kind!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[kind]
    options = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(spec) - set(options))
    if unknown:
        raise TaskSpecError(f"task {kind!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(options))}")
    for key, f in options.items():
        if key in spec and isinstance(spec[key], list) and "tuple" in str(f.type):
            spec[key] = tuple(spec[key])  # JSON and ml_collections give lists
    try:
        return cls(**spec)
    except TypeError as e:
        raise TaskSpecError(f"task {kind!r}: {e}") from None
