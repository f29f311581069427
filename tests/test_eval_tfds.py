"""`rsclip data tfds` then `rsclip eval` on `tfds:` inputs: the same numbers as on the source folders
(tiny random model, bundled samples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLES

from rsclip_jax.cli import main
from rsclip_jax.data.tfds_prepared import prepare_dataset
from rsclip_jax.evaluate.datasets import DatasetError, load_scene_dataset

SCENE_TASKS = ("zeroshot", "linear_probe", "knn", "fewshot")


def _prepare(capsys: pytest.CaptureFixture, *argv: str) -> tuple[str, str]:
    """(stdout, stderr) of `rsclip data tfds ARGV`; stdout must be the prepared folder alone."""
    assert main(["data", "tfds", *argv]) == 0
    out, err = capsys.readouterr()
    assert "\n" not in out.strip() and (Path(out.strip()) / "dataset_info.json").is_file()
    return out.strip(), err


def _eval(checkpoint: Path, out: Path, *argv: str) -> list[dict]:
    base = ["eval", "--checkpoint", str(checkpoint), "--model", "tiny-ViT", "--no-cache", "--no-plots"]
    assert main([*base, *argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The bundled scenes and retrieval samples, prepared once: {builder: folder}."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return {builder: str(prepare_dataset(builder, "custom", data_dir, SAMPLES / builder).path)
            for builder in ("scenes", "retrieval")}


def test_data_tfds_command_prints_the_folder_and_reuses_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--builder", "scenes", "--source", str(SAMPLES / "scenes"), "--data-dir", str(tmp_path)]
    path, err = _prepare(capsys, *argv)
    assert path == str(tmp_path / "remoteclip_scenes" / "custom" / "1.1.0")
    assert "remoteclip_scenes/custom:1.1.0: built; test 16, train 64 records" in err
    assert f"--scenes tfds:{path}" in err
    again, err = _prepare(capsys, *argv)
    assert again == path and "up to date, reused; test 16, train 64 records" in err
    assert main(["data", "tfds", "--builder", "scenes", "--config", "nope", "--source", str(SAMPLES / "scenes"),
                 "--data-dir", str(tmp_path)]) == 1
    assert "unknown remoteclip_scenes config 'nope'; one of aid, " in capsys.readouterr().err


def test_scene_tasks_on_tfds_equal_the_folder(tiny_checkpoint: Path, prepared: dict, tmp_path: Path) -> None:
    tasks = [a for t in SCENE_TASKS for a in ("--task", t)] + ["--shots", "1,4", "--seeds", "0,1"]
    folder = _eval(tiny_checkpoint, tmp_path / "folder.json", *tasks, "--scenes", str(SAMPLES / "scenes"))
    tfds = _eval(tiny_checkpoint, tmp_path / "tfds.json", *tasks, "--scenes", f"tfds:{prepared['scenes']}")
    assert [r["task"] for r in tfds] == list(SCENE_TASKS)
    for a, b in zip(folder, tfds):
        assert (b["dataset"], b["metrics"]) == (a["dataset"], a["metrics"]), a["task"]
    assert tfds[0]["metrics"]["split_rule"] == "sorted 8:2" and tfds[0]["metrics"]["num_test_images"] == 16


def test_retrieval_on_tfds_equals_the_json(tiny_checkpoint: Path, prepared: dict, tmp_path: Path) -> None:
    folder = _eval(tiny_checkpoint, tmp_path / "folder.json", "--task", "retrieval",
                   "--karpathy-json", str(SAMPLES / "retrieval" / "dataset_samples.json"))
    tfds = _eval(tiny_checkpoint, tmp_path / "tfds.json", "--task", "retrieval",
                 "--karpathy-json", f"tfds:{prepared['retrieval']}")
    assert (tfds[0]["dataset"], tfds[0]["metrics"]) == (folder[0]["dataset"], folder[0]["metrics"])
    assert tfds[0]["metrics"]["num_texts"] == 180


def test_tfds_input_errors_name_the_folder(tiny_checkpoint: Path, prepared: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    base = ["eval", "--checkpoint", str(tiny_checkpoint), "--no-cache", "--out", str(tmp_path / "r.json")]
    assert main([*base, "--task", "knn", "--scenes", f"tfds:{prepared['retrieval']}"]) == 1
    assert "remoteclip_retrieval dataset, not remoteclip_scenes" in capsys.readouterr().err
    assert main([*base, "--task", "knn", "--scenes", f"tfds:{tmp_path}"]) == 1
    assert f"{tmp_path}: not a prepared TFDS dataset" in capsys.readouterr().err
    assert main([*base, "--task", "retrieval", "--karpathy-json", f"tfds:{prepared['retrieval']}",
                 "--images", str(tmp_path)]) == 1
    assert "holds its images" in capsys.readouterr().err


def test_a_scene_dataset_keeps_the_fraction_it_was_prepared_with(tmp_path: Path) -> None:
    path = prepare_dataset("scenes", "custom", tmp_path, SAMPLES / "scenes", train_fraction=0.7).path
    ds = load_scene_dataset(f"tfds:{path}")
    assert (ds.split_rule, len(ds.train_paths), len(ds.test_paths)) == ("sorted 7:3", 56, 24)
    assert ds.name == "scenes" and ds.folders == ["farmland", "forest", "meadow", "residential"]
    with pytest.raises(DatasetError, match="prepared with train fraction 0.7, not 0.8"):
        load_scene_dataset(f"tfds:{path}", train_fraction=0.8)
