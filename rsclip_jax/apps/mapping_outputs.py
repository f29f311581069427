"""The looked-at outputs of `rsclip map`: class colours, polygons of the class regions, and a
quick-look PNG with a legend.

Polygons are traced strip by strip as the map is written (`PolygonCollector.add`), so memory stays
bounded by the strip: each connected region of one class in a strip becomes a piece with its
pixel count and probability sum. At the end the pieces of a class that touch across strip
boundaries are merged (`shapely.unary_union`), and each region's mean probability is the
pixel-weighted mean of its pieces.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from PIL import Image, ImageDraw
from rasterio.enums import Resampling
from scipy import ndimage

from rsclip_jax.raster import fit_within

# Qualitative colours (ColorBrewer Set1 + Dark2), distinct on a map; more classes cycle hues.
_COLOURS = [(228, 26, 28), (55, 126, 184), (77, 175, 74), (152, 78, 163), (255, 127, 0), (255, 255, 51),
            (166, 86, 40), (247, 129, 191), (153, 153, 153), (27, 158, 119), (217, 95, 2), (117, 112, 179),
            (231, 41, 138), (102, 166, 30), (230, 171, 2), (166, 118, 29)]
VECTOR_DRIVERS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG"}
PREVIEW_SIZE = 1024  # longest side of the quick-look


def palette(n: int) -> list[tuple[int, int, int, int]]:
    """RGBA colours of classes 1..n (the class map's colour table and the preview's legend)."""
    out = []
    for i in range(n):
        r, g, b = _COLOURS[i % len(_COLOURS)]
        if i >= len(_COLOURS):  # darken repeats so they stay distinguishable
            r, g, b = (int(c * 0.6) for c in (r, g, b))
        out.append((r, g, b, 255))
    return out


def vector_driver(path: str) -> str:
    """The OGR driver of `--vector PATH` by its suffix.

    Raises:
        ValueError: naming the path and the suffixes that work.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in VECTOR_DRIVERS:
        raise ValueError(f"--vector {path}: unknown suffix {ext or '(none)'}; use .geojson or .gpkg")
    return VECTOR_DRIVERS[ext]


class PolygonCollector:
    """Pieces of class regions, traced strip by strip (see the module docstring)."""

    def __init__(self, labels: Sequence[str], transform: Affine):
        self.labels = list(labels)
        self.transform = transform
        self.pieces: list[tuple[int, shapely.Geometry, int, float]] = []  # (class value, polygon, pixels, prob sum)

    def add(self, row: int, classes: np.ndarray, mapped: np.ndarray, prob: np.ndarray) -> None:
        """Traces the strip starting at `row`: class values (h, w), mapped mask, class probability."""
        transform = self.transform * Affine.translation(0, row)
        for value in np.unique(classes[mapped]):
            regions, n = ndimage.label((classes == value) & mapped)  # 4-connected, as rasterio traces
            pixels = np.bincount(regions.ravel(), minlength=n + 1)
            sums = np.bincount(regions.ravel(), weights=prob.ravel(), minlength=n + 1)
            for geom, region in rasterio.features.shapes(regions.astype(np.int32), mask=regions > 0,
                                                          transform=transform, connectivity=4):
                r = int(region)
                self.pieces.append((int(value), shapely.geometry.shape(geom), int(pixels[r]), float(sums[r])))

    def regions(self) -> list[dict]:
        """Merged regions: {"class_id", "class", "mean_prob", "pixels", "geometry"} per polygon."""
        out = []
        for value in sorted({p[0] for p in self.pieces}):
            pieces = [p for p in self.pieces if p[0] == value]
            merged = shapely.unary_union([p[1] for p in pieces])
            parts = list(merged.geoms) if hasattr(merged, "geoms") else [merged]
            tree = shapely.STRtree(parts)
            pixels, sums = np.zeros(len(parts)), np.zeros(len(parts))
            for _, geom, n, s in pieces:
                hit = tree.query(geom.representative_point(), predicate="intersects")
                pixels[hit[0]] += n
                sums[hit[0]] += s
            for part, n, s in zip(parts, pixels, sums):
                out.append({"class_id": value, "class": self.labels[value - 1], "mean_prob": round(float(s / n), 4),
                            "pixels": int(n), "geometry": part})
        return out


def write_polygons(collector: PolygonCollector, path: str, crs: rasterio.crs.CRS | None, name: str) -> int:
    """Writes the merged regions to `path` (GeoJSON or GeoPackage by `name`'s suffix); returns their count."""
    import geopandas as gpd  # heavy (pandas, pyogrio): only when --vector is asked for

    regions = collector.regions()
    frame = gpd.GeoDataFrame(regions, geometry="geometry", crs=crs.to_wkt() if crs else None) if regions else \
        gpd.GeoDataFrame({"class_id": [], "class": [], "mean_prob": [], "pixels": []}, geometry=[],
                         crs=crs.to_wkt() if crs else None)
    driver = vector_driver(name)
    # the layer is named here: by default OGR takes it from the (temporary) file name
    with warnings.catch_warnings():  # GDAL asks for a .gpkg suffix, which the temporary name lacks until renamed
        warnings.filterwarnings("ignore", message="The filename extension should be")
        frame.to_file(path, driver=driver, engine="pyogrio", **({"layer": "classes"} if driver == "GPKG" else {}))
    return len(regions)


def write_preview(class_map: str, labels: Sequence[str], path: str) -> None:
    """A quick-look PNG of the class map (at most `PREVIEW_SIZE` px a side) with a legend beside it."""
    with rasterio.open(class_map) as ds:
        shape = fit_within(ds.width, ds.height, PREVIEW_SIZE)
        values = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
    lut = np.zeros((256, 3), np.uint8)
    lut[:] = (255, 255, 255)  # no data: white
    for i, colour in enumerate(palette(len(labels))):
        lut[i + 1] = colour[:3]
    legend_w = 12 + 8 * max(len(label) for label in labels) + 40
    canvas = Image.new("RGB", (shape[1] + legend_w, max(shape[0], 20 * len(labels) + 16)), "white")
    canvas.paste(Image.fromarray(lut[values]), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (label, colour) in enumerate(zip(labels, palette(len(labels)))):
        x, y = shape[1] + 12, 8 + 20 * i
        draw.rectangle([x, y, x + 14, y + 14], fill=colour[:3], outline=(0, 0, 0))
        draw.text((x + 22, y + 1), label, fill=(0, 0, 0))
    canvas.save(path, format="PNG")
