"""Failures a new user hit on the `rsclip` command line: each is now a working run or one clear error
line (naming the flag, file or key) that comes before any model loads and leaves nothing half-written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image

from rsclip_jax.cli import main
from rsclip_jax.data import build_inputs
from rsclip_jax.data import shards
from rsclip_jax.data.annotations import CaptionedImage
from rsclip_jax.data.readers import captions as captions_mod
from rsclip_jax.data.readers.captions import parse_separator, read_caption_csv
from rsclip_jax.evaluate.knn import knn_scores
from rsclip_jax.evaluate.paper import paper_specs

ANNOTATIONS = Path(__file__).resolve().parent / "fixtures" / "annotations"
TRAIN_IMAGES = SAMPLES / "train" / "images"
MISSING_CHECKPOINT = "no-such-weights.safetensors"  # an error about it would mean the work had started


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random tiny-ViT, made as a new user makes one: `rsclip init`."""
    path = tmp_path_factory.mktemp("model") / "x.safetensors"
    assert main(["init", "--model", "tiny-ViT", "--out", str(path)]) == 0
    return path


def _error(capsys, *argv: str) -> str:
    """Runs `rsclip ARGV`, expects exit status 1 and returns its single error line."""
    capsys.readouterr()
    assert main(list(map(str, argv))) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"rsclip {argv[0]}: error: "), lines
    return lines[-1]


def _usage_error(capsys, *argv: str) -> str:
    """Runs `rsclip ARGV`, expects argparse to refuse it (exit status 2) and returns stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    assert e.value.code == 2
    return capsys.readouterr().err


def _train_names(n: int) -> list[str]:
    return sorted(p.name for p in TRAIN_IMAGES.iterdir())[:n]


def _caption_csv(path: Path, names: list[str], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["filepath", "title"])
        writer.writerows([name, f"A caption of {name} ."] for name in names)
    return path


# 1. --suite remoteclip-paper on the bundled samples -------------------------------------------

def test_paper_suite_runs_on_bundled_samples(tiny, tmp_path, capsys):
    """It stopped with KeyError: 'name': a counting set (or a retrieval JSON) straight in its task
    folder had no dataset name yet."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny, weights / "tiny-ViT.safetensors")
    out = tmp_path / "paper" / "report.json"
    assert main(["eval", "--suite", "remoteclip-paper", "--data-dir", str(SAMPLES), "--weights-dir", str(weights),
                 "--task", "retrieval", "--task", "counting", "--no-cache", "--no-plots", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {(r["model"], r["task"], r["dataset"]) for r in report["results"]} == {
        ("tiny-ViT", "retrieval", "samples"), ("tiny-ViT", "counting", "counting")}


def test_paper_specs_name_top_level_jsons_as_the_tasks_do(tmp_path):
    for part in ("retrieval", "counting"):
        (tmp_path / part).mkdir()
    (tmp_path / "retrieval" / "dataset_rsitmd.json").write_text("{}")
    (tmp_path / "counting" / "counting.json").write_text("{}")
    specs, missing = paper_specs(str(tmp_path))
    assert {(s["task"], s["name"]) for s in specs} == {("retrieval", "RSITMD"), ("counting", "counting")}
    assert missing["retrieval"] == ["RSICD", "UCM"]


def test_paper_suite_says_which_weights_it_needs(tmp_path, capsys):
    base = ["eval", "--suite", "remoteclip-paper", "--data-dir", SAMPLES, "--out", tmp_path / "r.json"]
    line = _error(capsys, *base)
    assert "needs --weights-dir DIR" in line and ".safetensors" in line and "RemoteCLIP-ViT-B-32.pt" in line
    (tmp_path / "empty").mkdir()
    line = _error(capsys, *base, "--weights-dir", tmp_path / "empty")
    assert f"--weights-dir {tmp_path / 'empty'}: no checkpoint files; expected a folder of checkpoint files" in line
    line = _error(capsys, *base, "--weights-dir", tmp_path / "nope")
    assert f"--weights-dir {tmp_path / 'nope'}: no such directory" in line
    assert not (tmp_path / "r.json").exists()
    for flags in (["--best"], ["--step", "3"], ["--checkpoint", "x.pt"]):
        line = _error(capsys, *base, "--weights-dir", tmp_path / "empty", *flags)
        assert "--checkpoint, --step and --best do not apply" in line


# 2. CSV separators: `\t` as typed in a shell, `tab`, or detected -------------------------------

@pytest.mark.parametrize("value, expected", [("\\t", "\t"), ("tab", "\t"), ("TAB", "\t"), ("\t", "\t"),
                                             (",", ","), ("comma", ","), (";", ";")])
def test_separator_names(value, expected):
    assert parse_separator(value) == expected


@pytest.mark.parametrize("value", ["", "xx", "\\n", "\n", '"'])
def test_bad_separator_names_the_flag(value):
    with pytest.raises(ValueError, match=r"--csv-separator .*: give one character, 'tab' \(or \\t\) or 'comma'"):
        parse_separator(value)


def test_build_and_caption_share_one_detection():
    assert build_inputs.detect_delimiter is captions_mod.detect_delimiter


@pytest.mark.parametrize("flag", [[], ["--csv-separator", "\\t"], ["--csv-separator", "tab"]])
def test_build_reads_a_tab_separated_csv(flag, tmp_path, capsys):
    names = _train_names(3)
    csv_path = _caption_csv(tmp_path / "tab.csv", names, "\t")
    out = tmp_path / "shards"
    assert main(["data", "build", "--csv", str(csv_path), "--images-root", str(TRAIN_IMAGES), "--out", str(out),
                 "--workers", "0", *flag]) == 0
    assert shards.load_manifest(out)["written"] == 3
    # `rsclip data caption --format csv` reads the same file the same way
    records = list(read_caption_csv(csv_path))
    assert [r.image for r in records if isinstance(r, CaptionedImage)] == names


def test_build_separator_errors_name_the_flag(tmp_path, capsys):
    csv_path = _caption_csv(tmp_path / "tab.csv", _train_names(1), "\t")
    base = ["data", "build", "--csv", csv_path, "--images-root", TRAIN_IMAGES, "--out", tmp_path / "out"]
    line = _error(capsys, *base, "--csv-separator", ",")
    assert "no column filepath, title in header ['filepath\\ttitle']" in line
    assert "split at --csv-separator ','; leave that flag out to detect comma or tab" in line
    assert "--csv-separator 'xx': give one character" in _error(capsys, *base, "--csv-separator", "xx")
    assert not (tmp_path / "out").exists()


# 3. Counts that must be positive, labels, class maps ----------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["embed", "--checkpoint", "c", "--texts", "t", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["classify", "--checkpoint", "c", "--labels", "a,b", "--batch-size", "-1", "img"], "--batch-size"),
    (["classify", "--checkpoint", "c", "--labels", "a,b", "--top-k", "0", "img"], "--top-k"),
    (["eval", "--checkpoint", "c", "--task", "knn", "--scenes", "s", "--batch-size", "0"], "--batch-size"),
    (["eval", "--checkpoint", "c", "--task", "knn", "--scenes", "s", "--k", "0"], "--k"),
    (["eval", "--checkpoint", "c", "--task", "knn", "--scenes", "s", "--k", "two"], "--k"),
])
def test_counts_must_be_positive(argv, flag, capsys):
    err = _usage_error(capsys, *argv)
    assert f"argument {flag}: " in err and "positive integer" in err


