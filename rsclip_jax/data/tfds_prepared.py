"""Preparing the TFDS datasets of `rsclip_jax.data.tfds_builders`, and reading them back for evaluation.

- `prepare_dataset(kind, name, data_dir, manual_dir)`: build into `data_dir` if needed, rebuild
  when the source folder changed since (what `rsclip data tfds` runs); returns a `Prepared`.
  `beam_options=` (see `beam_pipeline_options`) builds on Apache Beam instead of in this process.
- `scene_source` / `retrieval_source`: the same, returning tfds data sources (grain takes them).
- `open_prepared(path)`: a prepared dataset's folder as a `PreparedDataset`, the records' fields
  and a `RecordImages` reader of their images (what `rsclip eval` reads for `tfds:<path>`).

`RecordImages` decodes the stored bytes with PIL and `rsclip_jax.preprocess.to_rgb`, as
`load_image` reads the source file. RGB JPEG/PNG files are stored byte for byte and other images
as lossless PNGs of `to_rgb`'s result (`tfds_builders.encode_image`), so the decoded pixels, and
hence the embeddings, equal those of the source folder.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from PIL import Image

from rsclip_jax.data.splits import DEFAULT_TRAIN_FRACTION
from rsclip_jax.data.tfds_builders import (
    ManualDirError,
    expand_user,
    import_beam,
    retrieval_builder,
    scene_builder,
)
from rsclip_jax.preprocess import ImageReadError, to_rgb


class PreparedDatasetError(ValueError):
    """A folder is not a prepared dataset, or not of the kind asked for; the message names it."""


def beam_pipeline_options(spec: str) -> Any:
    """Beam `PipelineOptions` from `spec`, comma-separated KEY=VALUE pairs as `tfds build
    --beam_pipeline_options` takes them, e.g. "runner=DirectRunner,direct_num_workers=2".

    Raises:
        ValueError: `spec` is empty or a pair is malformed (the message names it and the format).
        BeamNotInstalledError: apache_beam does not import.
    """
    pairs = [p.strip() for p in spec.split(",") if p.strip()]
    if not pairs:
        raise ValueError("Beam pipeline options are empty; give comma-separated KEY=VALUE pairs, "
                         "e.g. runner=DirectRunner,direct_num_workers=2")
    flags = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or key.startswith("-"):
            raise ValueError(f"Beam pipeline option {pair!r} is not KEY=VALUE (write runner=DirectRunner, "
                             "not --runner=DirectRunner); separate pairs with commas")
        flags.append(f"--{key}={value}")
    beam = import_beam()
    return beam.options.pipeline_options.PipelineOptions(flags)


def _download_config(manual_dir: str | Path | None, beam_options: Any = None) -> tfds.download.DownloadConfig:
    # try_download_gcs=False: a builder named like a hosted dataset must never fetch prepared data.
    return tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir),
                                        try_download_gcs=False, beam_options=beam_options)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A dataset ready in its data_dir.

    Attributes:
        name: `<builder>/<config>:<version>`, e.g. `remoteclip_scenes/custom:1.1.0`.
        path: the dataset's folder; `rsclip eval` reads it as `tfds:<path>`.
        action: "built", "rebuilt" (its source folder changed since) or "reused".
        split_sizes: number of records per split.
    """

    name: str
    path: Path
    action: str
    split_sizes: dict[str, int]


def _manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: str | Path) -> Path:
    path = Path(expand_user(manual_dir))
    if not path.is_dir():  # tfds would raise a bare AssertionError for this
        raise ManualDirError(f"manual directory {path} does not exist "
                             f"(needed to build {builder.name}/{builder.builder_config.name})")
    return path


def _prepare(make: Callable[[], tfds.core.DatasetBuilder], manual_dir: str | Path | None,
             beam_options: Any = None) -> tuple[tfds.core.DatasetBuilder, str]:
    """Builds if needed, and rebuilds when `manual_dir`'s files differ from those the stored copy
    was built from. Without `manual_dir` a prepared copy is used as it is. A build runs on Beam
    when `beam_options` (Beam `PipelineOptions`) is given."""
    builder = make()
    if builder.is_prepared():
        if manual_dir is None:
            return builder, "reused"
        root = _manual_dir(builder, manual_dir)
        stored = (builder.info.metadata or {}).get("source_fingerprint")
        if stored == builder.source_fingerprint(root):
            return builder, "reused"
        # Move the stale copy aside (tfds ignores non-version folders), build, then delete it; a
        # failed build puts it back, so the stale copy is never lost without a new one in place.
        path = Path(builder.data_path)
        aside = path.with_name(f".stale.{path.name}.{os.getpid()}")
        path.rename(aside)
        try:
            builder = make()
            builder.download_and_prepare(download_config=_download_config(root, beam_options))
        except BaseException:
            if not path.exists():
                aside.rename(path)
            raise
        shutil.rmtree(aside)
        return builder, "rebuilt"
    if manual_dir is None:
        raise ManualDirError(f"{builder.info.full_name} is not prepared in {builder.data_dir_root} "
                             "and no manual_dir was given to build it from")
    builder.download_and_prepare(download_config=_download_config(_manual_dir(builder, manual_dir), beam_options))
    return builder, "built"


