"""The one scene split rule (rsclip_jax.data.splits) and the one image-type rule (preprocess), and
that the evaluator and the TFDS scene builder follow them identically on the bundled scenes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import SAMPLES

from rsclip_jax.data.splits import SceneFolderError, split_counts, split_rule, split_scene_folder
from rsclip_jax.data.tfds_prepared import open_prepared, prepare_dataset
from rsclip_jax.evaluate.datasets import load_scene_dataset
from rsclip_jax.preprocess import IMAGE_EXTENSIONS, is_image_name

SCENES = SAMPLES / "scenes"


@pytest.mark.parametrize(("n", "fraction", "expected"), [
    (20, 0.8, (16, 4)), (7, 0.8, (5, 2)), (13, 0.8, (10, 3)), (2, 0.8, (1, 1)), (0, 0.8, (0, 0)),
    (1, 0.8, (0, 1)),  # a one-image class goes to test, so every class keeps a test image
    (35, 0.8, (28, 7)),  # 0.8 * 35 = 28.000000000000004 in floats
    (100, 0.29, (29, 71)),  # 0.29 * 100 = 28.999999999999996 in floats: a naive floor gives 28
    (10, 0.7, (7, 3)), (3, 1.0, (3, 0)), (3, 0.0, (0, 3)),
])
def test_split_counts_floor_on_decimal_fraction(n: int, fraction: float, expected: tuple[int, int]) -> None:
    assert split_counts(n, fraction) == expected


def test_split_counts_rejects_fraction_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        split_counts(10, 1.2)
    with pytest.raises(ValueError, match="train_fraction"):
        split_scene_folder(SCENES, -0.1)


def test_split_rule_names() -> None:
    assert [split_rule(f) for f in (0.8, 0.7, 0.75)] == ["sorted 8:2", "sorted 7:3", "sorted 75:25"]


def test_image_names_one_list_and_no_hidden_files() -> None:
    assert len(IMAGE_EXTENSIONS) == len(set(IMAGE_EXTENSIONS)) == 9
    assert all(is_image_name(f"x{ext}") and is_image_name(f"X{ext.upper()}") for ext in IMAGE_EXTENSIONS)
    assert not any(is_image_name(n) for n in ("._x.jpg", ".DS_Store", "notes.txt", "x.jpg.txt", "x.npy"))


def test_bundled_scenes_split_8_to_2_by_sorted_name() -> None:
    split = split_scene_folder(SCENES)
    assert split.classes == ["farmland", "forest", "meadow", "residential"] and split.rule == "sorted 8:2"
    for label, cls in enumerate(split.classes):
        names = sorted(os.listdir(SCENES / cls))
        assert [rel for rel, i in split.train if i == label] == [f"{cls}/{n}" for n in names[:16]]
        assert [rel for rel, i in split.test if i == label] == [f"{cls}/{n}" for n in names[16:]]


def test_official_split_folders_and_errors(tmp_path: Path) -> None:
    for part, take in (("train", slice(0, 3)), ("test", slice(3, 5))):
        for cls in ("forest", "meadow"):
            (tmp_path / part / cls).mkdir(parents=True)
            for f in sorted(os.listdir(SCENES / cls))[take]:
                shutil.copy(SCENES / cls / f, tmp_path / part / cls / f)
    split = split_scene_folder(tmp_path)
    assert split.rule == "official" and split.classes == ["forest", "meadow"]
    assert [rel.split("/")[:2] for rel, _ in split.train] == [["train", "forest"]] * 3 + [["train", "meadow"]] * 3
    assert len(split.test) == 4 and {i for _, i in split.test} == {0, 1}
    ds = load_scene_dataset(str(tmp_path))  # the evaluator and the builder take the official split alike
    prepared = open_prepared(prepare_dataset("scenes", "custom", tmp_path / "tfds", tmp_path).path)
    for which in ("train", "test"):
        paths, labels = ds.split(which)
        assert [(r["filename"], r["label"]) for r in prepared.records(which)] == \
            [(os.path.relpath(p, tmp_path), int(y)) for p, y in zip(paths, labels)]
    assert prepared.metadata["split_rule"] == ds.split_rule == "official"
    shutil.rmtree(tmp_path / "test" / "meadow")
    with pytest.raises(SceneFolderError, match="'meadow' is in only one of train/ and test/"):
        split_scene_folder(tmp_path)
    with pytest.raises(SceneFolderError, match="no such scene folder"):
        split_scene_folder(tmp_path / "nope")


@pytest.mark.parametrize("fraction", [0.8, 0.7])
def test_evaluator_and_tfds_builder_split_the_bundled_scenes_identically(tmp_path: Path, fraction: float) -> None:
    ds = load_scene_dataset(str(SCENES), train_fraction=fraction)
    prepared = open_prepared(prepare_dataset("scenes", "custom", tmp_path, SCENES, train_fraction=fraction).path)
    assert prepared.class_names == ds.folders
    assert prepared.metadata["split_rule"] == ds.split_rule == split_rule(fraction)
    for which in ("train", "test"):
        paths, labels = ds.split(which)
        folder = [(os.path.relpath(p, SCENES), int(y)) for p, y in zip(paths, labels)]
        records = [(r["filename"], r["label"]) for r in prepared.records(which)]
        assert records == folder
        assert len(records) == {"train": 4 * int(20 * fraction), "test": 4 * (20 - int(20 * fraction))}[which]