@pytest.mark.parametrize("labels, message", [
    ("a,,b", "class name 2 of 3 is empty"),
    ("a,b,", "class name 3 of 3 is empty"),
    ("a,a", "'a' is given twice"),
    ("Forest , forest", "'forest' is given twice (as 'Forest')"),  # the tokenizer lowercases: the same prompt
    ("dense  residential,dense residential", "is given twice"),
    ("a", "needs at least two"),
])
def test_classify_labels_checked_before_the_model_loads(labels, message, capsys):
    line = _error(capsys, "classify", "--checkpoint", MISSING_CHECKPOINT, "--labels", labels, SAMPLES / "scenes")
    assert "--labels" in line and message in line


def test_knn_k_checked_where_it_is_used():
    x, y = np.eye(4, dtype=np.float32), np.arange(4)
    with pytest.raises(ValueError, match=r"k-NN k \(--k, or the task's 'k'\) must be a positive integer, got 0"):
        knn_scores(x, y, x, 4, k=0)


def test_class_map_keys_that_match_no_class_are_named(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (1000, 1000), (90, 120, 60)).save(images / "P0001.png")
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"plane": "airplane", "Small_Vehicle": None, "helicoptr": "helicopter"}))
    assert main(["data", "caption", "--format", "dota", "--images", str(images), "--annotations",
                 str(ANNOTATIONS / "dota" / "labelTxt" / "P0001.txt"), "--out", str(tmp_path / "d.csv"),
                 "--class-map", str(class_map)]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: --class-map {class_map}: 1 key(s) match no class of the annotations, so they "
                       "changed nothing: 'helicoptr'; classes found: large vehicle, plane, small vehicle"]


# 4. A build that would write no image ---------------------------------------------------------------

def _exclude_json(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps({"images": [{"filename": n, "split": "test", "sentences": [{"raw": "x"}]}
                                           for n in names]}))
    return path