def _open(builder: tfds.core.DatasetBuilder, split: str | None, decoders: dict | None) -> Any:
    name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
    return tfds.data_source(name, split=split, data_dir=builder.data_dir_root, decoders=decoders, download=False)


def prepare_dataset(kind: str, name: str, data_dir: str | Path, manual_dir: str | Path | None = None, *,
                    train_fraction: float = DEFAULT_TRAIN_FRACTION, beam_options: Any = None) -> Prepared:
    """Builds dataset `name` of builder `kind` ("scenes" or "retrieval") into `data_dir` if needed.

    A prepared copy is reused unless `manual_dir` is given and its files (paths, sizes, mtimes)
    differ from those the copy was built from; then it is rebuilt. `train_fraction`: scenes only.
    `beam_options`: Beam `PipelineOptions` (`beam_pipeline_options("runner=...")`); a build then
    runs as a Beam pipeline and writes the same records in the same order.

    Raises:
        ManualDirError: the dataset is not prepared and `manual_dir` is missing or badly laid out.
        ValueError: an unknown `kind`, or an unreadable image (the message names it).
        BeamNotInstalledError: `beam_options` given, and apache_beam does not import.
    """
    if kind == "scenes":
        make = lambda: scene_builder(name, data_dir, train_fraction=train_fraction)
    elif kind == "retrieval":
        if train_fraction != DEFAULT_TRAIN_FRACTION:
            raise ValueError("train_fraction applies to scene datasets; retrieval splits come from the JSON")
        make = lambda: retrieval_builder(name, data_dir)
    else:
        raise ValueError(f"unknown builder {kind!r}; expected scenes or retrieval")
    builder, action = _prepare(make, manual_dir, beam_options)
    sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
    return Prepared(f"{builder.name}/{builder.builder_config.name}:{builder.version}", Path(builder.data_path),
                    action, sizes)


def scene_source(name: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                 split: str | None = "test", *, train_fraction: float = DEFAULT_TRAIN_FRACTION,
                 decoders: dict | None = None) -> Any:
    """Build scene dataset `name` into `data_dir` if needed (see `prepare_dataset`); return its
    random-access data source.

    Records are dicts: image (H, W, 3) uint8, label int, filename bytes (`<class>/<file>`).
    Pass `decoders={"image": tfds.decode.SkipDecoding()}` to get the encoded image bytes instead.
    `split=None` returns a dict of all splits. The result feeds `grain.MapDataset.source`.
    """
    builder, _ = _prepare(lambda: scene_builder(name, data_dir, train_fraction=train_fraction), manual_dir)
    return _open(builder, split, decoders)


def retrieval_source(name: str, data_dir: str | Path, manual_dir: str | Path | None = None,
                     split: str | None = "test", *, decoders: dict | None = None) -> Any:
    """Build retrieval dataset `name` into `data_dir` if needed (see `prepare_dataset`); return its
    data source.

    Records are dicts: image (H, W, 3) uint8, captions (list of bytes), filename bytes, imgid int.
    """
    builder, _ = _prepare(lambda: retrieval_builder(name, data_dir), manual_dir)
    return _open(builder, split, decoders)


def class_names(source: Any) -> list[str]:
    """The label names of a scene data source (folder names, in label order)."""
    return list(source.dataset_info.features["label"].names)


# ----------------------------------------------------------------------------- reading back


def dataset_dir(path: str | os.PathLike) -> Path:
    """The prepared dataset at `path`: a folder holding dataset_info.json, or a config folder
    (`<data_dir>/<builder>/<config>`) holding exactly one such version folder."""
    p = Path(expand_user(path))
    if (p / "dataset_info.json").is_file():
        return p
    versions = sorted(d for d in p.iterdir() if not d.name.startswith(".") and (d / "dataset_info.json").is_file()) \
        if p.is_dir() else []
    if len(versions) == 1:
        return versions[0]
    if versions:
        raise PreparedDatasetError(f"{p}: holds several prepared versions ({', '.join(d.name for d in versions)}); "
                                   "give the folder of one")
    raise PreparedDatasetError(f"{p}: not a prepared TFDS dataset (no dataset_info.json); prepare one with "
                               "`rsclip data tfds --builder scenes|retrieval --source DIR --data-dir DIR`")


