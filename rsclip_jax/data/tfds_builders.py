"""tensorflow-datasets builders for RemoteCLIP's downstream datasets, without TensorFlow.

Two builders read a manual-download directory and write **array_record** files that
`tfds.data_source` opens for random access (and `grain.MapDataset.source` wraps):

- `RemoteclipScenes`: folder-per-class scene classification (`<manual_dir>/<class>/<image>`),
  split per class by RemoteCLIP's 8:2 rule. One config per zero-shot dataset, plus `custom`.
- `RemoteclipRetrieval`: Karpathy-JSON image-text retrieval (RSICD, RSITMD, UCM, custom),
  split by each image's `split` field.

`scene_source` / `retrieval_source` build a dataset once and return its data source.
See docs/tfds.md for the layouts, the split rule and what works without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
DEFAULT_TRAIN_FRACTION = 0.8
# Encoded bytes in these formats are stored untouched when the image is already 8-bit RGB:
# the pixels a reader decodes are exactly the original ones, and nothing is re-compressed.
_PASSTHROUGH_FORMATS = frozenset({"JPEG", "PNG"})
# 8-bit modes that convert to RGB without losing meaning (alpha is dropped, palettes expanded).
_CONVERTIBLE_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"})


class ManualDirError(FileNotFoundError):
    """The manual-download directory is missing or not laid out as the builder expects."""


# ----------------------------------------------------------------------------- helpers


def split_counts(n: int, train_fraction: float = DEFAULT_TRAIN_FRACTION) -> tuple[int, int]:
    """Return `(n_train, n_test)` for a class with `n` images.

    `n_train = floor(train_fraction * n)`, computed on the fraction's decimal value
    (`Fraction(str(f))`) so that binary rounding never moves an image: 0.29 * 100 is
    28.999999999999996 in floating point but gives exactly 29 here.
    """
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    n_train = int(Fraction(str(train_fraction)) * n)  # int() floors a non-negative Fraction
    return n_train, n - n_train


def _is_image_file(path: Path) -> bool:
    # Names starting with "." include macOS "._x.jpg" AppleDouble files, which are not images.
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_scene_classes(root: Path) -> dict[str, list[str]]:
    """Map each class folder under `root` (sorted by name) to its image file names (sorted).

    Sorting is plain Python string order (code points), so `img_10.jpg` sorts before
    `img_2.jpg`, exactly as `sorted(os.listdir(...))` does.

    Raises:
        ManualDirError: `root` is missing, has no class folders, or a class folder has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManualDirError(f"manual directory {root} does not exist; put one folder per class in it "
                             f"(<manual_dir>/<class>/<image>) and pass it as manual_dir")
    classes = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if not classes:
        raise ManualDirError(f"manual directory {root} has no class folders; expected <manual_dir>/<class>/<image>")
    out: dict[str, list[str]] = {}
    for name in classes:
        files = sorted(p.name for p in (root / name).iterdir() if _is_image_file(p))
        if not files:
            raise ManualDirError(f"class folder {root / name} has no images "
                                 f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                 "remove it or fill it — an empty class would change the label set")
        out[name] = files
    return out


def encode_image(path: Path) -> bytes:
    """Return encoded bytes of `path` that TFDS's numpy decoder turns into a (H, W, 3) uint8 array.

    8-bit RGB JPEG/PNG files pass through byte for byte. Anything else (TIFF, BMP, grayscale,
    palette, RGBA, CMYK) is converted to RGB and re-encoded as lossless PNG, because TFDS decodes
    with `np.asarray(PIL.Image.open(...))` and would otherwise return 2-D or 4-channel arrays.
    The image is fully decoded here so a truncated or corrupt file fails the build, naming it.
    """
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format in _PASSTHROUGH_FORMATS and im.mode == "RGB":
                return data
            if im.mode not in _CONVERTIBLE_MODES:
                raise ValueError(f"mode {im.mode} is not 8-bit; convert the dataset to 8-bit RGB first")
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ValueError(f"cannot use image {path}: {e}") from e


def _image_feature() -> tfds.features.Image:
    # No encoding_format: the generators hand TFDS encoded bytes, which it stores as they are.
    # A numpy array would go through tf.image.encode_png (tfds 4.9's only array encoder) and
    # need TensorFlow.
    return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8)