def test_build_that_writes_nothing_is_an_error_and_leaves_nothing(tmp_path, capsys):
    names = _train_names(3)
    csv_path = _caption_csv(tmp_path / "c.csv", names)
    exclude = _exclude_json(tmp_path / "dataset_test.json", names)
    base = ["data", "build", "--csv", csv_path, "--images-root", TRAIN_IMAGES, "--workers", "0",
            "--exclude", exclude, "--exclude-images", TRAIN_IMAGES]
    line = _error(capsys, *base, "--out", tmp_path / "new" / "shards")
    assert "no image left to write: all 3 input image(s) were removed or skipped: 3 test-split leakage (--exclude)" \
        in line and "pass --allow-empty" in line
    assert not (tmp_path / "new").exists()

    # A finished build in --out stays as it was.
    out = tmp_path / "done"
    assert main(["data", "build", "--csv", str(csv_path), "--images-root", str(TRAIN_IMAGES), "--workers", "0",
                 "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "no image left to write" in _error(capsys, *base, "--out", out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    assert main([*map(str, base), "--out", str(tmp_path / "empty"), "--allow-empty"]) == 0
    assert shards.load_manifest(tmp_path / "empty")["written"] == 0


def test_build_skipped_for_other_reasons_names_them(tmp_path, capsys):
    csv_path = _caption_csv(tmp_path / "c.csv", ["gone.jpg", "also-gone.jpg"])
    line = _error(capsys, "data", "build", "--csv", csv_path, "--workers", "0", "--out", tmp_path / "out")
    assert "all 2 input image(s) were removed or skipped: 2 file not found" in line
    assert not (tmp_path / "out").exists()


# 5. embed --out names the file it writes ----------------------------------------------------------

def test_embed_out_gets_the_npz_suffix_and_says_so(tiny, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("a forest .\na river .\n")
    assert main(["embed", "--checkpoint", str(tiny), "--texts", str(texts), "--out", str(tmp_path / "sub" / "x")]) == 0
    written = tmp_path / "sub" / "x.npz"
    assert f"wrote {written}" in capsys.readouterr().err.splitlines()
    assert sorted(p.name for p in written.parent.iterdir()) == ["x.npz"]  # no temporary file left
    assert np.load(written)["text_embeddings"].shape[0] == 2


# 6. Output locations checked before the work; missing folders are created -------------------------

def test_outputs_checked_before_any_model_loads(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _error(capsys, "embed", "--checkpoint", MISSING_CHECKPOINT, "--texts", blocker,
                  "--out", blocker / "x")
    assert f"--out {blocker / 'x.npz'}: {blocker} is a file, not a folder" in line
    line = _error(capsys, "classify", "--checkpoint", MISSING_CHECKPOINT, "--labels", "a,b",
                  "--json", blocker / "r.json", SAMPLES / "scenes")
    assert f"--json {blocker / 'r.json'}: {blocker} is a file, not a folder" in line
    line = _error(capsys, "eval", "--checkpoint", MISSING_CHECKPOINT, "--task", "knn", "--scenes", SAMPLES / "scenes",
                  "--out", blocker / "sub" / "r.json")
    assert f"--out {blocker / 'sub' / 'r.json'}: {blocker} is a file, not a folder" in line
    line = _error(capsys, "eval", "--checkpoint", MISSING_CHECKPOINT, "--task", "knn", "--scenes", SAMPLES / "scenes",
                  "--out", tmp_path)
    assert f"--out {tmp_path}: is a folder; give a file name" in line


def test_classify_json_into_a_new_folder(tiny, tmp_path, capsys):
    out = tmp_path / "out" / "missing_dir" / "r.json"
    images = sorted((SAMPLES / "scenes" / "forest").iterdir())[:2]
    assert main(["classify", "--checkpoint", str(tiny), "--labels", "forest,meadow", "--json", str(out),
                 *map(str, images)]) == 0
    assert json.loads(out.read_text())["labels"] == ["forest", "meadow"]
    assert f"wrote {out}" in capsys.readouterr().err


def test_number_flags_share_one_rule_and_name_the_flag(capsys):
    import pytest

    from rsclip_jax.cli import main

    for argv, message in (
        (["map", "--checkpoint", "x.pt", "s.tif", "--labels", "a,b", "--out", "m.tif", "--min-valid", "1.5"],
         "--min-valid: must be a fraction from 0 to 1, got 1.5"),
        (["serve", "idx", "--port", "x"], "--port: expected a port number 0..65535 (0: any free port), got 'x'"),
        (["embed", "--checkpoint", "x.pt", "--images", "a.png", "--out", "e", "--batch-size", "0"],
         "--batch-size: must be a positive integer (1 or more), got 0"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