class RecordImages:
    """Reads the images of a prepared dataset's records for `Extractor.images` (the reader protocol).

    Items are strings `tfds:<dataset dir>/<split>[<index>]/<filename>`, made by `item`.
    `identity(item)` changes when the split's record files change (a rebuild); `read(item)` decodes
    the stored bytes to an RGB `PIL.Image` as `rsclip_jax.preprocess.load_image` reads a file.
    """

    def __init__(self, path: Path, sources: dict[str, Any]):
        self.path, self._sources = path, sources
        self._where: dict[str, tuple[str, int]] = {}
        self._files: dict[str, list[Any]] = {}
        self._lock = threading.Lock()  # record reads from the extractor's decoding threads

    def item(self, split: str, index: int, filename: str) -> str:
        """The item name of record `index` of `split`."""
        name = f"tfds:{self.path}/{split}[{index}]/{filename}"
        self._where[name] = (split, index)
        return name

    def identity(self, item: str) -> list[Any]:
        split, index = self._where[item]
        if split not in self._files:
            files = sorted(self.path.glob(f"*-{split}.array_record*"))
            self._files[split] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return [str(self.path.resolve()), split, index, self._files[split]]

    def count(self, split: str) -> int:
        """Number of records in `split`."""
        return len(self._sources[split])

    def record(self, split: str, index: int) -> dict[str, Any]:
        """Record `index` of `split`, its image as encoded bytes."""
        with self._lock:
            return self._sources[split][index]

    def read(self, item: str) -> Image.Image:
        """The item's image, RGB.

        Raises:
            ImageReadError: naming the item, when the stored bytes do not decode.
        """
        data = self.record(*self._where[item])["image"]
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageReadError(f"{item}: cannot decode the stored image: {e}") from None


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset opened for reading.

    Attributes:
        path: its folder (`<data_dir>/<builder>/<config>/<version>`).
        builder: "remoteclip_scenes" or "remoteclip_retrieval" (tfds names).
        config: the config name, e.g. "aid", "custom", "custom_train70".
        metadata: what the build recorded: source, source_fingerprint, and split_rule and
            train_fraction (scenes) or annotations (retrieval); empty for copies built before 1.1.0.
        class_names: label names (scenes), else None.
        splits: split names.
        images: the reader of the records' images.
    """

    path: Path
    builder: str
    config: str
    metadata: dict[str, Any]
    class_names: list[str] | None
    splits: list[str]
    images: RecordImages

    def records(self, split: str) -> list[dict[str, Any]]:
        """Every record of `split` in stored order, without its image: `item` (see `RecordImages`),
        `filename` (str), and `label` (int; scenes) or `captions` (list of str) and `imgid` (retrieval)."""
        if split not in self.splits:
            raise PreparedDatasetError(f"{self.path}: no split {split!r}; it has {', '.join(self.splits)}")
        out = []
        for i in range(self.images.count(split)):
            rec = self.images.record(split, i)
            filename = rec["filename"].decode()
            row: dict[str, Any] = {"item": self.images.item(split, i, filename), "filename": filename}
            if "label" in rec:
                row["label"] = int(rec["label"])
            if "captions" in rec:
                row["captions"] = [c.decode() for c in rec["captions"]]
                row["imgid"] = int(rec["imgid"])
            out.append(row)
        return out


def open_prepared(path: str | os.PathLike, builder: str | None = None) -> PreparedDataset:
    """Opens the prepared dataset at `path` (see `dataset_dir`); `builder` ("scenes" or
    "retrieval") checks its kind. Reading needs neither TensorFlow nor the builder classes
    (`tfds.builder_from_directory` restores the features from the folder).

    Raises:
        PreparedDatasetError: `path` is not a prepared dataset, or not of kind `builder`.
    """
    path = dataset_dir(path)
    ro = tfds.builder_from_directory(path)
    if builder is not None and ro.name != f"remoteclip_{builder}":
        raise PreparedDatasetError(f"{path}: a {ro.name} dataset, not remoteclip_{builder}; prepare one with "
                                   f"`rsclip data tfds --builder {builder}`")
    skip = {"image": tfds.decode.SkipDecoding()}  # decoded by RecordImages.read, as files are
    splits = sorted(ro.info.splits)
    sources = {s: ro.as_data_source(split=s, decoders=skip) for s in splits}
    features = ro.info.features
    names = list(features["label"].names) if "label" in features else None
    metadata = dict(ro.info.metadata or {})
    return PreparedDataset(path, ro.name, ro.builder_config.name if ro.builder_config else path.parent.name,
                           metadata, names, splits, RecordImages(path, sources))
