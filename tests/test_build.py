"""`rsclip data build`: bad inputs, accounting, dedup, leakage exclusion, resume, CLI exit codes."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsclip_jax.data import build as build_mod
from rsclip_jax.data import build_cli, shards
from rsclip_jax.data.build import BuildConfig, build, scan_image
from rsclip_jax.data.phash import PHashIndex, hamming, phash

TILES = Path(__file__).resolve().parent.parent / "data" / "samples" / "tiles"
PNG_TILE = TILES / "deepforest_OSBS_029.png"
JPG_TILE = TILES / "deepforest_YELL_541000_4977000.jpg"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int = 30000) -> bytes:
    """A ~100-byte PNG whose header declares side x side RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return path


def _records(out: Path) -> list[shards.ImageRecord]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [shards.decode_record(r) for s in manifest["shards"] for r in shards.read_shard(out / s["file"])]


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    build_cli.register(parser.add_subparsers())
    args = parser.parse_args(["build", *argv])
    return args.func(args)


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """Good, convertible and broken images made from the real tiles; name -> expected skip reason."""
    d = tmp_path / "imgs"
    d.mkdir()
    rgb = Image.open(PNG_TILE).convert("RGB")
    shutil.copy(PNG_TILE, d / "good.png")
    shutil.copy(JPG_TILE, d / "good.jpg")
    shutil.copy(TILES / "solaris_pan1_16bit.tif", d / "pan16.tif")
    rgb.convert("CMYK").save(d / "cmyk.jpg", quality=90)
    rgb.convert("L").save(d / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    jpg = JPG_TILE.read_bytes()
    rng = np.random.default_rng(0)
    (d / "corrupt.jpg").write_bytes(jpg[:600] + rng.integers(0, 256, len(jpg) - 600, dtype=np.uint8).tobytes())
    png = PNG_TILE.read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "zero.jpg").write_bytes(b"")
    (d / "bomb.png").write_bytes(_bomb_png())
    shutil.copy(TILES / "deepforest_pelicans_drone.jpg", d / "nocaption.jpg")
    expected = {
        "good.png": None, "good.jpg": None, "pan16.tif": None, "cmyk.jpg": None, "gray.png": None, "rgba.png": None,
        "corrupt.jpg": "cannot decode: UnidentifiedImageError",
        "truncated.png": "cannot decode: OSError: image file is truncated",
        "zero.jpg": "cannot decode: empty file (0 bytes)",
        "bomb.png": "decompression bomb: Image size (900000000 pixels) exceeds limit",
        "missing.jpg": "file not found",
        "nocaption.jpg": "empty caption",
    }
    rows = [(name, f"a caption of {name}") for name in expected if name != "nocaption.jpg"]
    rows += [("good.png", "a second caption"), ("nocaption.jpg", "   "), ("good.jpg", "")]
    return _write_csv(d / "mixed.csv", rows), expected


