"""`rsclip data caption` end to end on every fixture: CSV rows, exact skip reasons, and the summary."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from rsclip_jax.data import AnnotationError
from rsclip_jax.data.caption_cli import register

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "annotations"


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["caption", *argv])
    return args.func(args)


def _images(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 60)).save(path)
    return root


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


CASES = {
    # format: (annotations, image sizes, extra args, captioned, rows, summary lines that must appear)
    "voc": ("voc/Annotations", {"00001.jpg": (800, 800), "100000001.bmp": (1166, 753)}, [], 2, 10, []),
    "levir": ("levir", {"00001.jpg": (800, 600)}, [], 1, 5, []),
    "visdrone": (
        "visdrone",
        {"0000001_00000_d_0000001.jpg": (1360, 765)},
        [],
        1,
        5,
        [
            "  left out of the captions: 1 x ignored region (category 0 or score 0)",
            "  left out of the captions: 1 x class 'others' mapped to null",
        ],
    ),
    "auair": (
        "auair/annotations.json",
        {"frame_20190829091111_x_0000249.jpg": (1920, 1080), "frame_20190829091111_x_0000334.jpg": (1920, 1080)},
        [],
        1,
        5,
        [
            "  skipped 1: no objects (e.g. frame_20190829091111_x_0000334.jpg)",
            "  left out of the captions: 1 x zero-area box",
        ],
    ),
    "sdd": (
        "sdd/annotations",
        {f"bookstore/video0/0000{i}.jpg": (1424, 1088) for i in range(3)},
        [],
        2,
        10,
        [
            "  skipped 1: no objects (e.g. bookstore/video0/00002.jpg)",
            "  left out of the captions: 2 x outside the view (lost = 1)",
        ],
    ),
    "carpk": ("carpk/Annotations", {"20160331_NTU_00001.png": (1280, 720)}, [], 1, 5, []),
    "coco": (
        "coco/iSAID_train.json",
        {"P0001_0_800_0_800.png": (800, 800), "P0002_0_800_0_800.png": (800, 800)},
        [],
        1,
        5,
        ["  skipped 1: no objects (e.g. P0002_0_800_0_800.png)"],
    ),
    "loveda": (
        "loveda",
        {"Train/Urban/images_png/1366.png": (20, 20)},
        ["--min-area", "4"],
        1,
        5,
        [
            "  left out of the captions: 1 x region smaller than min_area (building)",
            "  left out of the captions: 1 x class 'background' mapped to null",
        ],
    ),
    "isprs": (
        "isprs",
        {"top_potsdam_2_10_RGB.tif": (12, 12)},
        ["--min-area", "4"],
        1,
        5,
        ["  left out of the captions: 1 x class 'clutter' mapped to null"],
    ),
    "karpathy": (
        "karpathy/dataset_rsitmd.json",
        {"airport_1.tif": (64, 64), "beach_2.tif": (64, 64), "bridge_3.tif": (64, 64)},
        [],
        2,
        9,
        ["  skipped 1: split 'test' not selected (e.g. bridge_3.tif)", "  left out of the captions: 1 x empty caption"],
    ),
    "csv": ("csv/Ret-3_train.csv", {"RSICD/airport_1.jpg": (64, 64), "UCM/beach_2.jpg": (64, 64)}, [], 2, 4, []),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_every_format_captions_its_fixture(fmt, tmp_path, capsys):
    annotations, sizes, extra, captioned, rows, expected_lines = CASES[fmt]
    images = _images(tmp_path / "images", sizes)
    out = tmp_path / "out" / "captions.csv"
    assert (
        _run(
            "--format",
            fmt,
            "--images",
            str(images),
            "--annotations",
            str(FIXTURES / annotations),
            "--out",
            str(out),
            *extra,
        )
        == 0
    )
    table = _rows(out)
    assert table[0] == ["filepath", "title"] and len(table) == 1 + rows
    assert {row[0] for row in table[1:]} <= set(sizes)
    assert all(row[1].strip() for row in table[1:])
    err = capsys.readouterr().err.splitlines()
    skipped = len(sizes) - captioned
    assert f"read {len(sizes)} images: captioned {captioned} ({rows} captions), skipped {skipped}" in err
    for line in expected_lines:
        assert line in err
    assert err[-1] == f"wrote {rows} captions to {out}"


def test_dota_exact_rows_and_accounting(tmp_path, capsys):
    images = _images(tmp_path, {"P0001.png": (1000, 1000), "P0002.png": (1000, 1000), "extra.png": (10, 10)})
    out = tmp_path / "dota.csv"
    assert (
        _run(
            "--format",
            "dota",
            "--images",
            str(images),
            "--annotations",
            str(FIXTURES / "dota" / "labelTxt"),
            "--out",
            str(out),
        )
        == 0
    )
    assert _rows(out) == [
        ["filepath", "title"],
        ["P0001.png", "A plane in the middle of the picture ."],
        ["P0001.png", "A small vehicle, 4 large vehicles and 5 planes at the edge of the picture ."],
        ["P0001.png", "4 large vehicles and a small vehicle are located in this remote sensing picture ."],
        ["P0001.png", "6 planes are located in this remote sensing picture ."],
        ["P0001.png", "A small vehicle, 4 large vehicles and 6 planes are located in the picture ."],
    ]
    assert capsys.readouterr().err.splitlines()[1:] == [
        "read 2 images: captioned 1 (5 captions), skipped 1",
        "  skipped 1: no objects (e.g. P0002.png)",
        "  1 image files under --images are named by no annotation (e.g. extra.png)",
        f"wrote 5 captions to {out}",
    ]


def test_auair_paper_style_rows(tmp_path):
    images = _images(tmp_path / "i", {"frame_20190829091111_x_0000249.jpg": (1920, 1080)})
    out = tmp_path / "a.csv"
    _run(
        "--format",
        "auair",
        "--images",
        str(images),
        "--annotations",
        str(FIXTURES / "auair" / "annotations.json"),
        "--out",
        str(out),
        "--captions-per-image",
        "3",
    )
    assert [row[1] for row in _rows(out)[1:]] == [
        "A car and a human are at the edge of the picture .",
        "There is a human in the picture .",
        "A car and a human are located in this remote sensing picture .",
    ]


def test_missing_image_size_mismatch_and_nothing_captioned(tmp_path, capsys):
    images = _images(tmp_path / "i", {"00001.jpg": (640, 480)})
    out = tmp_path / "v.csv"
    assert (
        _run(
            "--format",
            "voc",
            "--images",
            str(images),
            "--annotations",
            str(FIXTURES / "voc" / "Annotations"),
            "--out",
            str(out),
        )
        == 1
    )
    err = capsys.readouterr().err.splitlines()
    assert "  skipped 1: image size differs from annotation (e.g. 00001.jpg: annotation 800x800, image 640x480)" in err
    assert "  skipped 1: image file not found (e.g. 100000001.bmp)" in err
    assert err[-1] == f"error: no image was captioned; {out} has only the header"
    assert _rows(out) == [["filepath", "title"]]


def test_image_names_resolve_by_extension_and_stem_but_never_guess(tmp_path, capsys):
    images = _images(
        tmp_path / "i", {"P0001.jpg": (1000, 1000), "a/P0002.jpg": (1000, 1000), "b/P0002.jpg": (1000, 1000)}
    )
    out = tmp_path / "d.csv"
    _run(
        "--format",
        "dota",
        "--images",
        str(images),
        "--annotations",
        str(FIXTURES / "dota" / "labelTxt"),
        "--out",
        str(out),
    )
    assert {row[0] for row in _rows(out)[1:]} == {"P0001.jpg"}
    assert "  skipped 1: ambiguous image name (e.g. P0002.png)" in capsys.readouterr().err.splitlines()


def test_strict_error_writes_nothing_and_skip_invalid_reports(tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "P0001.txt").write_text((FIXTURES / "dota" / "labelTxt" / "P0001.txt").read_text())
    (labels / "P0003.txt").write_text("10 10 20 10 20 20 10 20 plane\n")
    images = _images(tmp_path / "i", {"P0001.png": (1000, 1000), "P0003.png": (1000, 1000)})
    out = tmp_path / "d.csv"
    argv = ["--format", "dota", "--images", str(images), "--annotations", str(labels), "--out", str(out)]
    with pytest.raises(AnnotationError, match=r"P0003.txt:1: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category difficult'"):
        _run(*argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i", "labels"]  # no CSV, no partial file

    skipped_csv = tmp_path / "skipped.csv"
    assert _run(*argv, "--skip-invalid", "--skipped-out", str(skipped_csv)) == 0
    expected = "'x1 y1 x2 y2 x3 y3 x4 y4 category difficult' (10 fields), got 9: '10 10 20 10 20 20 10 20 plane'"
    detail = f"{labels / 'P0003.txt'}:1: expected {expected}"
    assert _rows(skipped_csv) == [
        ["item", "reason", "detail"],
        [str(labels / "P0003.txt"), "invalid annotation", detail],
    ]
    err = capsys.readouterr().err.splitlines()
    assert "read 2 images: captioned 1 (5 captions), skipped 1" in err
    assert not any("named by no annotation" in line for line in err)  # P0003.png is accounted for by its skip


def test_class_map_absolute_paths_and_caption_count(tmp_path, capsys):
    images = _images(tmp_path / "i", {"P0001.png": (1000, 1000)})
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"plane": "airplane", "Small_Vehicle": None}))
    out = tmp_path / "d.csv"
    label = FIXTURES / "dota" / "labelTxt" / "P0001.txt"
    _run(
        "--format", "dota", "--images", str(images), "--annotations", str(label), "--out", str(out),
        "--class-map", str(class_map), "--absolute-paths", "--captions-per-image", "7", "--seed", "2",
    )  # fmt: skip
    rows = _rows(out)[1:]
    assert len(rows) == 7 and {row[0] for row in rows} == {str((images / "P0001.png").resolve())}
    text = " ".join(row[1] for row in rows)
    assert "airplane" in text and "small vehicle" not in text and " planes" not in text
    assert (
        "  left out of the captions: 1 x class 'small-vehicle' mapped to null" in capsys.readouterr().err.splitlines()
    )


def test_user_errors(tmp_path):
    images = _images(tmp_path / "i", {"P0001.png": (1000, 1000)})
    bad_map = tmp_path / "map.json"
    bad_map.write_text('{"plane": 3}')
    base = [
        "--format",
        "dota",
        "--images",
        str(images),
        "--annotations",
        str(FIXTURES / "dota" / "labelTxt"),
        "--out",
        str(tmp_path / "o.csv"),
    ]
    with pytest.raises(ValueError, match=r"map.json: expected a JSON object of class name -> new name or null"):
        _run(*base, "--class-map", str(bad_map))
    with pytest.raises(ValueError, match=r"--captions-per-image must be >= 1, got 0"):
        _run(*base, "--captions-per-image", "0")
    with pytest.raises(FileNotFoundError, match=r"nope: no such images folder"):
        _run(*base[:2], "--images", str(tmp_path / "nope"), *base[4:])
    with pytest.raises(SystemExit):
        _run("--format", "yolo", "--images", "x", "--annotations", "y", "--out", "z")
