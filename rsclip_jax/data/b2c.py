"""B2C (box-to-caption): RemoteCLIP's rule-based captions from detection boxes.

The paper (Liu et al., 2023, figure 2) shows captions such as
"4 large vehicles, a small vehicle and 5 planes at the edge of the picture ." and
"Lots of airplanes are located in the picture .": they state where objects are (middle vs.
edge), exact counts, a vague quantifier for large counts, several classes in one list, and
end with a space before the period. The code was never released; this is our reading of it.

Per image, by default 5 captions:
- up to 2 location captions: the objects whose box centre lies in the central region (the
  middle half of the width and of the height) "in the middle of the picture", the others
  "at the edge of the picture" (one caption per non-empty group);
- count captions to fill up: a random subset of up to 4 classes with their image-wide
  counts, or "There are both Xs and Ys" for two classes that each occur at least twice.

A count of 1 reads "a"/"an", counts up to `vague_threshold` (10) are exact digits, larger ones
take a random vague quantifier ("many", "lots of", "a quantity of", "a large deal of", "a crowd
of": the paper's words). Class names are made readable ("small-vehicle" -> "small vehicle",
DIOR's "groundtrackfield" -> "ground track field") and pluralised ("bus" -> "buses").
Randomness comes from `random.Random` seeded by (seed, image path), so an image gets the same
captions whatever order images are processed in. An image without boxes gets no captions
(the caller reports it as skipped) unless `B2CConfig.empty_caption` is set.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rsclip_jax.data.annotations import Box, ImageAnnotation, normalize_label

READABLE_NAMES: dict[str, str] = {
    # DIOR writes class names without spaces
    "baseballfield": "baseball field",
    "basketballcourt": "basketball court",
    "golffield": "golf field",
    "groundtrackfield": "ground track field",
    "storagetank": "storage tank",
    "tenniscourt": "tennis court",
    "trainstation": "train station",
    # RSOD and LEVIR
    "oiltank": "oil tank",
    "oilpot": "oil tank",
    # VisDrone: "people" are persons not walking; "motor" are motorcycles
    "people": "person",
    "motor": "motorcycle",
    # mask classes (LoveDA, ISPRS) that are not countable nouns as they stand
    "water": "water body",
    "barren": "barren area",
    "agricultural": "farmland",
    "impervious surfaces": "impervious surface",
    "low vegetation": "low vegetation area",
}
"""`normalize_label` key -> readable singular; other labels are used as normalized."""

IRREGULAR_PLURALS: dict[str, str] = {"person": "people", "aircraft": "aircraft"}
"""Readable singular -> plural, where the suffix rules in `pluralize` are wrong."""

TEMPLATE_FIELDS = {"objects", "are", "first", "second"}


@dataclass(frozen=True)
class B2CConfig:
    """Templates, thresholds and names of B2C.

    Templates are `str.format` patterns with `{objects}` (a phrase such as "4 large vehicles,
    a small vehicle and 5 planes") and `{are}` ("is" for one object, else "are"); pair
    templates take `{first}` and `{second}` (bare plurals). The first letter is capitalised.

    Attributes:
        vague_threshold: counts above this use a vague quantifier.
        quantifiers: the vague quantifiers, chosen at random.
        middle_fraction: the central region spans this fraction of the width and of the height.
        location_captions: at most this many captions describe location (middle, then edge).
        max_classes_per_caption: longer lists are cut to a random subset, to stay within the
            77-token text context.
        names: `normalize_label` key -> readable singular name.
        plurals: readable singular -> plural, for nouns the suffix rules get wrong.
        empty_caption: the caption of an image without boxes (repeated), or None to give such
            images no captions.
    """

    vague_threshold: int = 10
    quantifiers: tuple[str, ...] = ("many", "lots of", "a quantity of", "a large deal of", "a crowd of")
    middle_fraction: float = 0.5
    location_captions: int = 2
    max_classes_per_caption: int = 4
    middle_templates: tuple[str, ...] = (
        "{objects} in the middle of the picture .",
        "{objects} {are} in the middle of the picture .",
    )
    edge_templates: tuple[str, ...] = (
        "{objects} at the edge of the picture .",
        "{objects} {are} at the edge of the picture .",
    )
    count_templates: tuple[str, ...] = (
        "There {are} {objects} in the picture .",
        "{objects} {are} located in the picture .",
        "{objects} {are} located in this remote sensing picture .",
    )
    pair_templates: tuple[str, ...] = ("There are both {first} and {second} in the picture .",)
    names: Mapping[str, str] = field(default_factory=lambda: dict(READABLE_NAMES))
    plurals: Mapping[str, str] = field(default_factory=lambda: dict(IRREGULAR_PLURALS))
    empty_caption: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.middle_fraction < 1.0:
            raise ValueError(f"middle_fraction must be in (0, 1), got {self.middle_fraction}")
        if self.vague_threshold < 1 or self.max_classes_per_caption < 1 or self.location_captions < 0:
            raise ValueError("vague_threshold and max_classes_per_caption must be >= 1, location_captions >= 0")
        if not self.quantifiers or not self.count_templates:
            raise ValueError("quantifiers and count_templates must not be empty")
        for template in self.middle_templates + self.edge_templates + self.count_templates + self.pair_templates:
            used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            if used - TEMPLATE_FIELDS:
                raise ValueError(
                    f"template {template!r} uses {sorted(used - TEMPLATE_FIELDS)}; allowed: {sorted(TEMPLATE_FIELDS)}"
                )


DEFAULT_CONFIG = B2CConfig()


def readable_name(label: str, config: B2CConfig = DEFAULT_CONFIG) -> str:
    """A dataset class name as words: "small-vehicle" -> "small vehicle", "groundtrackfield" -> "ground track field"."""
    key = normalize_label(label)
    return config.names.get(key, key)


def pluralize(name: str, config: B2CConfig = DEFAULT_CONFIG) -> str:
    """The plural of a readable name, inflecting its last word: "water body" -> "water bodies", "bus" -> "buses"."""
    if name in config.plurals:
        return config.plurals[name]
    head, _, last = name.rpartition(" ")
    if last.endswith(("ss", "us", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        last = last[:-1] + "ies"
    elif not last.endswith("s"):  # a name already ending in a single "s" is taken as plural ("others")
        last += "s"
    return f"{head} {last}" if head else last


def count_phrase(count: int, name: str, rng: random.Random, config: B2CConfig = DEFAULT_CONFIG) -> str:
    """ "a ship" / "an airplane", "4 ships", or a vague quantifier above the threshold ("lots of ships")."""
    if count == 1:
        return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    if count <= config.vague_threshold:
        return f"{count} {pluralize(name, config)}"
    return f"{rng.choice(config.quantifiers)} {pluralize(name, config)}"


def is_in_middle(box: Box, width: float, height: float, middle_fraction: float) -> bool:
    """Whether the box centre lies in the central region spanning `middle_fraction` of each side."""
    margin = (1.0 - middle_fraction) / 2.0
    cx, cy = box.center
    return margin * width <= cx <= (1.0 - margin) * width and margin * height <= cy <= (1.0 - margin) * height


def box_to_caption(
    annotation: ImageAnnotation, *, num_captions: int = 5, seed: int = 0, config: B2CConfig = DEFAULT_CONFIG
) -> list[str]:
    """RemoteCLIP-style captions of an image's boxes (see the module docstring for the recipe).

    Returns:
        `num_captions` captions, location captions first; [] for an image without boxes unless
        `config.empty_caption` is set. Captions differ from each other unless the image has
        fewer distinct captions than asked for.

    Raises:
        ValueError: the image has boxes but its width or height is unknown (needed for location).
    """
    if num_captions < 1:
        raise ValueError(f"num_captions must be >= 1, got {num_captions}")
    if not annotation.boxes:
        return [config.empty_caption] * num_captions if config.empty_caption else []
    if not annotation.width or not annotation.height:
        raise ValueError(f"{annotation.image}: image size unknown; B2C needs it to tell the middle from the edge")
    rng = random.Random(f"{seed}/{annotation.image}")  # str seeds hash with SHA-512: stable across runs
    names = [readable_name(box.label, config) for box in annotation.boxes]
    middle = Counter(
        name
        for box, name in zip(annotation.boxes, names, strict=True)
        if is_in_middle(box, annotation.width, annotation.height, config.middle_fraction)
    )
    totals = Counter(names)
    captions: list[str] = []
    for counts, templates in ((middle, config.middle_templates), (totals - middle, config.edge_templates)):
        if counts and templates and len(captions) < min(config.location_captions, num_captions):
            classes = rng.sample(sorted(counts), min(len(counts), config.max_classes_per_caption))
            captions.append(_fill(rng.choice(templates), classes, counts, rng, config))
    while len(captions) < num_captions:
        for _ in range(20):  # redraw duplicates; an image with few classes may run out of new captions
            caption = _count_caption(totals, rng, config)
            if caption not in captions:
                break
        captions.append(caption)
    return captions


def _count_caption(totals: Counter, rng: random.Random, config: B2CConfig) -> str:
    size = rng.randint(1, min(len(totals), config.max_classes_per_caption))
    classes = rng.sample(sorted(totals), size)
    templates = config.count_templates
    if size == 2 and all(totals[c] >= 2 for c in classes):
        templates = templates + config.pair_templates
    return _fill(rng.choice(templates), classes, totals, rng, config)


def _fill(template: str, classes: Sequence[str], counts: Counter, rng: random.Random, config: B2CConfig) -> str:
    phrases = [count_phrase(counts[c], c, rng, config) for c in classes]
    objects = phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"
    singular = len(classes) == 1 and counts[classes[0]] == 1
    plurals = [pluralize(c, config) for c in classes] + ["", ""]
    text = template.format(objects=objects, are="is" if singular else "are", first=plurals[0], second=plurals[1])
    return text[:1].upper() + text[1:]
