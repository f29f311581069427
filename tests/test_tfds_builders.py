"""tfds builders (rsclip_jax.data.tfds_builders, prepared by tfds_prepared): array_record files,
read back without TensorFlow, rebuilt when their source folder changes.

Fixtures are built in tmp from the real sample corpus (data/samples/scenes, data/samples/retrieval)
with deliberate quirks: uneven class sizes for the 8:2 rounding, names whose code-point order differs
from their natural order, junk files, and non-RGB / non-JPEG-PNG images that must be normalised.
The split rule itself is pinned in tests/test_splits.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from rsclip_jax.data import splits
from rsclip_jax.data import tfds_builders as tb
from rsclip_jax.data import tfds_prepared as tp
from rsclip_jax.preprocess import load_image

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "data" / "samples" / "scenes"
RETRIEVAL = REPO / "data" / "samples" / "retrieval"

# class -> number of real images copied in; chosen so floor(0.8 n) exercises the rounding.
CLASS_SIZES = {"farmland": 20, "forest": 7, "meadow": 13, "residential": 1}
# Expected (n_train, n_test) per class, written out rather than recomputed.
EXPECTED_SPLIT = {"farmland": (16, 4), "forest": (5, 2), "meadow": (10, 3), "residential": (0, 1)}
# Names in "forest": code-point order puts img_10 before img_2 and "B" before "a".
FOREST_NAMES = ["img_2.png", "img_10.png", "img_1.jpg", "B.tif", "a_gray.png", "c_rgba.png", "d_palette.png"]
FOREST_SORTED = ["B.tif", "a_gray.png", "c_rgba.png", "d_palette.png", "img_1.jpg", "img_10.png", "img_2.png"]

# Run a snippet with TensorFlow made un-importable even where it is installed: replace the path
# finder by one that never finds `tensorflow`. (`sys.modules["tensorflow"] = None` does not work:
# etils decides "TF is loaded" from `"tensorflow" in sys.modules` and tfds then crashes on import.)
NO_TF_PRELUDE = textwrap.dedent("""
    import importlib.machinery, importlib.util, sys
    class _NoTF(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.partition(".")[0] == "tensorflow" else super().find_spec(name, path, target)
    sys.meta_path[:] = [_NoTF if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert importlib.util.find_spec("tensorflow") is None
""")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mode(path: Path) -> str:
    with Image.open(path) as im:
        return im.mode


@pytest.fixture(scope="session")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/<class>/<image>, real tiles, with the quirks listed in the module docstring."""
    root = tmp_path_factory.mktemp("scenes_manual")
    for cls, n in CLASS_SIZES.items():
        (root / cls).mkdir()
        srcs = sorted((SCENES / cls).iterdir())[:n]
        if cls != "forest":
            for src in srcs:
                shutil.copy(src, root / cls / src.name)
            continue
        for src, name in zip(srcs, FOREST_NAMES):
            with Image.open(src) as im:
                rgb = im.convert("RGB")
            if name.startswith("a_gray"):
                rgb.convert("L").save(root / cls / name)
            elif name.startswith("c_rgba"):
                rgb.convert("RGBA").save(root / cls / name)
            elif name.startswith("d_palette"):
                rgb.convert("P").save(root / cls / name)
            elif name.endswith(".jpg"):
                rgb.save(root / cls / name, quality=90)
            else:  # .tif and the RGB .png files
                rgb.save(root / cls / name)
    # Junk that must be ignored: hidden files, AppleDouble "._" files, non-image files, a hidden folder.
    (root / "forest" / ".DS_Store").write_bytes(b"\0\0")
    (root / "forest" / "._img_2.png").write_bytes(b"\0\5\26\7")
    (root / "meadow" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root


@pytest.fixture(scope="session")
def retrieval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Karpathy layout with real images and captions; splits reassigned (the sample is all test)."""
    root = tmp_path_factory.mktemp("retrieval_manual")
    shutil.copytree(RETRIEVAL / "images", root / "images")
    data = json.loads((RETRIEVAL / "dataset_samples.json").read_text())
    for i, item in enumerate(data["images"]):
        item["split"] = ("train", "train", "val", "test")[i % 4]
    (root / "dataset_fixture.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, scene_dir: Path, retrieval_dir: Path) -> Path:
    """Both datasets prepared once (array_record) for the read-back tests."""
    out = tmp_path_factory.mktemp("tfds_data")
    tp.scene_source("custom", out, scene_dir)
    tp.retrieval_source("custom", out, retrieval_dir)
    return out


# ----------------------------------------------------------------------------- scenes


def test_listing_sorts_by_code_point_and_skips_junk(scene_dir: Path) -> None:
    split = splits.split_scene_folder(scene_dir)
    assert split.classes == ["farmland", "forest", "meadow", "residential"]
    assert [rel for rel, label in split.train + split.test if label == 1] == [f"forest/{f}" for f in FOREST_SORTED]
    sizes = {c: sum(1 for _, label in split.train + split.test if label == i) for i, c in enumerate(split.classes)}
    assert sizes == CLASS_SIZES


def test_scene_split_is_exact_per_class(data_dir: Path, scene_dir: Path) -> None:
    sources = tp.scene_source("custom", data_dir, split=None)  # prepared: no manual_dir needed
    assert set(sources) == {"train", "test"}
    names = tp.class_names(sources["train"])
    assert names == ["farmland", "forest", "meadow", "residential"]
    got: dict[str, list[str]] = {}
    for split, src in sources.items():
        got[split] = [src[i]["filename"].decode() for i in range(len(src))]
        for i in range(len(src)):
            rec = src[i]
            assert names[rec["label"]] == rec["filename"].decode().split("/")[0]
    # Independent expectation: per class, sorted names, first n_train to train; records in
    # (class, name) order because the builder writes without hash shuffling.
    want = {"train": [], "test": []}
    for cls in names:
        files = sorted(p.name for p in (scene_dir / cls).iterdir() if not p.name.startswith(".")
                       and p.suffix != ".txt")
        n_train, n_test = EXPECTED_SPLIT[cls]
        assert len(files) == n_train + n_test
        want["train"] += [f"{cls}/{f}" for f in files[:n_train]]
        want["test"] += [f"{cls}/{f}" for f in files[n_train:]]
    assert got == want
    assert got["train"][16:21] == [f"forest/{f}" for f in FOREST_SORTED[:5]]
    assert sources["train"].dataset_info.splits["train"].num_examples == 31
    assert sources["test"].dataset_info.splits["test"].num_examples == 10


def test_scene_images_decode_to_rgb_uint8_with_original_pixels(data_dir: Path, scene_dir: Path) -> None:
    sources = tp.scene_source("custom", data_dir, split=None)
    raw = tp.scene_source("custom", data_dir, split=None, decoders={"image": tfds.decode.SkipDecoding()})
    for split in ("train", "test"):
        for i in range(len(sources[split])):
            rec, enc = sources[split][i], raw[split][i]
            path = scene_dir / rec["filename"].decode()
            assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3 and rec["image"].shape[2] == 3
            # Grayscale, RGBA, palette and TIFF become RGB PNGs with the same RGB pixels; RGB
            # JPEG/PNG files are stored byte for byte. Either way the evaluator's reader agrees.
            np.testing.assert_array_equal(rec["image"], _pixels(path))
            np.testing.assert_array_equal(rec["image"], np.asarray(load_image(path)))
            passthrough = path.suffix in (".png", ".jpg") and _mode(path) == "RGB"
            assert (enc["image"] == path.read_bytes()) == passthrough, path


def test_scene_source_feeds_grain(data_dir: Path) -> None:
    src = tfds.data_source("remoteclip_scenes/custom", split="test", data_dir=data_dir)
    ds = grain.MapDataset.source(src).shuffle(seed=3).map(lambda r: (r["filename"].decode(), int(r["label"])))
    items = list(ds)
    assert len(items) == len(src) == 10
    assert sorted(items) == sorted((src[i]["filename"].decode(), int(src[i]["label"])) for i in range(len(src)))
    assert [name for name, _ in items] != [src[i]["filename"].decode() for i in range(len(src))]  # shuffled
    loader = grain.DataLoader(
        data_source=src,
        sampler=grain.samplers.IndexSampler(len(src), shard_options=grain.sharding.NoSharding(),
                                            shuffle=False, num_epochs=1),
        operations=[grain.transforms.Batch(batch_size=5)], worker_count=0)
    labels = np.concatenate([b["label"] for b in loader])
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 2, 2, 2, 3])


def test_train_fraction_gets_its_own_config(tmp_path: Path, scene_dir: Path) -> None:
    src = tp.scene_source("custom", tmp_path, scene_dir, split=None, train_fraction=0.5)
    assert src["train"].dataset_info.config_name == "custom_train50"
    # floor(0.5 n) per class: 10 + 3 + 6 + 0
    assert (len(src["train"]), len(src["test"])) == (19, 22)
    assert (tmp_path / "remoteclip_scenes" / "custom_train50").is_dir()


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_splits_captions_and_ids_follow_the_json(data_dir: Path, retrieval_dir: Path) -> None:
    sources = tp.retrieval_source("custom", data_dir, split=None)
    assert set(sources) == {"train", "val", "test"}
    images = json.loads((retrieval_dir / "dataset_fixture.json").read_text())["images"]
    for split, src in sources.items():
        want = [im for im in images if im["split"] == split]
        assert len(src) == len(want) > 0
        for i, im in enumerate(want):  # JSON order is kept
            rec = src[i]
            assert int(rec["imgid"]) == im["imgid"]
            assert rec["filename"].decode() == im["filename"]
            assert [c.decode() for c in rec["captions"]] == [s["raw"] for s in im["sentences"]]
            assert len(rec["captions"]) == 5
            np.testing.assert_array_equal(rec["image"], _pixels(retrieval_dir / "images" / im["filename"]))
    assert (len(sources["train"]), len(sources["val"]), len(sources["test"])) == (18, 9, 9)


def test_retrieval_errors_name_the_problem(tmp_path: Path, retrieval_dir: Path) -> None:
    manual = tmp_path / "manual"
    shutil.copytree(retrieval_dir, manual)
    data = json.loads((manual / "dataset_fixture.json").read_text())
    data["images"][3]["filename"] = "missing.jpg"
    (manual / "dataset_fixture.json").write_text(json.dumps(data))
    with pytest.raises(tb.ManualDirError, match=r"images/missing\.jpg"):
        tp.retrieval_source("custom", tmp_path / "d1", manual)
    data["images"][3] = dict(data["images"][2])
    (manual / "dataset_fixture.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="imgid 2 appears twice"):
        tp.retrieval_source("custom", tmp_path / "d2", manual)
    with pytest.raises(tb.ManualDirError, match="dataset_rsicd.json"):
        tp.retrieval_source("rsicd", tmp_path / "d3", manual)


# ----------------------------------------------------------------------------- errors


def test_missing_manual_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_download"
    with pytest.raises(tb.ManualDirError, match=str(missing)):
        tp.scene_source("aid", tmp_path / "data", missing)
    with pytest.raises(tb.ManualDirError, match="not prepared.*no manual_dir"):
        tp.scene_source("aid", tmp_path / "data")
    with pytest.raises(tb.ManualDirError, match=str(missing)):
        tb.scene_split(missing)


def test_empty_class_folder_is_named(tmp_path: Path, scene_dir: Path) -> None:
    manual = tmp_path / "manual"
    shutil.copytree(scene_dir, manual)
    (manual / "wetland").mkdir()
    (manual / "wetland" / "readme.txt").write_text("images were not downloaded")
    with pytest.raises(tb.ManualDirError, match=f"{manual / 'wetland'}: class folder has no images"):
        tp.scene_source("custom", tmp_path / "data", manual)
    assert not list((tmp_path / "data" / "remoteclip_scenes" / "custom").iterdir())  # nothing half-written


def test_class_count_mismatch_and_corrupt_image(tmp_path: Path, scene_dir: Path) -> None:
    with pytest.raises(tb.ManualDirError, match="whurs19: expected 19 class folders.*found 4"):
        tp.scene_source("whurs19", tmp_path / "data", scene_dir)
    manual = tmp_path / "manual"
    shutil.copytree(scene_dir, manual)
    bad = manual / "meadow" / "zz_truncated.png"
    bad.write_bytes((manual / "farmland" / min(os.listdir(manual / "farmland"))).read_bytes()[:60])
    with pytest.raises(ValueError, match="zz_truncated.png"):
        tp.scene_source("custom", tmp_path / "data", manual)


# ----------------------------------------------------------------------------- no TensorFlow


def test_build_and_read_without_tensorflow(tmp_path: Path, scene_dir: Path, retrieval_dir: Path) -> None:
    """Build in one TF-less process, then read by name in another that never imports rsclip_jax."""
    build = NO_TF_PRELUDE + textwrap.dedent(f"""
        from rsclip_jax.data import tfds_prepared as tp
        s = tp.scene_source("custom", {str(tmp_path)!r}, {str(scene_dir)!r}, split="train")
        r = tp.retrieval_source("custom", {str(tmp_path)!r}, {str(retrieval_dir)!r}, split="val")
        assert (len(s), len(r)) == (31, 9), (len(s), len(r))
        assert s[0]["image"].shape[2] == 3 and len(r[0]["captions"]) == 5
        assert "tensorflow" not in sys.modules
        print("BUILD_OK")
    """)
    read = NO_TF_PRELUDE + textwrap.dedent(f"""
        import grain, tensorflow_datasets as tfds
        src = tfds.data_source("remoteclip_scenes/custom", split="test", data_dir={str(tmp_path)!r})
        names = src.dataset_info.features["label"].names
        labels = sorted(int(r["label"]) for r in grain.MapDataset.source(src))
        ret = tfds.data_source("remoteclip_retrieval/custom", split="train", data_dir={str(tmp_path)!r})
        assert names == ["farmland", "forest", "meadow", "residential"], names
        assert labels == [0, 0, 0, 0, 1, 1, 2, 2, 2, 3], labels
        assert len(ret) == 18 and ret[0]["image"].dtype.name == "uint8"
        assert "tensorflow" not in sys.modules and "rsclip_jax" not in sys.modules
        print("READ_OK")
    """)
    for script, marker in ((build, "BUILD_OK"), (read, "READ_OK")):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- rebuilds


def _test_files(data: Path) -> list[str]:
    src = tp.scene_source("custom", data, split="test")
    return [src[i]["filename"].decode() for i in range(len(src))]


def test_custom_scenes_rebuild_when_the_source_changes(tmp_path: Path, scene_dir: Path) -> None:
    manual, data = tmp_path / "manual", tmp_path / "data"
    shutil.copytree(scene_dir, manual)
    prepare = lambda: tp.prepare_dataset("scenes", "custom", data, manual)  # noqa: E731
    assert prepare().action == "built"
    assert prepare().action == "reused"
    (manual / "meadow" / "more_notes.txt").write_text("not an image")  # junk is not part of the dataset
    assert prepare().action == "reused"

    first = sorted(os.listdir(manual / "farmland"))[0]
    shutil.copy(manual / "farmland" / first, manual / "farmland" / "zz_added.png")  # added: 21 -> 16/5
    p = prepare()
    assert (p.action, p.split_sizes) == ("rebuilt", {"train": 31, "test": 11})
    assert "farmland/zz_added.png" in _test_files(data)

    (manual / "farmland" / "zz_added.png").unlink()  # removed
    p = prepare()
    assert (p.action, p.split_sizes) == ("rebuilt", {"train": 31, "test": 10})
    assert "farmland/zz_added.png" not in _test_files(data)

    target = manual / "meadow" / sorted(os.listdir(manual / "meadow"))[-2]  # modified: a test image, flipped
    with Image.open(target) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clearly later mtime on any filesystem
    assert prepare().action == "rebuilt"
    src = tp.scene_source("custom", data, split="test")
    rec = next(src[i] for i in range(len(src)) if src[i]["filename"].decode() == f"meadow/{target.name}")
    np.testing.assert_array_equal(rec["image"], _pixels(target))

    assert tp.prepare_dataset("scenes", "custom", data).action == "reused"  # no source given: used as it is
    assert not [p.name for p in (data / "remoteclip_scenes" / "custom").iterdir() if p.name != "1.1.0"]


def test_failed_rebuild_keeps_the_previous_copy(tmp_path: Path, scene_dir: Path) -> None:
    manual, data = tmp_path / "manual", tmp_path / "data"
    shutil.copytree(scene_dir, manual)
    tp.prepare_dataset("scenes", "custom", data, manual)
    good = (manual / "farmland" / min(os.listdir(manual / "farmland"))).read_bytes()
    (manual / "meadow" / "zz_truncated.png").write_bytes(good[:60])
    with pytest.raises(ValueError, match="zz_truncated.png"):
        tp.prepare_dataset("scenes", "custom", data, manual)
    assert len(_test_files(data)) == 10  # the old copy, in place and readable
    assert [p.name for p in (data / "remoteclip_scenes" / "custom").iterdir()] == ["1.1.0"]


def test_retrieval_rebuilds_when_its_json_changes(tmp_path: Path, retrieval_dir: Path) -> None:
    manual, data = tmp_path / "manual", tmp_path / "data"
    shutil.copytree(retrieval_dir, manual)
    assert tp.prepare_dataset("retrieval", "custom", data, manual).action == "built"
    js = manual / "dataset_fixture.json"
    entries = json.loads(js.read_text())
    entries["images"][3]["sentences"][0]["raw"] = "An edited caption ."
    js.write_text(json.dumps(entries))
    assert tp.prepare_dataset("retrieval", "custom", data, manual).action == "rebuilt"
    assert tp.retrieval_source("custom", data, split="test")[0]["captions"][0] == b"An edited caption ."


def test_16_bit_images_are_stored_as_the_evaluator_reads_them(tmp_path: Path) -> None:
    manual = tmp_path / "manual"
    for cls in ("forest", "meadow"):
        (manual / cls).mkdir(parents=True)
        for f in sorted(os.listdir(SCENES / cls))[:2]:
            shutil.copy(SCENES / cls / f, manual / cls / f)
    ramp = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 37 + 1000).astype(np.uint16)
    Image.fromarray(ramp).save(manual / "meadow" / "z16.tif")  # mode I;16: percentile-stretched by to_rgb
    src = tp.scene_source("custom", tmp_path / "data", manual, split="test")
    rec = next(src[i] for i in range(len(src)) if src[i]["filename"].decode() == "meadow/z16.tif")
    np.testing.assert_array_equal(rec["image"], np.asarray(load_image(manual / "meadow" / "z16.tif")))
    assert rec["image"].min() == 0 and rec["image"].max() == 255


# ----------------------------------------------------------------------------- Apache Beam

# What a user passes to `rsclip data tfds --beam-pipeline-options`; in_memory keeps the direct
# runner in this process (multi_processing works too, see docs/tfds.md, but costs worker start-up).
BEAM_OPTIONS = "runner=DirectRunner,direct_running_mode=in_memory"


def test_beam_build_writes_the_same_records_in_the_same_order(
        tmp_path: Path, scene_dir: Path, retrieval_dir: Path, data_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    beam = pytest.importorskip("apache_beam")
    made: list[object] = []  # what each split's examples were: PTransforms, not generators
    examples = tb._SourceTracking._generate_examples

    def spy(self: tb._SourceTracking, items: list, make_example: object) -> object:
        made.append(out := examples(self, items, make_example))
        return out

    monkeypatch.setattr(tb._SourceTracking, "_generate_examples", spy)
    options = tp.beam_pipeline_options(BEAM_OPTIONS)
    scenes = tp.prepare_dataset("scenes", "custom", tmp_path, scene_dir, beam_options=options)
    retrieval = tp.prepare_dataset("retrieval", "custom", tmp_path, retrieval_dir, beam_options=options)
    assert len(made) == 5 and all(isinstance(m, beam.PTransform) for m in made)  # train+test, train+val+test
    assert scenes.split_sizes == {"train": 31, "test": 10}
    assert retrieval.split_sizes == {"train": 18, "val": 9, "test": 9}  # 36 entries, split i % 4 by the fixture

    for builder, split_names in (("scenes", ("train", "test")), ("retrieval", sorted(retrieval.split_sizes))):
        reference = tp.open_prepared(data_dir / f"remoteclip_{builder}" / "custom", builder)
        on_beam = tp.open_prepared(tmp_path / f"remoteclip_{builder}" / "custom", builder)
        assert on_beam.metadata["source_fingerprint"] == reference.metadata["source_fingerprint"]
        for split in split_names:
            n = reference.images.count(split)
            assert on_beam.images.count(split) == n > 0
            for i in range(n):  # every field, image bytes included, record by record
                got, want = on_beam.images.record(split, i), reference.images.record(split, i)
                assert sorted(got) == sorted(want)
                for field in want:
                    np.testing.assert_array_equal(np.asarray(got[field], dtype=object),
                                                  np.asarray(want[field], dtype=object), err_msg=f"{split}[{i}]")


def test_beam_options_errors_say_what_to_do(tmp_path: Path, scene_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("", " , ", "--runner=DirectRunner", "runner"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            tp.beam_pipeline_options(bad)
    # Without apache_beam the build stops before writing anything, and says how to install it.
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    with pytest.raises(tb.BeamNotInstalledError, match=r'pip install -e "\.\[beam\]"'):
        tp.beam_pipeline_options("runner=DirectRunner")
    cfg = tfds.download.DownloadConfig(manual_dir=str(scene_dir), try_download_gcs=False, beam_runner="DirectRunner")
    with pytest.raises(tb.BeamNotInstalledError, match="apache_beam"):
        tb.scene_builder("custom", tmp_path).download_and_prepare(download_config=cfg)
    assert not list(tmp_path.rglob("*.array_record*"))
