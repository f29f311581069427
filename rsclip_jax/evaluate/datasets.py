"""Evaluation datasets: folder-per-class scenes, Karpathy retrieval splits, counting JSON.

* Scenes: `ROOT/<class>/<image>`; or, for datasets with an official split, `ROOT/train/<class>/`
  and `ROOT/test/<class>/`. Which files are images and how they split is `rsclip_jax.data.splits`
  (RemoteCLIP's 8:2 rule when there is no official split: each class's files sorted by name, the
  first floor(0.8 n) train, the rest test), the rule the TFDS scene builder follows too.
* Retrieval: a Karpathy `dataset_*.json` (`rsclip_jax.evaluate.retrieval`).
* Prepared TFDS datasets (`rsclip data tfds`): a scene root or Karpathy JSON given as
  `tfds:<dataset folder>` reads the records instead of files, with the same images, splits,
  order and pixels as the folder they were built from, hence the same results.
* Counting (RemoteCount style, the schema of `data/samples/counting/counting.json`, see
  docs/samples.md): `{"numbers": [1..10], "images_dir": "images", "caption_template": "There are
  {} trees in the picture .", "images": [{"filename": ..., "count": 3, "class_name": "tree",
  "caption_template": ...}]}`. `{}` is where each candidate number goes; an image's own
  `caption_template` overrides the top-level one; `numbers` defaults to 1..10 and `images_dir`
  (relative to the JSON) to `images`.

Missing items raise a `DatasetError` naming them; with `skip_missing=True` they are dropped and
listed in the dataset's `skipped`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from rsclip_jax.data.splits import DEFAULT_TRAIN_FRACTION, EmptyClassError, SceneFolderError, split_scene_folder
from rsclip_jax.evaluate.retrieval import RetrievalSplit, capitalise, load_karpathy_split

TFDS_PREFIX = "tfds:"  # a data path naming a dataset prepared by `rsclip data tfds`
COUNT_RANGE = tuple(range(1, 11))


class DatasetError(ValueError):
    """A dataset is malformed or references something missing; the message names the item."""


@dataclass(frozen=True)
class SceneDataset:
    """A scene classification dataset split into train and test."""

    name: str
    root: str
    folders: list[str]  # class folder names, sorted; labels index this list
    classnames: list[str]  # readable names used in prompts
    train_paths: list[str]
    train_labels: np.ndarray
    test_paths: list[str]
    test_labels: np.ndarray
    split_rule: str  # "official" or "sorted 8:2"
    skipped: list[str] = field(default_factory=list)
    reader: Any = field(default=None, repr=False, compare=False)  # non-file items (TFDS records); None: files

    @property
    def num_classes(self) -> int:
        return len(self.folders)

    def split(self, which: str) -> tuple[list[str], np.ndarray]:
        """("train" | "test" | "all") -> (paths, labels)."""
        if which == "train":
            return self.train_paths, self.train_labels
        if which == "test":
            return self.test_paths, self.test_labels
        if which == "all":
            return self.train_paths + self.test_paths, np.concatenate([self.train_labels, self.test_labels])
        raise ValueError(f"unknown split {which!r}; expected train, test or all")


def is_tfds(path: str | os.PathLike | None) -> bool:
    """Whether a data path names a prepared TFDS dataset (`tfds:<folder>`)."""
    return os.fspath(path or "").startswith(TFDS_PREFIX)


def load_scene_dataset(root: str, name: str | None = None, skip_missing: bool = False,
                       train_fraction: float | None = None) -> SceneDataset:
    """Reads a folder-per-class dataset and splits it (official train/test folders, else 8:2 or
    `train_fraction`), or reads a prepared TFDS scene dataset (`root` = `tfds:<folder>`) with the
    split it was prepared with (a given `train_fraction` must match it).

    Class names for prompts come from the bundled lists for the 12 known datasets (matched by
    `name`, else by the folder's name), otherwise from the folder names made readable.
    """
    root = os.fspath(root)
    if is_tfds(root):
        return _load_tfds_scenes(root, name, train_fraction)
    name = name or os.path.basename(os.path.normpath(root))
    try:
        fraction = DEFAULT_TRAIN_FRACTION if train_fraction is None else train_fraction
        split = split_scene_folder(root, fraction, skip_empty=skip_missing)
    except EmptyClassError as e:
        raise DatasetError(f"{e}; or pass --skip-missing to leave it out") from None
    except SceneFolderError as e:
        raise DatasetError(str(e)) from None
    if len(split.classes) < 2:
        raise DatasetError(f"{root}: a scene dataset needs at least two class folders with images, "
                           f"found {len(split.classes)}")
    return SceneDataset(
        name=name, root=root, folders=split.classes, classnames=classnames_for(name, split.classes),
        train_paths=[os.path.join(root, rel) for rel, _ in split.train],
        train_labels=np.array([i for _, i in split.train], np.int32),
        test_paths=[os.path.join(root, rel) for rel, _ in split.test],
        test_labels=np.array([i for _, i in split.test], np.int32),
        split_rule=split.rule, skipped=split.skipped,
    )


def _open_tfds(ref: str, builder: str) -> Any:
    # tensorflow_datasets takes about a second to import; only tfds: inputs need it.
    from rsclip_jax.data.tfds_prepared import PreparedDatasetError, open_prepared

    try:
        return open_prepared(ref[len(TFDS_PREFIX):], builder)
    except (PreparedDatasetError, OSError) as e:
        raise DatasetError(str(e)) from None  # the message names the folder


def _load_tfds_scenes(ref: str, name: str | None, train_fraction: float | None) -> SceneDataset:
    ds = _open_tfds(ref, "scenes")
    meta = ds.metadata
    official = meta.get("split_rule") == "official"
    if train_fraction is not None and not official and meta.get("train_fraction") != train_fraction:
        raise DatasetError(f"{ref}: prepared with train fraction {meta.get('train_fraction')}, not "
                           f"{train_fraction}; prepare it again with --train-fraction {train_fraction}")
    if len(ds.class_names) < 2:
        raise DatasetError(f"{ref}: a scene dataset needs at least two classes, found {len(ds.class_names)}")
    config = ds.config.split("_train")[0]  # "aid_train70" -> "aid"
    name = name or (os.path.basename(meta["source"]) if config == "custom" and "source" in meta else config)
    rows = {s: ds.records(s) for s in ("train", "test")}
    return SceneDataset(
        name=name, root=ref, folders=ds.class_names, classnames=classnames_for(name, ds.class_names),
        train_paths=[r["item"] for r in rows["train"]],
        train_labels=np.array([r["label"] for r in rows["train"]], np.int32),
        test_paths=[r["item"] for r in rows["test"]],
        test_labels=np.array([r["label"] for r in rows["test"]], np.int32),
        split_rule=meta.get("split_rule", "unknown"), reader=ds.images,
    )


# -- class names and templates (data files under rsclip_jax/resources/eval) ---------------------

def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _resource(*parts: str) -> str:
    return (resources.files("rsclip_jax").joinpath("resources", *parts)).read_text("utf-8")


def known_datasets() -> dict[str, dict]:
    """The bundled zero-shot dataset descriptions (class names, templates, sources)."""
    return {k: v for k, v in json.loads(_resource("eval", "zeroshot_datasets.json")).items() if not k.startswith("_")}


def canonical_dataset_name(name: str) -> str | None:
    """The known dataset `name` refers to (case, dashes and underscores ignored), or None."""
    for key, info in known_datasets().items():
        if _norm(name) in {_norm(key), *map(_norm, info.get("aliases", []))}:
            return key
    return None


def readable(folder: str) -> str:
    """'dense_residential' / 'DenseResidential' / 'sea-lake' -> 'dense residential' / 'sea lake'."""
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder)
    return re.sub(r"[\s_\-]+", " ", s).strip().lower()


def classnames_for(dataset: str, folders: list[str], overrides: dict[str, str] | None = None) -> list[str]:
    """Prompt names of `folders`: user overrides, then the bundled list of a known dataset, then
    the folder name made readable. Folder names match list entries ignoring case and punctuation."""
    table: dict[str, str] = {}
    known = canonical_dataset_name(dataset)
    if known:
        table.update({_norm(k): v for k, v in known_datasets()[known]["classes"].items()})
    table.update({_norm(k): v for k, v in (overrides or {}).items()})
    unmatched = sorted(k for k in (overrides or {}) if _norm(k) not in {_norm(f) for f in folders})
    if unmatched:  # a typo would otherwise silently leave a class with its folder name
        print(f"warning: --classnames keys match no class folder of {dataset}: {', '.join(unmatched)}; "
              f"folders: {', '.join(folders)}", file=sys.stderr)
    return [table.get(_norm(f), readable(f)) for f in folders]


def load_templates(path: str | None = None, dataset: str | None = None) -> list[str]:
    """Prompt templates: a user file, else the known dataset's bundled file, else the default
    remote-sensing ensemble. Lines starting with # are comments; each template needs `{}`."""
    if path is None:
        known = canonical_dataset_name(dataset) if dataset else None
        source = known_datasets()[known].get("templates") if known else None
        text = _resource(*(source or "templates/remote_sensing.txt").split("/"))
        where = source or "remote_sensing.txt"
    else:
        with open(path, encoding="utf-8") as f:
            text, where = f.read(), path
    templates = [t.strip() for t in text.splitlines() if t.strip() and not t.strip().startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise DatasetError(f"{where}: every template needs a {{}} placeholder for the class name; bad: {bad or 'none given'}")
    return templates


def load_classname_overrides(path: str) -> dict[str, str]:
    """A JSON object {folder name: prompt name}."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DatasetError(f"{path}: expected a JSON object mapping folder names to class names")
    return data


# -- retrieval and counting --------------------------------------------------------------------

def check_images(paths: list[str], source: str, skip_missing: bool) -> tuple[np.ndarray, list[str]]:
    """(mask of existing files, missing paths); without skip_missing a missing file is an error."""
    exists = np.array([os.path.isfile(p) for p in paths], bool)
    missing = [p for p, e in zip(paths, exists) if not e]
    if missing and not skip_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{source}: image {missing[0]} does not exist{more}; fix the paths or pass --skip-missing")
    return exists, missing


def load_retrieval(json_path: str, images_dir: str, split: str = "test",
                   skip_missing: bool = False) -> tuple[RetrievalSplit, list[str]]:
    """A Karpathy split without its missing images (and their captions), and the missing paths."""
    data = load_karpathy_split(json_path, images_dir, split)
    exists, missing = check_images(data.image_paths, json_path, skip_missing)
    return subset_retrieval(data, exists), missing


def load_tfds_retrieval(ref: str, split: str = "test") -> tuple[RetrievalSplit, Any, str]:
    """A split of a prepared TFDS Karpathy dataset (`tfds:<folder>`): the split as
    `load_karpathy_split` reads it from the source JSON (captions stripped and capitalised), with
    item names for paths, the reader of those items, and the dataset's name (the source JSON's)."""
    ds = _open_tfds(ref, "retrieval")
    if split not in ds.splits:
        raise DatasetError(f"{ref}: no split {split!r}; it has {', '.join(ds.splits)}")
    paths, texts, owner = [], [], []
    for n, rec in enumerate(ds.records(split)):
        if not rec["captions"]:
            raise DatasetError(f"{ref}: {split}[{n}] ({rec['filename']}) has no captions")
        paths.append(rec["item"])
        texts += [capitalise(c.strip()) for c in rec["captions"]]
        owner += [n] * len(rec["captions"])
    if not paths:
        raise DatasetError(f"{ref}: no images in split {split!r}")
    custom = ds.config == "custom" and "annotations" in ds.metadata
    name = name_from_path(ds.metadata["annotations"]) if custom else ds.config
    return RetrievalSplit(paths, texts, np.asarray(owner, np.int64)), ds.images, name


def name_from_path(path: str) -> str:
    """A dataset's display name from its annotation file: '.../dataset_rsitmd.json' -> 'rsitmd';
    a generic file name (dataset, counting, annotations) takes its folder's name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = stem.removeprefix("dataset_")
    if stem in ("dataset", "counting", "annotations"):
        stem = os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
    return stem


def subset_retrieval(data: RetrievalSplit, keep: np.ndarray) -> RetrievalSplit:
    """The split restricted to images where `keep` is True; captions follow their image."""
    if keep.all():
        return data
    new_index = np.cumsum(keep) - 1
    texts = [t for t, i in zip(data.texts, data.text_to_image) if keep[i]]
    owner = np.array([new_index[i] for i in data.text_to_image if keep[i]], np.int64)
    return RetrievalSplit([p for p, k in zip(data.image_paths, keep) if k], texts, owner)


@dataclass(frozen=True)
class CountingDataset:
    """Images with a true object count and a caption template with `{}` for the number."""

    image_paths: list[str]
    counts: np.ndarray  # (N,) int, each in `numbers`
    templates: list[str]  # (N,) caption templates
    classes: list[str]
    numbers: tuple[int, ...] = COUNT_RANGE  # the candidate counts
    skipped: list[str] = field(default_factory=list)


def load_counting(json_path: str, images_dir: str | None = None, skip_missing: bool = False) -> CountingDataset:
    """Reads a counting JSON (see the module docstring); `images_dir` overrides the JSON's."""
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["images"]
        numbers = tuple(int(n) for n in data.get("numbers", COUNT_RANGE))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{json_path}: not a counting JSON ({e!r}); expected {{'images': [...]}}") from None
    if len(set(numbers)) != len(numbers) or len(numbers) < 2:
        raise DatasetError(f"{json_path}: 'numbers' must be at least two distinct counts, got {list(numbers)}")
    images_dir = images_dir or os.path.join(os.path.dirname(json_path), data.get("images_dir", "images"))
    default_template = data.get("caption_template")
    paths, counts, templates, classes = [], [], [], []
    for n, e in enumerate(entries):
        try:
            name, count = e["filename"], int(e["count"])
            template = str(e.get("caption_template") or default_template or "")
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{json_path}: images[{n}] needs filename and count ({err!r})") from None
        if count not in numbers:
            raise DatasetError(f"{json_path}: images[{n}] ({name}) has count {count}, not one of numbers {list(numbers)}")
        if template.count("{}") != 1:
            raise DatasetError(f"{json_path}: images[{n}] ({name}) needs a caption_template with exactly one {{}} "
                               f"for the number, got {template!r}")
        paths.append(os.path.join(images_dir, name))
        counts.append(count)
        templates.append(template)
        classes.append(str(e.get("class_name", "")))
    if not paths:
        raise DatasetError(f"{json_path}: no images")
    exists, missing = check_images(paths, json_path, skip_missing)
    keep = np.flatnonzero(exists)
    return CountingDataset([paths[i] for i in keep], np.array(counts, np.int64)[keep], [templates[i] for i in keep],
                           [classes[i] for i in keep], numbers, missing)
