"""RemoteCLIP's scene-dataset split: the one rule for which images a scene folder holds and how
they divide into train and test.

The evaluator (`rsclip_jax.evaluate.datasets`) and the TFDS scene builder
(`rsclip_jax.data.tfds_builders`) both call `split_scene_folder`, so a folder and the TFDS dataset
prepared from it hold the same images in the same splits and order.

Layout: `ROOT/<class>/<image>`; or, for a dataset with an official split, `ROOT/train/<class>/<image>`
and `ROOT/test/<class>/<image>`. Class folders are sorted by name and label `i` is the `i`-th; names
starting with "." and `__MACOSX` are not classes. A class folder's images are the files that
`rsclip_jax.preprocess.is_image_name` accepts, sorted by name, without recursion.

Without an official split each class is split on its own (RemoteCLIP's 8:2 rule): files sorted by
name in plain code-point order (`B.jpg < a.jpg`, `img_10 < img_2`), the first
`floor(train_fraction * n)` go to train and the rest to test. The floor is taken on the fraction's
decimal value, so float error never moves an image (0.29 * 100 = 28.999... in floats gives 29).
A class of one image goes to test: a class is never left without a test image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from rsclip_jax.preprocess import IMAGE_EXTENSIONS, is_image_name

DEFAULT_TRAIN_FRACTION = 0.8
OFFICIAL_SPLITS = ("train", "test")


class SceneFolderError(ValueError):
    """A scene folder is missing or not laid out as `<root>/<class>/<image>`; the message names it."""


class EmptyClassError(SceneFolderError):
    """A class folder holds no images (`skip_empty` leaves such folders out instead)."""


def split_counts(n: int, train_fraction: float = DEFAULT_TRAIN_FRACTION) -> tuple[int, int]:
    """`(n_train, n_test)` for a class of `n` images: `n_train = floor(train_fraction * n)`.

    Computed on the fraction's decimal value (`Fraction(str(f))`), so binary rounding never moves
    an image: 0.29 * 100 is 28.999999999999996 in floating point but gives exactly 29 here.

    Raises:
        ValueError: `train_fraction` is outside [0, 1].
    """
    if not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in [0, 1], got {train_fraction}")
    n_train = int(Fraction(str(train_fraction)) * n)  # int() floors a non-negative Fraction
    return n_train, n - n_train


def split_rule(train_fraction: float = DEFAULT_TRAIN_FRACTION) -> str:
    """How a folder without official splits is divided, for reports: 0.8 -> 'sorted 8:2'."""
    tenths = Fraction(str(train_fraction)) * 10
    if tenths.denominator == 1:
        return f"sorted {tenths}:{10 - tenths}"
    percent = float(tenths * 10)
    return f"sorted {percent:g}:{100 - percent:g}"


def class_folders(root: str | os.PathLike) -> list[str]:
    """Names of the class folders directly under `root`, sorted (hidden ones and __MACOSX left out)."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")


def class_images(folder: str | os.PathLike) -> list[str]:
    """File names of the images directly in `folder`, sorted by code point."""
    return sorted(p.name for p in Path(folder).iterdir() if is_image_name(p.name) and p.is_file())


@dataclass(frozen=True)
class SceneSplit:
    """A scene folder divided into train and test.

    Attributes:
        root: the folder.
        classes: class folder names, sorted; label `i` is `classes[i]`.
        train, test: `(path relative to root, label)` in (class, file name) order; paths use "/".
        rule: "official" (train/ and test/ folders) or `split_rule(train_fraction)`.
        skipped: class folders without images that were left out (only with `skip_empty`).
    """

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    rule: str
    skipped: list[str] = field(default_factory=list)


def _list_classes(root: Path, skip_empty: bool, skipped: list[str]) -> dict[str, list[str]]:
    if not root.is_dir():
        raise SceneFolderError(f"{root}: no such scene folder; expected one folder per class "
                               "(<root>/<class>/<image>)")
    out: dict[str, list[str]] = {}
    for name in class_folders(root):
        files = class_images(root / name)
        if files:
            out[name] = files
        elif skip_empty:
            skipped.append(str(root / name))
        else:
            raise EmptyClassError(f"{root / name}: class folder has no images (looked for "
                                   f"{', '.join(IMAGE_EXTENSIONS)}); fill it or remove it, since an "
                                   "empty class would change the label set")
    if not out:
        raise SceneFolderError(f"{root}: no class folders with images; expected <root>/<class>/<image>")
    return out


def split_scene_folder(root: str | os.PathLike, train_fraction: float = DEFAULT_TRAIN_FRACTION, *,
                       skip_empty: bool = False) -> SceneSplit:
    """Lists a scene folder and splits it: its official train/ and test/ folders, else the 8:2 rule.

    Args:
        root: `<root>/<class>/<image>`, or `<root>/{train,test}/<class>/<image>`.
        train_fraction: per-class share of the name-sorted files that goes to train (no official split).
        skip_empty: leave out class folders without images (listed in `skipped`) instead of failing.

    Raises:
        SceneFolderError: naming the folder that is missing, holds no class folders, is an empty
            class folder (`EmptyClassError`), or (official split) a class found in only one of
            train/ and test/.
    """
    root = Path(root)
    skipped: list[str] = []
    if all((root / s).is_dir() for s in OFFICIAL_SPLITS):
        parts = {s: _list_classes(root / s, skip_empty, skipped) for s in OFFICIAL_SPLITS}
        classes = sorted(set(parts["train"]) | set(parts["test"]))
        for name in classes:
            if name not in parts["train"] or name not in parts["test"]:
                raise SceneFolderError(f"{root}: class {name!r} is in only one of train/ and test/")
        lists = {s: [(f"{s}/{c}/{f}", i) for i, c in enumerate(classes) for f in parts[s][c]]
                 for s in OFFICIAL_SPLITS}
        return SceneSplit(root, classes, lists["train"], lists["test"], "official", skipped)
    listing = _list_classes(root, skip_empty, skipped)
    split_counts(0, train_fraction)  # checks the fraction even for an empty listing
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, (name, files) in enumerate(listing.items()):
        n_train, _ = split_counts(len(files), train_fraction)
        train += [(f"{name}/{f}", label) for f in files[:n_train]]
        test += [(f"{name}/{f}", label) for f in files[n_train:]]
    return SceneSplit(root, list(listing), train, test, split_rule(train_fraction), skipped)
