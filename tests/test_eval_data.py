"""Evaluation data: scene splits, bundled class names and templates, counting and retrieval inputs,
the data-dir layout and the published numbers file (no model needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

from rsclip_jax.evaluate.datasets import (
    DatasetError,
    canonical_dataset_name,
    classnames_for,
    known_datasets,
    load_counting,
    load_retrieval,
    load_scene_dataset,
    load_templates,
)
from rsclip_jax.evaluate.registry import TaskSpecError
from rsclip_jax.evaluate.tasks import make_task
from rsclip_jax.evaluate.report import paper_numbers
from rsclip_jax.evaluate.retrieval import METRIC_KEYS
from rsclip_jax.evaluate.suite import discover


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def test_sorted_8_to_2_split(tmp_path):
    # Names out of order on purpose: the split follows the sorted names, not creation order.
    for name in ["b_07", "b_01", "b_10", "b_03", "b_02", "b_09", "b_04", "b_05", "b_06", "b_08", "b_11", "b_12"]:
        _png(tmp_path / "beach" / f"{name}.png")
    for i in range(5):
        _png(tmp_path / "forest" / f"f{i}.jpg")
    (tmp_path / "forest" / "notes.txt").write_text("not an image: ignored")
    (tmp_path / "forest" / "._f0.jpg").write_bytes(b"\0\5\26\7")  # macOS AppleDouble: not an image
    (tmp_path / ".thumbnails").mkdir()  # hidden: not a class
    _png(tmp_path / "single" / "only.png")  # a one-image class goes to test (floor(0.8) = 0)
    ds = load_scene_dataset(str(tmp_path), "mine")
    assert ds.folders == ["beach", "forest", "single"] and ds.split_rule == "sorted 8:2"
    assert [Path(p).stem for p in ds.train_paths[:9]] == [f"b_{i:02d}" for i in range(1, 10)]
    assert [Path(p).stem for p in ds.test_paths] == ["b_10", "b_11", "b_12", "f4", "only"]
    assert ds.train_labels.tolist() == [0] * 9 + [1] * 4 and ds.test_labels.tolist() == [0, 0, 0, 1, 2]


def test_official_split_folders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png")
    ds = load_scene_dataset(str(tmp_path))
    assert ds.split_rule == "official" and len(ds.train_paths) == 6 and len(ds.test_paths) == 4
    shutil.rmtree(tmp_path / "test" / "b")
    with pytest.raises(DatasetError, match="'b' is in only one of train/ and test/"):
        load_scene_dataset(str(tmp_path))


def test_empty_class_folder_is_an_error_or_skipped(tmp_path):
    for c in ("a", "b"):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match=r"empty_class: class folder has no images"):
        load_scene_dataset(str(tmp_path))
    ds = load_scene_dataset(str(tmp_path), skip_missing=True)
    assert ds.folders == ["a", "b"] and ds.skipped == [str(tmp_path / "empty_class")]


def test_bundled_classnames_of_the_12_datasets():
    sizes = {"AID": 30, "EuroSAT": 10, "MLRSNet": 46, "RESISC45": 45, "OPTIMAL-31": 31, "PatternNet": 38,
             "RSC11": 11, "RS2800": 7, "RSI-CB128": 45, "RSI-CB256": 35, "SIRI-WHU": 12, "WHU-RS19": 19}
    known = known_datasets()
    assert set(known) == set(sizes)
    for name, n in sizes.items():
        assert len(set(known[name]["classes"].values())) == n, name
        assert known[name]["source"]
    assert canonical_dataset_name("NWPU-RESISC45") == "RESISC45"
    assert canonical_dataset_name("rssCN7") == "RS2800" and canonical_dataset_name("mine") is None
    # Folder spellings of different releases map to the same names; unknown folders stay readable.
    assert classnames_for("AID", ["DenseResidential", "Parking", "Golf_Course"]) == [
        "dense residential area", "parking lot", "golf course"]
    assert classnames_for("RSSCN7", ["aGrass", "dRiverLake"]) == ["grass", "river or lake"]
    assert classnames_for("MLRSNet", ["swimmimg_pool"]) == ["swimming pool"]
    assert classnames_for("mine", ["SeaLake"], {"sealake": "sea or lake"}) == ["sea or lake"]


def test_templates(tmp_path):
    default = load_templates()
    assert "a satellite photo of {}." in default and all("{}" in t for t in default)
    assert load_templates(dataset="AID") == default  # no per-dataset override bundled
    (tmp_path / "t.txt").write_text("# comment\nan image of {}\n\n", encoding="utf-8")
    assert load_templates(str(tmp_path / "t.txt")) == ["an image of {}"]
    (tmp_path / "bad.txt").write_text("an image of {}\nno placeholder\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.txt: every template needs a \{\}.*no placeholder"):
        load_templates(str(tmp_path / "bad.txt"))


def test_counting_json_of_the_samples_and_its_errors(tmp_path):
    ds = load_counting(str(SAMPLES / "counting" / "counting.json"))
    assert len(ds.image_paths) == len(ds.counts) >= 10 and set(ds.counts) <= set(range(1, 11))
    assert ds.numbers == tuple(range(1, 11)) and all(Path(p).is_file() for p in ds.image_paths)
    assert ds.templates[0].format(3) == "There are 3 trees in the picture ."

    _png(tmp_path / "images" / "a.png")
    entries = [{"filename": "a.png", "count": 2}, {"filename": "gone.png", "count": 3, "caption_template": "{} cars ."}]
    doc = {"caption_template": "There are {} trees .", "images": entries}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"c.json: image .*gone.png does not exist"):
        load_counting(str(tmp_path / "c.json"))
    ds = load_counting(str(tmp_path / "c.json"), skip_missing=True)
    assert ds.counts.tolist() == [2] and ds.skipped == [str(tmp_path / "images" / "gone.png")]
    entries[0]["count"] = 11
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"images\[0\] \(a.png\) has count 11"):
        load_counting(str(tmp_path / "c.json"))


def test_retrieval_missing_image_named_or_skipped_with_its_captions(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "c.png")
    entries = [{"filename": f, "split": "test", "sentences": [{"raw": f"{f} one"}, {"raw": f"{f} two"}]}
               for f in ("a.png", "b.png", "c.png")]
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    with pytest.raises(DatasetError, match=r"k.json: image .*b.png does not exist"):
        load_retrieval(str(tmp_path / "k.json"), str(tmp_path / "images"))
    data, missing = load_retrieval(str(tmp_path / "k.json"), str(tmp_path / "images"), skip_missing=True)
    assert missing == [str(tmp_path / "images" / "b.png")]
    assert data.texts == ["A.png one", "A.png two", "C.png one", "C.png two"]  # capitalised
    assert data.text_to_image.tolist() == [0, 0, 1, 1]


def test_discover_layouts(tmp_path):
    specs = discover(str(SAMPLES))
    kinds = [(s["task"], s.get("name")) for s in specs]
    assert ("retrieval", None) in kinds and ("counting", None) in kinds
    assert [k for k, n in kinds if n == "scenes"] == ["zeroshot", "linear_probe", "knn", "fewshot"]
    for s in specs:
        make_task(s)  # every discovered spec is a valid task

    # One dataset per subfolder, with per-task options.
    for ds in ("AID", "EuroSAT"):
        for c in ("x", "y"):
            _png(tmp_path / "scenes" / ds / c / "0.png")
    (tmp_path / "retrieval" / "RSITMD").mkdir(parents=True)
    (tmp_path / "retrieval" / "RSITMD" / "dataset_rsitmd.json").write_text("{}")
    specs = discover(str(tmp_path), tasks=("knn", "retrieval"), options={"knn": {"k": 5}}, skip_missing=True)
    assert [(s["task"], s["name"]) for s in specs] == [("retrieval", "RSITMD"), ("knn", "AID"), ("knn", "EuroSAT")]
    assert specs[1]["k"] == 5 and all(s["skip_missing"] for s in specs)
    with pytest.raises(FileNotFoundError, match="found no data for tasks counting"):
        discover(str(tmp_path), tasks=("counting",))


def test_task_specs_are_validated():
    with pytest.raises(TaskSpecError, match="unknown task 'nope'"):
        make_task({"task": "nope"})
    with pytest.raises(TaskSpecError, match=r"task 'knn': unknown option\(s\) kk"):
        make_task({"task": "knn", "root": "x", "kk": 3})
    with pytest.raises(TaskSpecError, match="root"):
        make_task({"task": "knn"})
    assert make_task({"task": "fewshot", "root": "x", "shots": [1, 2]}).shots == (1, 2)


def test_published_numbers_file_is_consistent():
    paper = paper_numbers()
    assert "2306.11029" in paper["source"]
    rows = paper["retrieval"]["rows"]
    assert {r["dataset"] for r in rows} == {"RSITMD", "RSICD", "UCM"} and len(rows) == 8
    for r in rows:  # the published mean recall is the mean of the six published recalls
        assert np.mean([r[k] for k in METRIC_KEYS[:-1]]) == pytest.approx(r["mean_recall"], abs=0.01), r
    b32 = next(r for r in rows if r["dataset"] == "RSITMD" and r["model"] == "RemoteCLIP-ViT-B-32")
    assert b32["mean_recall"] == 49.38
    assert {(r["model"], r["top1"]) for r in paper["zeroshot"]["rows"]} == {
        ("CLIP-ViT-B-32", 68.62), ("RemoteCLIP-ViT-B-32", 77.96)}
    assert len(paper["fewshot"]["rows"]) == 8


def test_classname_override_keys_that_match_no_folder_are_named(capsys):
    from rsclip_jax.evaluate.datasets import classnames_for

    names = classnames_for("mine", ["forest", "river"], {"Forest": "dense forest", "rivr": "a river"})
    assert names == ["dense forest", "river"]
    err = capsys.readouterr().err
    assert "rivr" in err and "match no class folder" in err and "Forest" not in err
