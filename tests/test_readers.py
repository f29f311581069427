"""Annotation readers on hand-written fixtures (one per format) and on real deepforest VOC labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsclip_jax.data import AnnotationError, Box, CaptionedImage, ImageAnnotation, Skipped, read_annotations
from rsclip_jax.data.readers import (
    read_auair,
    read_caption_csv,
    read_carpk,
    read_coco,
    read_dota,
    read_isprs,
    read_karpathy,
    read_levir,
    read_loveda,
    read_sdd,
    read_visdrone,
    read_voc,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "annotations"
REAL = Path(__file__).resolve().parent / "fixtures"  # real package files, see fixtures/ATTRIBUTION.md


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_dota_oriented_boxes_become_axis_aligned_and_headers_are_skipped():
    first, empty = read_dota(FIXTURES / "dota" / "labelTxt")
    assert first.image == "P0001.png" and first.source == "dota" and first.width is None
    assert len(first.boxes) == 11
    assert first.boxes[0] == Box(10, 10, 60, 40, "large-vehicle")
    assert first.boxes[4] == Box(100.5, 150.5, 120.5, 160.5, "small-vehicle")
    assert first.boxes[-1] == Box(440, 440, 560, 560, "plane")  # the diamond's bounding box
    assert [b.label for b in first.boxes].count("plane") == 6
    assert empty == ImageAnnotation("P0002.png", None, None, [], "dota", {})


def test_dota_malformed_line_names_file_and_line(tmp_path):
    label = _write(tmp_path / "P0009.txt", "imagesource:GoogleEarth\ngsd:0.1\n1 2 3 4 5 6 7 8 plane\n")
    with pytest.raises(AnnotationError) as e:
        list(read_dota(tmp_path))
    assert str(e.value) == (
        f"{label}:3: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category difficult' (10 fields), got 9: '1 2 3 4 5 6 7 8 plane'"
    )
    _write(tmp_path / "P0009.txt", "1 2 3 4 5 six 7 8 plane 0\n")
    with pytest.raises(AnnotationError, match=r"P0009.txt:1: expected a corner coordinate to be a number, got 'six'"):
        list(read_dota(tmp_path))


def test_dota_skip_invalid_reports_the_image_and_keeps_reading(tmp_path):
    bad = _write(tmp_path / "a.txt", "10 10 20 10 20 20 10 20 plane 2\n")
    _write(tmp_path / "b.txt", "10 10 20 10 20 20 10 20 plane 0\n")
    skipped, good = read_dota(tmp_path, strict=False)
    assert skipped == Skipped(str(bad), "invalid annotation", f"{bad}:1: expected difficult to be 0 or 1, got '2'")
    assert good.image == "b.png" and good.boxes == [Box(10, 10, 20, 20, "plane")]


def test_inverted_box_is_an_error_and_zero_area_box_is_counted(tmp_path):
    _write(tmp_path / "x.txt", "1 50 50 40 60\n")
    with pytest.raises(
        AnnotationError, match=r"x.txt:1: expected x_min <= x_max and y_min <= y_max, got \(50.0, 50.0, 40.0, 60.0\)"
    ):
        list(read_levir(tmp_path))
    _write(tmp_path / "x.txt", "1 50 50 50 60\n1 10 10 20 20\n")
    [annotation] = read_levir(tmp_path)
    assert annotation.boxes == [Box(10, 10, 20, 20, "airplane")] and annotation.ignored == {"zero-area box": 1}


def test_voc_dior_with_rotated_box_and_hrsc_native_xml():
    dior, hrsc = read_voc(FIXTURES / "voc" / "Annotations")
    assert (dior.image, dior.width, dior.height, dior.source) == ("00001.jpg", 800, 800, "voc")
    assert [b.label for b in dior.boxes] == ["airplane"] * 3 + ["groundtrackfield", "ship"]
    assert dior.boxes[0] == Box(100, 100, 160, 150, "airplane")
    ship = dior.boxes[-1]  # a 40 x 20 box turned by 90 degrees around (650, 650)
    assert (ship.x0, ship.y0, ship.x1, ship.y1) == pytest.approx((640, 630, 660, 670))
    assert hrsc == ImageAnnotation("100000001.bmp", 1166, 753, [Box(520, 330, 640, 420, "ship")], "hrsc2016", {})


def test_voc_errors_name_the_file(tmp_path):
    bad = _write(tmp_path / "a.xml", "<annotation>\n<filename>a.jpg</filename>\n<object>\n</annotation>\n")
    with pytest.raises(AnnotationError, match=rf"^{bad}:4: not well-formed XML"):
        list(read_voc(bad))
    _write(bad, "<annotation><filename>a.jpg</filename><object><name>car</name></object></annotation>")
    with pytest.raises(AnnotationError, match=r"a.xml: <object> #1: expected a <bndbox> or <robndbox>"):
        list(read_voc(bad))
    _write(bad, "<svg></svg>")
    with pytest.raises(
        AnnotationError, match=r"expected a Pascal VOC <annotation> or an HRSC2016 <HRSC_Image> root element, got <svg>"
    ):
        list(read_voc(bad))


def test_voc_reads_real_deepforest_labels():
    [trees] = read_voc(REAL / "deepforest" / "OSBS_029.xml")
    assert (trees.image, trees.width, trees.height) == ("OSBS_029.tif", 400, 400)
    assert len(trees.boxes) == 61 and {b.label for b in trees.boxes} == {"Tree"}
    assert trees.boxes[0] == Box(203, 67, 227, 90, "Tree")


def test_levir():
    [annotation] = read_levir(FIXTURES / "levir")
    assert annotation.image == "00001.jpg"
    assert [b.label for b in annotation.boxes] == ["airplane", "airplane", "ship", "oil tank"]
    assert annotation.boxes[2] == Box(600, 400, 680, 440, "ship")


def test_levir_unknown_class(tmp_path):
    _write(tmp_path / "x.txt", "4 1 1 5 5\n")
    with pytest.raises(
        AnnotationError, match=r"x.txt:1: expected a class id in \{1 airplane, 2 ship, 3 oil tank\}, got '4'"
    ):
        list(read_levir(tmp_path))


def test_visdrone_counts_ignored_regions_and_reads_trailing_commas():
    [annotation] = read_visdrone(FIXTURES / "visdrone")
    assert annotation.image == "0000001_00000_d_0000001.jpg"
    assert [b.label for b in annotation.boxes] == ["car", "bus", "pedestrian", "others", "people"]
    assert annotation.boxes[0] == Box(406, 119, 406 + 265, 119 + 70, "car")  # left,top,width,height
    assert annotation.ignored == {"ignored region (category 0 or score 0)": 1}


def test_carpk():
    [annotation] = read_carpk(FIXTURES / "carpk" / "Annotations")
    assert annotation.image == "20160331_NTU_00001.png"
    assert annotation.boxes == [
        Box(10, 20, 50, 45, "car"),
        Box(600, 340, 640, 365, "car"),
        Box(1200, 650, 1240, 700, "car"),
    ]


def test_sdd_frames_lost_boxes_and_frame_step():
    frames = list(read_sdd(FIXTURES / "sdd" / "annotations"))
    assert [f.image for f in frames] == [
        "bookstore/video0/00000.jpg",
        "bookstore/video0/00001.jpg",
        "bookstore/video0/00002.jpg",
    ]
    assert [b.label for b in frames[0].boxes] == ["Pedestrian", "Biker", "Pedestrian"]
    assert frames[0].ignored == {"outside the view (lost = 1)": 1}
    assert frames[2].boxes == [] and frames[2].ignored == {"outside the view (lost = 1)": 1}
    stepped = list(read_sdd(FIXTURES / "sdd" / "annotations", frame_step=2))
    assert stepped[1] == Skipped("bookstore/video0/00001.jpg", "frame not selected (frame_step)")
    assert [type(r) for r in stepped] == [ImageAnnotation, Skipped, ImageAnnotation]


def test_sdd_malformed_line_skips_the_whole_video(tmp_path):
    video = _write(
        tmp_path / "s" / "video1" / "annotations.txt", '0 1 1 5 5 0 0 0 0 "Biker"\n0 1 1 5 5 1 0 0 0 Biker\n'
    )
    [skipped] = read_sdd(tmp_path, strict=False)
    assert skipped.item == str(video) and skipped.reason == "invalid annotation"
    assert skipped.detail.startswith(
        f"{video}:2: expected 'track_id x_min y_min x_max y_max frame lost occluded generated \"label\"'"
    )


def test_auair_reads_the_colon_spelled_width_key():
    first, second = read_auair(FIXTURES / "auair" / "annotations.json")
    assert (first.image, first.width, first.height) == ("frame_20190829091111_x_0000249.jpg", 1920, 1080)
    assert first.boxes == [Box(20, 900, 60, 980, "Human"), Box(1700, 10, 1850, 100, "Car")]
    assert first.ignored == {"zero-area box": 1}
    assert second.boxes == []


def test_auair_bad_class_index(tmp_path):
    path = _write(
        tmp_path / "a.json",
        json.dumps(
            {
                "annotations": [
                    {"image_name": "f.jpg", "bbox": [{"top": 1, "left": 1, "height": 2, "width": 2, "class": 9}]}
                ]
            }
        ),
    )
    with pytest.raises(AnnotationError, match=r"annotations\[0\] \(f.jpg\): bbox\[0\]: expected class in 0..7, got 9"):
        list(read_auair(path))


def test_coco_bbox_polygon_fallback_and_unannotated_image():
    first, second = read_coco(FIXTURES / "coco" / "iSAID_train.json")
    assert (first.image, first.width, first.height) == ("P0001_0_800_0_800.png", 800, 800)
    assert first.boxes == [
        Box(10, 10, 50, 30, "Large_Vehicle"),
        Box(700, 20, 740, 40, "Large_Vehicle"),
        Box(390, 390, 405, 400, "Small_Vehicle"),  # from its polygon: no bbox given
        Box(600, 600, 680, 670, "plane"),
    ]
    assert second.image == "P0002_0_800_0_800.png" and second.boxes == []


def test_coco_annotation_of_unknown_image(tmp_path):
    data = json.loads((FIXTURES / "coco" / "iSAID_train.json").read_text())
    data["annotations"][0]["image_id"] = 7
    path = _write(tmp_path / "c.json", json.dumps(data))
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: image_id 7 is not in 'images'"):
        list(read_coco(path))
    records = list(read_coco(path, strict=False))
    assert records[0] == Skipped(
        f"{path}: annotations[0]", "invalid annotation", f"{path}: annotations[0]: image_id 7 is not in 'images'"
    )
    assert len(records[1].boxes) == 3


def test_json_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path / "c.json", '{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(AnnotationError, match=r"c.json:2: not valid JSON"):
        list(read_coco(path))


def test_loveda_mask_to_boxes_and_image_path():
    [annotation] = read_loveda(FIXTURES / "loveda", min_area=4)
    assert (annotation.image, annotation.width, annotation.height) == ("Train/Urban/images_png/1366.png", 20, 20)
    assert annotation.boxes == [
        Box(0, 0, 19, 20, "background"),
        Box(0, 0, 5, 5, "building"),
        Box(8, 7, 13, 12, "building"),
        Box(0, 12, 6, 18, "building"),  # two blocks touching at a corner: one 8-connected region
        Box(19, 0, 20, 18, "road"),
        Box(12, 13, 16, 17, "water"),
    ]
    assert annotation.ignored == {"region smaller than min_area (building)": 1}


def test_loveda_value_outside_the_legend(tmp_path):
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(tmp_path / "1.png")
    with pytest.raises(AnnotationError, match=r"1.png: expected LoveDA class values 0-7, got \[9\]"):
        list(read_loveda(tmp_path))


def test_isprs_colour_map_and_image_name():
    [annotation] = read_isprs(FIXTURES / "isprs", min_area=4)
    assert (annotation.image, annotation.width, annotation.height) == ("top_potsdam_2_10_RGB.tif", 12, 12)
    assert annotation.boxes == [
        Box(0, 0, 12, 12, "impervious surfaces"),
        Box(1, 1, 4, 4, "building"),
        Box(0, 8, 4, 11, "low vegetation"),
        Box(10, 1, 12, 3, "tree"),
        Box(5, 5, 7, 7, "car"),  # the black boundary ring around it is ignored
        Box(9, 8, 12, 10, "clutter"),
    ]
    [irrg] = read_isprs(FIXTURES / "isprs", min_area=4, image_suffix="_IRRG")
    assert irrg.image == "top_potsdam_2_10_IRRG.tif"


def test_isprs_rejects_a_photo_given_as_label_map():
    photo = REAL / "deepforest" / "OSBS_029.png"
    with pytest.raises(
        AnnotationError, match=r"OSBS_029.png: expected an ISPRS colour-coded label map, but only \d+\.\d% of pixels"
    ):
        list(read_isprs(photo))


def test_karpathy_splits_and_empty_captions():
    train_a, train_b, test = read_karpathy(FIXTURES / "karpathy" / "dataset_rsitmd.json")
    assert train_a == CaptionedImage(
        "airport_1.tif",
        [
            "Many planes are parked next to a long runway .",
            "A runway with two planes and a terminal .",
            "An airport beside green fields .",
            "Planes wait near the terminal building .",
            "The runway crosses the whole image .",
        ],
        "karpathy",
        {},
    )
    assert len(train_b.captions) == 4 and train_b.ignored == {"empty caption": 1}
    assert test == Skipped("bridge_3.tif", "split 'test' not selected")
    kinds = [type(r) for r in read_karpathy(FIXTURES / "karpathy" / "dataset_rsitmd.json", splits=("all",))]
    assert kinds == [CaptionedImage] * 3


def test_caption_csv_groups_rows_per_image():
    first, second = read_caption_csv(FIXTURES / "csv" / "Ret-3_train.csv")
    assert first == CaptionedImage(
        "RSICD/airport_1.jpg",
        [
            "Many planes are parked next to a long runway .",
            "A runway, two planes and a terminal .",
            "An airport beside green fields .",
        ],
        "csv",
        {},
    )
    assert second.image == "UCM/beach_2.jpg" and second.captions == ["Waves break on a sandy beach ."]


def test_caption_csv_tab_separated_header_check_and_short_rows(tmp_path):
    path = _write(tmp_path / "t.csv", "title\tfilepath\nA port .\ta.jpg\n\tb.jpg\nlonely\n")
    with pytest.raises(
        AnnotationError, match=r"t.csv:4: expected 2 '\\t'-separated fields with an image path, got \['lonely'\]"
    ):
        list(read_caption_csv(path))
    records = list(read_caption_csv(path, strict=False))
    assert records[0] == Skipped(
        f"{path}:4",
        "invalid annotation",
        f"{path}:4: expected 2 '\\t'-separated fields with an image path, got ['lonely']",
    )
    assert records[1] == CaptionedImage("a.jpg", ["A port ."], "csv", {})
    assert records[2] == CaptionedImage("b.jpg", [], "csv", {"empty caption": 1})
    _write(path, "image,caption\na.jpg,x\n")
    with pytest.raises(AnnotationError, match=r"t.csv:1: expected a header with columns 'filepath' and 'title'"):
        list(read_caption_csv(path))


def test_missing_paths_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_dota(tmp_path / "nope"))
    with pytest.raises(AnnotationError, match=r"no annotation files \(\*.xml\) in this folder"):
        list(read_voc(tmp_path))
    with pytest.raises(ValueError, match=r"unknown annotation format 'yolo'"):
        read_annotations("yolo", tmp_path)
