"""B2C: readable names, counts, quantifiers, location, determinism, and exact captions on fixtures and real labels."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from rsclip_jax.data import B2CConfig, Box, ImageAnnotation, box_to_caption, pluralize, read_annotations, readable_name
from rsclip_jax.data.b2c import count_phrase, is_in_middle

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "annotations"
REAL = Path(__file__).resolve().parent / "fixtures"  # real package files, see fixtures/ATTRIBUTION.md
PAPER_STYLE = re.compile(r"^[A-Z0-9].* \.$")  # capitalised, space before the final period


def _dota_fixture() -> ImageAnnotation:
    first, _ = read_annotations("dota", FIXTURES / "dota" / "labelTxt")
    return replace(first, width=1000, height=1000)


def _image(boxes: list[Box], name: str = "img.png", size: int = 100) -> ImageAnnotation:
    return ImageAnnotation(name, size, size, boxes, "test")


@pytest.mark.parametrize(
    "label, readable",
    [
        ("small-vehicle", "small vehicle"),
        ("Small_Vehicle", "small vehicle"),
        ("groundtrackfield", "ground track field"),
        ("Expressway-Service-area", "expressway service area"),
        ("Tree", "tree"),
        ("people", "person"),
        ("oilpot", "oil tank"),
        ("water", "water body"),
    ],
)
def test_readable_name(label, readable):
    assert readable_name(label) == readable


@pytest.mark.parametrize(
    "singular, plural",
    [
        ("vehicle", "vehicles"),
        ("bus", "buses"),
        ("overpass", "overpasses"),
        ("water body", "water bodies"),
        ("chimney", "chimneys"),
        ("person", "people"),
        ("aircraft", "aircraft"),
        ("small vehicle", "small vehicles"),
        ("others", "others"),
    ],
)
def test_pluralize(singular, plural):
    assert pluralize(singular) == plural


def test_count_phrase_articles_exact_counts_and_vague_quantifiers():
    rng = random.Random(0)
    assert count_phrase(1, "ship", rng) == "a ship"
    assert count_phrase(1, "airplane", rng) == "an airplane"
    assert count_phrase(4, "bus", rng) == "4 buses"
    assert count_phrase(10, "tree", rng) == "10 trees"  # the threshold itself is still exact
    vague = {count_phrase(11, "tree", rng) for _ in range(200)}
    assert vague == {f"{q} trees" for q in B2CConfig().quantifiers}
    assert count_phrase(11, "tree", rng, replace(B2CConfig(), vague_threshold=20)) == "11 trees"


def test_middle_region_is_the_central_half_of_each_side():
    assert is_in_middle(Box(20, 20, 30, 30, "x"), 100, 100, 0.5)  # centre (25, 25): on the border
    assert not is_in_middle(Box(18, 20, 30, 30, "x"), 100, 100, 0.5)  # centre x 24
    assert not is_in_middle(Box(40, 80, 60, 90, "x"), 100, 100, 0.5)  # centre y 85
    assert is_in_middle(Box(10, 10, 20, 20, "x"), 100, 100, 0.9)


def test_exact_captions_of_the_dota_fixture():
    assert box_to_caption(_dota_fixture(), seed=0) == [
        "A plane in the middle of the picture .",
        "A small vehicle, 4 large vehicles and 5 planes at the edge of the picture .",
        "4 large vehicles and a small vehicle are located in this remote sensing picture .",
        "6 planes are located in this remote sensing picture .",
        "A small vehicle, 4 large vehicles and 6 planes are located in the picture .",
    ]


def test_location_captions_count_only_their_region_for_every_seed():
    annotation = _dota_fixture()
    for seed in range(30):
        middle, edge, *_ = box_to_caption(annotation, seed=seed)
        assert middle in ("A plane in the middle of the picture .", "A plane is in the middle of the picture .")
        listed = re.fullmatch(r"(.*?)(?: are)? at the edge of the picture \.", edge).group(1)
        assert sorted(re.split(r", | and ", listed.lower())) == ["4 large vehicles", "5 planes", "a small vehicle"]


def test_exact_captions_of_real_deepforest_trees():
    # the captions docs/data.md shows; 16 of the 61 tree centres lie in the central region
    [trees] = read_annotations("voc", REAL / "deepforest" / "OSBS_029.xml")
    assert box_to_caption(trees, seed=0) == [
        "A crowd of trees are in the middle of the picture .",
        "Lots of trees at the edge of the picture .",
        "There are a quantity of trees in the picture .",
        "A quantity of trees are located in the picture .",
        "A large deal of trees are located in this remote sensing picture .",
    ]


def test_deterministic_given_seed_and_image_whatever_the_order():
    annotation = _dota_fixture()
    captions = box_to_caption(annotation, seed=3)
    box_to_caption(_image([Box(1, 1, 2, 2, "car")], "other.png"), seed=3)  # interleaved work changes nothing
    assert box_to_caption(replace(annotation, boxes=annotation.boxes[::-1]), seed=3) == captions
    assert len({tuple(box_to_caption(annotation, seed=s)) for s in range(10)}) > 1
    assert box_to_caption(replace(annotation, image="renamed.png"), seed=3) != captions


def test_captions_are_distinct_in_paper_style_and_lists_are_capped():
    boxes = [Box(i * 10, 5, i * 10 + 5, 10, name) for i, name in enumerate("abcdef")]
    annotation = _image(boxes, size=100)
    for seed in range(20):
        captions = box_to_caption(annotation, seed=seed)
        assert len(captions) == 5 and len(set(captions)) == 5
        assert all(PAPER_STYLE.match(c) for c in captions), captions
        assert all(c.count(" and ") <= 1 and c.count(",") <= 2 for c in captions), captions  # at most 4 classes
    assert len(box_to_caption(annotation, num_captions=8)) == 8


def test_singular_verbs_and_pair_template():
    one_ship = _image([Box(40, 40, 60, 60, "ship")])
    assert box_to_caption(one_ship, seed=0) == [
        "A ship in the middle of the picture .",
        "A ship is located in this remote sensing picture .",
        "A ship is located in the picture .",
        "There is a ship in the picture .",
        "A ship is located in this remote sensing picture .",  # one object has only 3 distinct count captions
    ]
    crowd = _image(
        [
            Box(1, 1, 5, 5, "Pedestrian"),
            Box(6, 1, 9, 5, "Pedestrian"),
            Box(1, 90, 5, 95, "Biker"),
            Box(9, 90, 12, 95, "Biker"),
        ]
    )
    captions = [c for s in range(40) for c in box_to_caption(crowd, seed=s)]
    assert "There are both pedestrians and bikers in the picture ." in captions
    assert "There are both bikers and pedestrians in the picture ." in captions


def test_empty_image_and_unknown_size():
    assert box_to_caption(_image([])) == []
    config = replace(B2CConfig(), empty_caption="An empty remote sensing picture .")
    assert box_to_caption(_image([]), num_captions=2, config=config) == ["An empty remote sensing picture ."] * 2
    with pytest.raises(ValueError, match=r"img.png: image size unknown"):
        box_to_caption(ImageAnnotation("img.png", None, None, [Box(1, 1, 2, 2, "car")], "t"))


def test_config_templates_and_names_are_configurable():
    config = B2CConfig(
        count_templates=("I count {objects} .",),
        middle_templates=(),
        edge_templates=(),
        names={"tree": "palm"},
        plurals={"palm": "palm trees"},
    )
    annotation = _image([Box(1, 1, 5, 5, "Tree"), Box(6, 6, 9, 9, "tree")])
    assert box_to_caption(annotation, num_captions=2, config=config) == ["I count 2 palm trees ."] * 2
    with pytest.raises(ValueError, match=r"template 'There are {count} .' uses \['count'\]"):
        B2CConfig(count_templates=("There are {count} .",))
    with pytest.raises(ValueError, match=r"middle_fraction must be in \(0, 1\)"):
        B2CConfig(middle_fraction=1.0)