def test_mixed_bad_inputs_are_converted_or_skipped_with_exact_reasons(mixed_folder, tmp_path):
    csv_path, expected = mixed_folder
    out = tmp_path / "out"
    assert _run_cli(["--csv", str(csv_path), "--out", str(out), "--workers", "2", "--records-per-shard", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == len(expected) == manifest["written"] + manifest["skipped_count"]
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {n for n, r in expected.items() if r}
    for name, reason in reasons.items():
        assert reason.startswith(expected[name]), (name, reason)
    assert [Path(s["path"]).name for s in manifest["skipped"]] == [  # in CSV order
        "corrupt.jpg", "truncated.png", "zero.jpg", "bomb.png", "missing.jpg", "nocaption.jpg"]
    assert manifest["skip_reasons"] == {"cannot decode": 3, "decompression bomb": 1, "file not found": 1,
                                        "empty caption": 1}
    assert manifest["sources"] == {"mixed": {"inputs": 12, "written": 6, "skipped": 6}}
    assert [s["records"] for s in manifest["shards"]] == [4, 2]

    records = {r.original_id: r for r in _records(out)}
    assert set(records) == {n for n, r in expected.items() if r is None}
    assert records["good.png"].image == PNG_TILE.read_bytes()  # RGB PNG/JPEG keep their original bytes
    assert records["good.png"].captions == ("a caption of good.png", "a second caption")
    assert records["good.jpg"].captions == ("a caption of good.jpg",)  # the empty row is dropped
    for name in ("pan16.tif", "cmyk.jpg", "gray.png", "rgba.png"):
        r = records[name]
        assert r.format == "JPEG" and r.source == "mixed"
        with Image.open(io.BytesIO(r.image)) as img:
            assert img.mode == "RGB" and img.size == (r.width, r.height)
    gray = np.asarray(Image.open(io.BytesIO(records["gray.png"].image)), np.int16)
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 8  # still grey after RGB conversion + JPEG


def test_failure_while_writing_is_accounted_for(mixed_folder, tmp_path, monkeypatch):
    csv_path, _ = mixed_folder
    real = shards.encode_image

    def flaky(entry, encode):
        if entry["path"].endswith("gray.png"):
            raise OSError("disk went away")
        return real(entry, encode)

    monkeypatch.setattr(shards, "encode_image", flaky)
    m = build(BuildConfig(csvs=(str(csv_path),), out_dir=str(tmp_path / "out"), workers=1)).manifest
    assert m["written"] == 5 and m["written"] + m["skipped_count"] == m["inputs"] == 12
    assert {"path": str(csv_path.parent / "gray.png"), "source": "mixed",
            "reason": "cannot decode: OSError: disk went away"} in m["skipped"]


def test_scan_applies_max_pixels_without_touching_pil_global():
    before = Image.MAX_IMAGE_PIXELS
    entry = scan_image(str(PNG_TILE), max_pixels=400 * 400 - 1)
    assert entry["reason"] == "decompression bomb: 400x400 = 160000 pixels exceeds the limit of 159999"
    assert Image.MAX_IMAGE_PIXELS == before
    assert scan_image(str(PNG_TILE), max_pixels=400 * 400)["width"] == 400


def test_skipped_share_over_limit_exits_nonzero_but_writes_manifest(mixed_folder, tmp_path, capsys):
    csv_path, _ = mixed_folder
    out = tmp_path / "out"
    assert _run_cli(["--csv", str(csv_path), "--out", str(out), "--workers", "1", "--max-skipped-fraction", "0.4"]) == 1
    assert "50.0% of the inputs could not be used" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["written"] == 6


def test_unreadable_csv_is_a_clear_error(tmp_path):
    with pytest.raises(build_mod.BuildError, match="no column title"):
        bad = tmp_path / "bad.csv"
        bad.write_text("filepath,caption\nx.png,y\n")
        build(BuildConfig(csvs=(str(bad),), out_dir=str(tmp_path / "out")))
    with pytest.raises(build_mod.BuildError, match="cannot read CSV"):
        build(BuildConfig(csvs=(str(tmp_path / "nope.csv"),), out_dir=str(tmp_path / "out")))


def _near_copy(src: Path, dst: Path) -> None:
    """A re-encoded, slightly smaller copy: what dataset mirrors typically do to an image."""
    with Image.open(src) as img:
        rgb = img.convert("RGB")
    rgb.resize((rgb.width * 9 // 10, rgb.height * 9 // 10), Image.BICUBIC).save(dst, quality=80)


def test_phash_matches_near_copies_and_separates_different_tiles(tmp_path):
    _near_copy(PNG_TILE, tmp_path / "copy.jpg")
    a, b = phash(Image.open(PNG_TILE)), phash(Image.open(tmp_path / "copy.jpg"))
    others = [phash(Image.open(p).convert("RGB")) for p in TILES.iterdir() if p != PNG_TILE and p.suffix != ".tif"]
    assert hamming(a, b) <= 4
    assert min(hamming(a, o) for o in others) > 12
    index = PHashIndex(threshold=4)
    for i, o in enumerate(others):
        index.add(o, i)
    index.add(a, "tile")
    assert index.matches(b) == [("tile", hamming(a, b))]
    assert index.matches(a ^ 0b10101) == [("tile", 3)] and index.matches(a ^ 0b11111) == []


def test_dedup_across_sources_and_leakage_exclusion(tmp_path):
    d = tmp_path / "data"
    (d / "test_images").mkdir(parents=True)
    for p in TILES.glob("deepforest_*"):
        shutil.copy(p, d / p.name)
    _near_copy(TILES / "deepforest_SOAP_031.png", d / "mirror_of_031.jpg")
    _near_copy(TILES / "deepforest_SOAP_061.png", d / "test_images" / "t061.jpg")
    shutil.copy(TILES / "deepforest_pelicans_drone.jpg", d / "test_images" / "pelicans_train_split.jpg")
    karpathy = {"dataset": "toy", "images": [
        {"filename": "t061.jpg", "split": "test", "sentences": [{"raw": "trees"}]},
        {"filename": "pelicans_train_split.jpg", "split": "train", "sentences": [{"raw": "birds"}]},
        {"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "nothing"}]},
    ]}
    (d / "dataset_toy.json").write_text(json.dumps(karpathy))
    a = _write_csv(d / "alpha.csv", [(p.name, "trees") for p in sorted(d.glob("deepforest_*"))])
    b = _write_csv(d / "beta.csv", [("mirror_of_031.jpg", "a mirror"), ("deepforest_OSBS_029.png", "same file")])
    c = _write_csv(d / "beta_self.csv", [("deepforest_OSBS_029.png", "x"), ("mirror_of_029.jpg", "y")])
    _near_copy(TILES / "deepforest_OSBS_029.png", d / "mirror_of_029.jpg")

    out = tmp_path / "out"
    report = build(BuildConfig(csvs=(str(a), str(b), str(c)), out_dir=str(out), sources=("alpha", "beta", "gamma"),
                               dedup=True, exclude=(str(d / "dataset_toy.json"),),
                               exclude_images=(str(d / "test_images"),), workers=1))
    m = report.manifest
    reasons = {(s["source"], Path(s["path"]).name): s["reason"] for s in m["skipped"]}
    assert reasons[("alpha", "deepforest_SOAP_061.png")].startswith(
        "test-split leakage: near-duplicate of dataset_toy.json:t061.jpg (phash distance ")
    assert reasons[("beta", "mirror_of_031.jpg")].startswith(
        "duplicate of alpha:deepforest_SOAP_031.png (phash distance ")
    assert reasons[("beta", "deepforest_OSBS_029.png")] == "duplicate of alpha:deepforest_OSBS_029.png (phash distance 0)"
    assert ("gamma", "mirror_of_029.jpg") in reasons  # gamma vs alpha: across sources
    assert m["exclude"]["removed"] == 1 and m["exclude"]["test_images"] == 2
    assert [e["reason"] for e in m["exclude"]["test_images_unreadable"]] == ["file not found"]
    assert m["dedup"]["removed"] == 4 and m["written"] == 4 and report.ok  # removals are not failures

    # Within one source the default scope keeps near-duplicates; --dedup-scope all removes them.
    own = _write_csv(d / "own.csv", [("deepforest_OSBS_029.png", "x"), ("mirror_of_029.jpg", "y")])
    kept = build(BuildConfig(csvs=(str(own),), out_dir=str(tmp_path / "o2"), dedup=True, workers=1)).manifest
    assert kept["written"] == 2
    dropped = build(BuildConfig(csvs=(str(own),), out_dir=str(tmp_path / "o3"), dedup=True, dedup_scope="all",
                                workers=1)).manifest
    assert dropped["written"] == 1 and dropped["skipped"][0]["reason"].startswith("duplicate of own:deepforest_OSBS")


def test_resume_skips_finished_shards_and_matches_a_clean_build(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    rows = []
    for p in sorted(TILES.iterdir()):
        shutil.copy(p, d / p.name)
        rows.append((p.name, f"caption {p.stem}"))
    csv_path = _write_csv(d / "tiles.csv", rows)
    config = BuildConfig(csvs=(str(csv_path),), out_dir=str(tmp_path / "out"), records_per_shard=2, workers=1)

    real_job = build_mod._write_shard_job
    written: list[str] = []

    def crash_on_third(args):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        written.append(args[1]["file"])
        return real_job(args)

    monkeypatch.setattr(build_mod, "_write_shard_job", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(config)
    assert not (tmp_path / "out" / "manifest.json").exists()
    done_before = {f: os.stat(tmp_path / "out" / f).st_mtime_ns for f in written}

    written.clear()
    monkeypatch.setattr(build_mod, "_write_shard_job", lambda args: (written.append(args[1]["file"]), real_job(args))[1])
    resumed = build(config).manifest
    assert written == ["shard-00002-of-00004.array_record", "shard-00003-of-00004.array_record"]
    assert {f: os.stat(tmp_path / "out" / f).st_mtime_ns for f in done_before} == done_before

    # A changed caption rewrites only the shard that holds it.
    rows[0] = (rows[0][0], "a new caption")
    _write_csv(csv_path, rows)
    written.clear()
    rebuilt = build(config).manifest
    assert written == ["shard-00000-of-00004.array_record"]

    monkeypatch.undo()  # worker processes need the real, picklable job
    clean = build(dataclasses.replace(config, out_dir=str(tmp_path / "clean"), workers=2)).manifest
    assert rebuilt["shards"] == clean["shards"] and resumed["written"] == rebuilt["written"] == 7
    assert _records(tmp_path / "out") == _records(tmp_path / "clean")


def test_caption_then_build_with_images_root(tmp_path):
    """The documented flow: `data caption` writes paths relative to --images; `build --images-root` reads them."""
    import shutil

    from conftest import REAL_FIXTURES
    from rsclip_jax.cli import main

    images = tmp_path / "images"
    images.mkdir()
    # deepforest's PNG of the orthophoto; the VOC file names OSBS_029.tif, found by its stem
    shutil.copy(REAL_FIXTURES / "deepforest" / "OSBS_029.png", images / "OSBS_029.png")
    csv_path = tmp_path / "captions" / "trees.csv"
    assert main(["data", "caption", "--format", "voc", "--images", str(images), "--annotations",
                 str(REAL_FIXTURES / "deepforest" / "OSBS_029.xml"), "--out", str(csv_path)]) == 0
    assert csv_path.read_text().splitlines()[1] == "OSBS_029.png,A crowd of trees are in the middle of the picture ."
    assert main(["data", "build", "--csv", str(csv_path), "--images-root", str(images),
                 "--out", str(tmp_path / "ok"), "--workers", "1"]) == 0
    ok = shards.load_manifest(tmp_path / "ok")
    assert ok["written"] == 1 and ok["skipped_count"] == 0
    assert [r.captions for r in map(shards.decode_record, shards.read_shard(shards.shard_paths(tmp_path / "ok")[0]))][0][0] \
        == "A crowd of trees are in the middle of the picture ."
    # Without --images-root the paths resolve next to the CSV, where the image is not: counted, not lost.
    main(["data", "build", "--csv", str(csv_path), "--out", str(tmp_path / "missing"), "--workers", "1",
          "--max-skipped-fraction", "1.0", "--allow-empty"])
    missing = shards.load_manifest(tmp_path / "missing")
    assert missing["written"] == 0 and missing["skipped"][0]["reason"].startswith("file not found")
