"""`rsclip data build --task-index I --task-count N` + `--merge`: the same records as one build,
every input once, clear errors for missing or mismatched tasks, resumable tasks."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from rsclip_jax.cli import main
from rsclip_jax.data import pipeline, shards
from rsclip_jax.data.augment import AugmentConfig
from rsclip_jax.data.build import BuildConfig, BuildError, build
from rsclip_jax.data.build_merge import merge
from rsclip_jax.data.tasks import resolve_task, task_share

TILES = Path(__file__).resolve().parent.parent / "data" / "samples" / "tiles"


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return str(path)


def _near_copy(src: Path, dst: Path) -> None:
    """A re-encoded, slightly smaller copy (pHash distance 0-2 from the original)."""
    with Image.open(src) as img:
        rgb = img.convert("RGB")
    rgb.resize((rgb.width * 9 // 10, rgb.height * 9 // 10), Image.BICUBIC).save(dst, quality=80)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> BuildConfig:
    """17 inputs from the real tiles in two sources: good, converted, broken, missing, captionless,
    a test-split leak, and near-copies in `beta` of `alpha` images that other tasks hold."""
    d = tmp_path_factory.mktemp("split")
    (d / "test_images").mkdir()
    for p in TILES.iterdir():
        shutil.copy(p, d / p.name)
    Image.open(TILES / "deepforest_OSBS_029.png").convert("L").save(d / "gray.png")
    (d / "corrupt.jpg").write_bytes((TILES / "deepforest_YELL_541000_4977000.jpg").read_bytes()[:900])
    for name in ("SOAP_031", "OSBS_029"):
        _near_copy(TILES / f"deepforest_{name}.png", d / f"mirror_of_{name}.jpg")
    _near_copy(TILES / "deepforest_SOAP_061.png", d / "test_images" / "t061.jpg")
    (d / "dataset_toy.json").write_text(json.dumps({"images": [{"filename": "t061.jpg", "split": "test"}]}))
    alpha = [(p.name, f"alpha {p.stem}") for p in sorted(TILES.iterdir())]
    alpha += [("gray.png", "grey"), ("corrupt.jpg", "broken"), ("missing.jpg", "gone"), ("blank.png", " ")]
    beta = [("mirror_of_SOAP_031.jpg", "a mirror"), ("deepforest_OSBS_029.png", "the same file"),
            ("mirror_of_OSBS_029.jpg", "another mirror"), ("gray.png", "grey again"), ("extra.jpg", "gone too"),
            ("deepforest_pelicans_drone.jpg", "birds")]
    return BuildConfig(csvs=(_write_csv(d / "alpha.csv", alpha), _write_csv(d / "beta.csv", beta)),
                       out_dir=str(d / "unused"), records_per_shard=2, workers=1,
                       exclude=(str(d / "dataset_toy.json"),), exclude_images=(str(d / "test_images"),))


def _record_set(out: Path) -> list[tuple]:
    """Every record of the build in `out` (through the manifest), decoded, order-free."""
    records = [shards.decode_record(r) for p in shards.shard_paths(out) for r in shards.read_shard(p)]
    return sorted((hashlib.sha256(r.image).hexdigest(), r.captions, r.source, r.original_id, r.width, r.height,
                   r.format, r.phash) for r in records)


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")}


def _split_build(config: BuildConfig, n: int, **merge_kw) -> dict:
    for i in range(n):
        build(dataclasses.replace(config, task_index=i, task_count=n))
    return merge(dataclasses.replace(config, task_count=n, **merge_kw)).manifest


@pytest.mark.parametrize("dedup", [False, True])
def test_three_tasks_and_merge_equal_one_build(inputs, tmp_path, dedup):
    one = build(dataclasses.replace(inputs, out_dir=str(tmp_path / "one"), dedup=dedup)).manifest
    split = dataclasses.replace(inputs, out_dir=str(tmp_path / "three"), dedup=dedup)
    merged = _split_build(split, 3, workers=2)

    assert _record_set(tmp_path / "three") == _record_set(tmp_path / "one")
    for key in ("inputs", "written", "skipped_count", "sources", "skipped", "skip_reasons", "exclude"):
        assert merged[key] == one[key], key
    assert merged["written"] + merged["skipped_count"] == merged["inputs"] == 17 and merged["tasks"] == 3
    assert one["exclude"]["removed"] == 1
    if dedup:
        assert merged["dedup"] == one["dedup"] and one["dedup"]["removed"] == 5
        # beta's copies are in the last task's share, their originals in the first: only the merge sees both
        assert task_share(17, 2, 3) == range(11, 17)
        assert {s["path"].rsplit("/", 1)[1] for s in merged["skipped"] if s["reason"].startswith("duplicate of")} \
            == {"mirror_of_SOAP_031.jpg", "deepforest_OSBS_029.png", "mirror_of_OSBS_029.jpg", "gray.png",
                "deepforest_pelicans_drone.jpg"}
        assert any(s["file"].endswith(".dedup.array_record") for s in merged["shards"])
    # No task wrote a manifest of its own; the merged one lists only the tasks' shards, which train.
    assert all(s["file"].startswith("task-0000") for s in merged["shards"])
    ds = pipeline.train_dataset(shards.shard_paths(tmp_path / "three"), batch_size=2, seed=0,
                                augment=AugmentConfig(image_size=32), shard_options=grain.sharding.NoSharding())
    batch = next(iter(ds))
    assert batch["images"].shape == (2, 32, 32, 3) and batch["images"].dtype == np.uint8


def test_merge_names_missing_and_mismatched_tasks(inputs, tmp_path):
    config = dataclasses.replace(inputs, out_dir=str(tmp_path / "out"))
    build(dataclasses.replace(config, task_index=0, task_count=3))
    build(dataclasses.replace(config, task_index=2, task_count=3))
    with pytest.raises(BuildError, match=r"--merge: task\(s\) 1 of 3 have not finished \(no .*task-00001-of-00003"):
        merge(dataclasses.replace(config, task_count=3))
    build(dataclasses.replace(config, task_index=1, task_count=3, records_per_shard=3))
    with pytest.raises(BuildError, match=r"task 1: records_per_shard 3 \(this merge: 2\); rerun those tasks"):
        merge(dataclasses.replace(config, task_count=3))
    with pytest.raises(BuildError, match=r"task 0: .*task 1: .*task 2: .*its CSVs listed 17 images, this merge's 6"):
        merge(dataclasses.replace(config, task_count=3, csvs=config.csvs[1:], sources=("alpha",)))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rerunning_a_finished_task_writes_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "build", "--csv", inputs.csvs[0], "--csv", inputs.csvs[1], "--out", str(out),
            "--records-per-shard", "2", "--workers", "1", "--dedup", "--task-count", "2"]
    for i in ("0", "1"):
        assert main([*argv, "--task-index", i]) == 0
    assert "task 1 of 2: wrote" in capsys.readouterr().out
    assert main([*argv, "--merge"]) == 0
    before = _files(out)
    assert main([*argv, "--task-index", "1"]) == 0
    assert _files(out) == before  # no file written, touched, added or removed; the manifest stays
    assert main([*argv, "--merge"]) == 0
    assert set(_files(out)) == set(before)


@pytest.mark.parametrize("flags, message", [
    (["--task-index", "3", "--task-count", "3"], "--task-index 3: must be from 0 to 2 for --task-count 3"),
    (["--task-index", "one", "--task-count", "3"], "--task-index 'one': expected a whole number or 'auto'"),
    (["--task-index", "0"], "--task-index needs --task-count too"),
    (["--task-count", "0", "--task-index", "0"], "--task-count 0: must be 1 or more"),
    (["--merge"], "--merge needs --task-count N"),
    (["--merge", "--task-count", "2", "--task-index", "1"], "--merge combines the work of every task"),
])
def test_bad_task_flags_are_one_line_naming_the_flag(inputs, tmp_path, capsys, flags, message):
    argv = ["data", "build", "--csv", inputs.csvs[0], "--out", str(tmp_path / "out"), *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rsclip data: error: {message}")
    assert not (tmp_path / "out").exists()


def test_task_auto_reads_slurm():
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3",
             "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_task("auto", "auto", array) == (1, 3)
    assert resolve_task("auto", None, {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (2, 4)
    assert resolve_task("1", "auto", {"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == (1, 4)  # numbers win
    assert resolve_task(None, None, array) == (0, 1)
    with pytest.raises(ValueError, match="not one of a contiguous range"):
        resolve_task("auto", "auto", {**array, "SLURM_ARRAY_TASK_ID": "10"})
    with pytest.raises(ValueError, match="no SLURM array or step in the environment"):
        resolve_task("auto", "auto", {})
    assert [len(task_share(10, i, 3)) for i in range(3)] == [3, 3, 4]
    assert [i for k in range(4) for i in task_share(5, k, 4)] == list(range(5))


def test_task_files_never_collide_and_single_build_ignores_them(inputs, tmp_path):
    out = tmp_path / "out"
    config = dataclasses.replace(inputs, out_dir=str(out))
    _split_build(config, 2)
    task_files = {f for f in os.listdir(out) if f.startswith("task-")}
    one = build(config).manifest  # a plain build into the same folder keeps the tasks' files
    assert task_files <= set(os.listdir(out))
    assert not any(s["file"].startswith("task-") for s in one["shards"])