class _ModuleCodePath:
    """Mixin: report this file as the builders' code path.

    tfds 4.9.10's `DatasetBuilder.code_path` does `isinstance(path, importlib_resources.abc.Traversable)`
    for builders defined inside a package, but `importlib_resources` is only a dependency on
    Python < 3.9, so without this override the build dies with "No module named 'importlib_resources'".
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


def _expand(path: str | Path) -> str:
    return str(Path(path).expanduser())  # tfds/epath do not expand "~"


def _download_config(manual_dir: str | Path | None) -> tfds.download.DownloadConfig:
    # try_download_gcs=False: a builder named like a hosted dataset must never fetch prepared data.
    return tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir),
                                        try_download_gcs=False)


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass(eq=False)
class SceneConfig(tfds.core.BuilderConfig):
    """One scene-classification dataset.

    Attributes:
        num_classes: expected number of class folders (None: any); a mismatch fails the build,
            which catches a manual_dir pointing one level too high or too low.
        train_fraction: per-class share of the (name-sorted) files that goes to `train`.
        manual_layout: how the official download unpacks, for the error messages and docs.
    """

    num_classes: int | None = None
    train_fraction: float = DEFAULT_TRAIN_FRACTION
    manual_layout: str = "<manual_dir>/<class>/<image>"


# (config name, dataset, number of classes, note on the layout of the official download).
_SCENE_DATASETS: tuple[tuple[str, str, int, str], ...] = (
    ("aid", "AID", 30, "AID/<class>/*.jpg"),
    ("eurosat", "EuroSAT (RGB)", 10, "EuroSAT/2750/<class>/*.jpg (the RGB release, not the 13-band tifs)"),
    ("mlrsnet", "MLRSNet", 46, "Images/<class>/*.jpg (unpack each class's .rar into one folder)"),
    ("resisc45", "NWPU-RESISC45", 45, "NWPU-RESISC45/<class>/*.jpg"),
    ("optimal31", "OPTIMAL-31", 31, "OPTIMAL-31/Images/<class>/*.jpg"),
    ("patternnet", "PatternNet", 38, "PatternNet/images/<class>/*.jpg"),
    ("rsc11", "RSC11", 11, "<class>/*.tif"),
    ("rs2800", "RS2800 (RSSCN7)", 7, "<class>/*.jpg (class folders such as aGrass, bField)"),
    ("rsicb128", "RSI-CB128", 45, "flatten the 6 top-level categories: <manual_dir>/<class>/*.tif"),
    ("rsicb256", "RSI-CB256", 35, "flatten the 6 top-level categories: <manual_dir>/<class>/*.tif"),
    ("siriwhu", "SIRI-WHU", 12, "12class_tif/<class>/*.tif"),
    ("whurs19", "WHU-RS19", 19, "WHU-RS19/<class>/*.jpg"),
)


class RemoteclipScenes(_ModuleCodePath, tfds.core.GeneratorBasedBuilder):
    """Folder-per-class scene classification with RemoteCLIP's per-class 8:2 split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Per-class name-sorted split, first floor(f*n) files to train."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the dataset and pass manual_dir=<the folder that holds one folder per class>. "
        "Each config's description gives the layout of the official download.")
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        SceneConfig(name=name, num_classes=n, manual_layout=layout,
                    description=f"{title}: {n} classes; manual_dir is the folder that holds them ({layout}).")
        for name, title, n, layout in _SCENE_DATASETS
    ] + [SceneConfig(name="custom", description="Any folder-per-class dataset: <manual_dir>/<class>/<image>.")]
    def _info(self) -> tfds.core.DatasetInfo:
        # Class names come from the manual directory, known only in _split_generators; they are
        # set there, written next to the data (label.labels.txt) and restored from it on read.
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": _image_feature(),
                "label": tfds.features.ClassLabel(),
                "filename": tfds.features.Text(),  # "<class>/<file>", unique within the dataset
            }),
            supervised_keys=("image", "label"),
            # No hash shuffle at write time: records are stored in key order, and the keys are the
            # positions in the (class, file name) listing, so index i of a split is its i-th image.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        cfg: SceneConfig = self.builder_config
        root = Path(dl_manager.manual_dir)
        classes = list_scene_classes(root)
        if cfg.num_classes is not None and len(classes) != cfg.num_classes:
            raise ManualDirError(
                f"{cfg.name}: expected {cfg.num_classes} class folders in {root}, found {len(classes)} "
                f"({', '.join(list(classes)[:8])}{', ...' if len(classes) > 8 else ''}); "
                f"layout: {cfg.manual_layout}")
        self.info.features["label"].names = list(classes)
        train: list[tuple[str, int]] = []
        test: list[tuple[str, int]] = []
        for label, (name, files) in enumerate(classes.items()):
            n_train, _ = split_counts(len(files), cfg.train_fraction)
            train += [(f"{name}/{f}", label) for f in files[:n_train]]
            test += [(f"{name}/{f}", label) for f in files[n_train:]]
        return {"train": self._generate_examples(root, train), "test": self._generate_examples(root, test)}

    def _generate_examples(self, root: Path, items: list[tuple[str, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, (rel, label) in enumerate(items):
            yield key, {"image": encode_image(root / rel), "label": label, "filename": rel}


# ----------------------------------------------------------------------------- retrieval


@dataclasses.dataclass(eq=False)
class RetrievalConfig(tfds.core.BuilderConfig):
    """One Karpathy-JSON retrieval dataset.

    Attributes:
        json_glob: pattern of the annotation file in the manual directory (exactly one must match).
        image_dirs: folders (relative to the manual directory) tried in order for the images.
    """

    json_glob: str = "dataset*.json"
    image_dirs: tuple[str, ...] = ("images", "imgs")


class RemoteclipRetrieval(_ModuleCodePath, tfds.core.GeneratorBasedBuilder):
    """Karpathy-JSON image-text retrieval: splits, captions and ids exactly as the JSON has them."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Splits from the JSON's `split` field; captions are sentences[i].raw."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass manual_dir=<folder with the Karpathy dataset_*.json and the images folder>.")
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        RetrievalConfig(name="rsicd", json_glob="dataset_rsicd.json", image_dirs=("RSICD_images", "images"),
                        description="RSICD: dataset_rsicd.json + RSICD_images/ (10,921 images, 5 captions each)."),
        RetrievalConfig(name="rsitmd", json_glob="dataset_RSITMD.json", image_dirs=("images",),
                        description="RSITMD: dataset_RSITMD.json + images/ (4,743 images, 5 captions each)."),
        RetrievalConfig(name="ucm", json_glob="dataset*.json", image_dirs=("imgs", "images"),
                        description="UCM-Captions: dataset.json + imgs/ (2,100 images, 5 captions each)."),
        RetrievalConfig(name="custom", description="Any Karpathy-format dataset_*.json + images/ (or imgs/)."),
    ]
    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": _image_feature(),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "filename": tfds.features.Text(),
                "imgid": np.int64,
            }),
            disable_shuffling=True,  # keys are JSON positions: index i is the split's i-th JSON entry
        )

    def _locate(self, root: Path) -> tuple[Path, Path]:
        cfg: RetrievalConfig = self.builder_config
        if not root.is_dir():
            raise ManualDirError(f"manual directory {root} does not exist; it should hold {cfg.json_glob} "
                                 f"and one of {list(cfg.image_dirs)}")
        found = sorted(root.glob(cfg.json_glob))
        if len(found) != 1:
            raise ManualDirError(f"{cfg.name}: expected exactly one {cfg.json_glob} in {root}, "
                                 f"found {[p.name for p in found] or 'none'}")
        for d in cfg.image_dirs:
            if (root / d).is_dir():
                return found[0], root / d
        raise ManualDirError(f"{cfg.name}: no image folder in {root}; tried {list(cfg.image_dirs)}")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        json_path, image_dir = self._locate(Path(dl_manager.manual_dir))
        images = json.loads(json_path.read_text())["images"]
        by_split: dict[str, list[dict]] = {}
        seen: set[int] = set()
        for item in images:
            if item["imgid"] in seen:  # ids must name one image each, or text->image retrieval is ambiguous
                raise ValueError(f"{json_path}: imgid {item['imgid']} appears twice")
            seen.add(item["imgid"])
            by_split.setdefault(item["split"], []).append(item)
        return {split: self._generate_examples(image_dir, items) for split, items in sorted(by_split.items())}

    def _generate_examples(self, image_dir: Path, items: list[dict]) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, item in enumerate(items):
            # COCO-style Karpathy files add a `filepath` subfolder; the RS ones do not.
            path = image_dir / item.get("filepath", "") / item["filename"]
            if not path.is_file():
                raise ManualDirError(f"image {path} (imgid {item['imgid']}) listed in the JSON does not exist")
            yield key, {
                "image": encode_image(path),
                "captions": [s["raw"] for s in item["sentences"]],
                "filename": item["filename"],
                "imgid": item["imgid"],
            }


# ----------------------------------------------------------------------------- sources


def _prepare_and_open(builder: tfds.core.DatasetBuilder, manual_dir: str | Path | None,
                      split: str | None, decoders: dict | None) -> Any:
    # Only touch the manual directory when the files are not there yet; a prepared data_dir
    # is readable without the original download.
    if not builder.is_prepared():
        manual_dir = None if manual_dir is None else _expand(manual_dir)
        if manual_dir is None:
            raise ManualDirError(f"{builder.info.full_name} is not prepared in {builder.data_dir_root} "
                                 "and no manual_dir was given to build it from")
        if not Path(manual_dir).is_dir():  # tfds would raise a bare AssertionError for this
            raise ManualDirError(f"manual directory {manual_dir} does not exist "
                                 f"(needed to build {builder.name}/{builder.builder_config.name})")
        builder.download_and_prepare(download_config=_download_config(manual_dir))
    name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
    return tfds.data_source(name, split=split, data_dir=builder.data_dir_root,
                            decoders=decoders, download=False)


def scene_builder(name: str, data_dir: str | Path, *,
                  train_fraction: float = DEFAULT_TRAIN_FRACTION) -> RemoteclipScenes:
    """The scene builder for config `name`; a non-default `train_fraction` gets its own config
    (`<name>_train<percent>`, e.g. `aid_train70`), so differently split copies never share a directory."""
    if train_fraction == DEFAULT_TRAIN_FRACTION:
        return RemoteclipScenes(config=name, data_dir=_expand(data_dir), file_format="array_record")
    base = next((c for c in RemoteclipScenes.BUILDER_CONFIGS if c.name == name), None)
    if base is None:
        raise ValueError(f"unknown scene config {name!r}; one of {[c.name for c in RemoteclipScenes.BUILDER_CONFIGS]}")
    split_counts(0, train_fraction)  # validates the range before anything is written
    # Config names must be Python identifiers for tfds' name parser: 0.755 -> "train75_5".
    percent = f"{float(Fraction(str(train_fraction)) * 100):g}".replace(".", "_")
    cfg = dataclasses.replace(base, name=f"{name}_train{percent}", train_fraction=train_fraction,
                              description=f"{base.description} train_fraction={train_fraction:g}.")
    return RemoteclipScenes(config=cfg, data_dir=_expand(data_dir), file_format="array_record")


def scene_source(name: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                 split: str | None = "test", *, train_fraction: float = DEFAULT_TRAIN_FRACTION,
                 decoders: dict | None = None) -> Any:
    """Build scene dataset `name` into `data_dir` if needed; return its random-access data source.

    Records are dicts: image (H, W, 3) uint8, label int, filename bytes (`<class>/<file>`).
    Pass `decoders={"image": tfds.decode.SkipDecoding()}` to get the encoded image bytes instead.
    `split=None` returns a dict of all splits. The result feeds `grain.MapDataset.source`.
    """
    builder = scene_builder(name, data_dir, train_fraction=train_fraction)
    return _prepare_and_open(builder, manual_dir, split, decoders)


def retrieval_source(name: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                     split: str | None = "test", *, decoders: dict | None = None) -> Any:
    """Build retrieval dataset `name` into `data_dir` if needed; return its data source.

    Records are dicts: image (H, W, 3) uint8, captions (list of bytes), filename bytes, imgid int.
    """
    builder = RemoteclipRetrieval(config=name, data_dir=_expand(data_dir), file_format="array_record")
    return _prepare_and_open(builder, manual_dir, split, decoders)


def class_names(source: Any) -> list[str]:
    """The label names of a scene data source (folder names, in label order)."""
    return list(source.dataset_info.features["label"].names)
