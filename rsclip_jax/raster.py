"""Raster scenes through rasterio (GDAL): GeoTIFF/COG/JPEG2000 files of any size and bit depth,
folders of band files (Sentinel-2, Landsat) and local STAC item JSON, read by windows into 8-bit RGB.

A `Scene` is opened once and read window by window, never whole, so a scene larger than memory
works. Three bands are chosen (`--bands 4,3,2` by index, `--bands B04,B03,B02` by band-file or STAC
asset name); a one-band scene is shown as grey.

The stretch to 8 bits (`Stretch`):
- 8-bit bands are used as they are;
- otherwise each band is stretched linearly between its 2nd and 98th percentiles of valid pixels,
  computed once per scene on a decimated read of at most `OVERVIEW_SIZE` pixels a side (GDAL uses
  the file's overviews when it has them). The same numbers apply to every window, so a tile looks
  the same whichever window it is read in;
- or a fixed `scale=(min, max)` for every band (e.g. `--scale 0,3000` for Sentinel-2 reflectance);
- then an optional display gamma (`--gamma 1.5` brightens dark scenes: out = x ** (1 / gamma)),
  applied to stretched bands (not to 8-bit bands used as they are).
The arithmetic is float32, one window at a time.

Nodata and masks: a pixel is valid when every chosen band is valid by GDAL's mask (nodata value,
internal mask, alpha band) and finite. Invalid pixels read as 0 with a False mask.

Band files of a folder or STAC item may have different resolutions (Sentinel-2's 10/20/60 m
bands): the first chosen band is the grid, the others are resampled onto it (bilinear).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.warp import transform_geom
from rasterio.windows import Window, bounds as window_bounds, from_bounds

RASTER_EXTENSIONS = (".tif", ".tiff", ".jp2", ".vrt")
STRETCH_PERCENTILES = (2.0, 98.0)  # the one display stretch of the project (preprocess uses it too)
OVERVIEW_SIZE = 1024  # longest side of the decimated read that the percentiles are computed on
# GDAL's block cache defaults to 5% of RAM (1.2 GB on a 23 GB machine), which made `rsclip map` of a
# 20000^2 scene peak at 2.6 GB; 256 MB holds a strip of blocks of any scene up to ~100k px wide.
GDAL_CACHE_MB = 256


def bounded_gdal_cache() -> rasterio.Env:
    """A rasterio environment whose GDAL block cache is `GDAL_CACHE_MB`, for reads and writes of whole scenes."""
    # in bytes: a small number could be read as bytes rather than megabytes, starving the cache
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20)


class RasterError(ValueError):
    """A raster, band or window that cannot be used; the message names the file and the value."""


def is_raster_name(name: str) -> bool:
    """Whether a file name is a raster that rasterio reads by windows (GeoTIFF, COG, JPEG2000, VRT)."""
    return not os.path.basename(name).startswith(".") and name.lower().endswith(RASTER_EXTENSIONS)


def parse_bands(text: str | None) -> list[int] | list[str] | None:
    """`--bands "4,3,2"` -> [4, 3, 2] (1-based band indexes); `"B04,B03,B02"` -> band names.

    Raises:
        RasterError: for an empty entry, a mix of numbers and names, an index below 1, or a count
            other than one or three.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise RasterError(f"--bands {text!r}: empty entry; give 1 or 3 comma-separated bands, "
                          "e.g. 4,3,2 or B04,B03,B02")
    if len(parts) not in (1, 3):
        raise RasterError(f"--bands {text!r}: give 1 band (grey) or 3 bands (red,green,blue), got {len(parts)}")
    numeric = [p.isdigit() for p in parts]
    if all(numeric):
        bands = [int(p) for p in parts]
        if min(bands) < 1:
            raise RasterError(f"--bands {text!r}: band indexes start at 1")
        return bands
    if any(numeric):
        raise RasterError(f"--bands {text!r}: mixes indexes and names; use either 4,3,2 or B04,B03,B02")
    return parts


def parse_scale(text: str | None) -> tuple[float, float] | None:
    """`--scale "0,3000"` -> (0.0, 3000.0): the fixed stretch range of every band."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise RasterError(f"--scale {text!r}: give two numbers MIN,MAX, e.g. 0,3000") from None
    if not hi > lo:
        raise RasterError(f"--scale {text!r}: MAX must be greater than MIN")
    return lo, hi


@dataclass(frozen=True)
class BandSource:
    """One chosen band: a file and its 1-based band index in that file."""

    path: str
    index: int
    name: str


@dataclass(frozen=True)
class Stretch:
    """Per-band linear stretch to 0..255: out = (x - lo) / (hi - lo) * 255, clipped. None: 8-bit as is."""

    lo: tuple[float, ...] | None
    hi: tuple[float, ...] | None
    how: str  # "none (8-bit)", "percentiles 2-98 of a WxH overview" or "fixed MIN,MAX"
    gamma: float = 1.0

    def apply(self, band: int, data: np.ndarray) -> np.ndarray:
        if self.lo is None:
            return data.astype(np.uint8)
        lo, hi = self.lo[band], self.hi[band]
        if self.gamma == 1.0:
            out = (data.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
            return np.clip(np.rint(np.nan_to_num(out, nan=0.0)), 0, 255).astype(np.uint8)
        unit = np.clip(np.nan_to_num((data.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), nan=0.0), 0, 1)
        return np.rint(unit ** np.float32(1.0 / self.gamma) * 255).astype(np.uint8)


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(height, width) of a decimated read whose longest side is at most `max_side` (never enlarged)."""
    f = min(1.0, max_side / max(width, height))
    return max(1, round(height * f)), max(1, round(width * f))


def tile_windows(width: int, height: int, tile: int, stride: int) -> list[Window]:
    """Square tiles of `tile` pixels every `stride` pixels, row by row, covering every pixel: the
    last tile of a row or column is moved back to end at the scene's edge.

    Raises:
        RasterError: for a stride below 1, or a tile larger than the scene.
    """
    if stride < 1:
        raise RasterError(f"--stride {stride}: must be at least 1 pixel")
    if tile < 1 or tile > width or tile > height:
        raise RasterError(f"--tile {tile}: the scene is only {width} x {height} pixels; give a tile of at most "
                          f"{min(width, height)} (or resample with --gsd-resample)")
    cols = _starts(width, tile, stride)
    return [Window(col, row, tile, tile) for row in _starts(height, tile, stride) for col in cols]


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


class Scene:
    """An open raster scene: three (or one) bands from one file or several, read by windows.

    Use `open_scene`. Reads are serialised by a lock: GDAL dataset handles are not thread-safe, and
    the embedding extractor reads from several threads.
    """

    def __init__(self, path: str, sources: Sequence[BandSource], scale: tuple[float, float] | None = None,
                 date: str | None = None, gamma: float = 1.0):
        self.path = path
        self.sources = list(sources)
        self.date = date
        self._lock = threading.Lock()
        self._datasets: dict[str, rasterio.io.DatasetReader] = {}
        try:
            for src in self.sources:
                if src.path not in self._datasets:
                    self._datasets[src.path] = _open(src.path)
            grid = self._datasets[self.sources[0].path]
            for src in self.sources:
                if src.index > self._datasets[src.path].count:
                    raise RasterError(f"{src.path}: has {self._datasets[src.path].count} band(s); band {src.index} "
                                      f"is out of range (--bands counts from 1)")
            self.width, self.height = grid.width, grid.height
            self.crs = grid.crs
            self.transform = grid.transform
            self.res = grid.res
            self.nodata = grid.nodata
            self.dtypes = [self._datasets[s.path].dtypes[s.index - 1] for s in self.sources]
            if not gamma > 0:
                raise RasterError(f"--gamma {gamma}: must be above 0 (1 = linear, 1.5 brightens)")
            with bounded_gdal_cache():  # the overview read touches every block of a scene without overviews
                self.stretch = dataclasses.replace(self._stretch(scale), gamma=float(gamma))
        except BaseException:
            self.close()
            raise

    # -- reading ---------------------------------------------------------------------------------

    def read_rgb(self, window: Window, out_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The window as uint8 (h, w, 3) RGB and its validity mask (h, w) bool.

        `out_size=(h, w)` reads it resampled to that size (decimated reads, thumbnails). Windows
        reaching past the scene's edge read the outside as invalid.
        """
        h, w = out_size or (int(window.height), int(window.width))
        bands, valid = self._read(window, (h, w), Resampling.bilinear)
        out = np.empty((h, w, 3), np.uint8)
        for i in range(3):
            b = bands[min(i, len(bands) - 1)]
            out[..., i] = self.stretch.apply(min(i, len(bands) - 1), b)
        out[~valid] = 0
        return out, valid

    def _read(self, window: Window, out_shape: tuple[int, int], resampling: Resampling,
              ) -> tuple[list[np.ndarray], np.ndarray]:
        valid = np.ones(out_shape, bool)
        bands = []
        grid = self._datasets[self.sources[0].path]
        with self._lock:
            for src in self.sources:
                ds = self._datasets[src.path]
                win = window if ds is grid else from_bounds(*window_bounds(window, grid.transform), ds.transform)
                # boundless reads go through a VRT (slower): only for windows reaching past the edge
                outside = (win.col_off < 0 or win.row_off < 0 or win.col_off + win.width > ds.width + 1e-6
                           or win.row_off + win.height > ds.height + 1e-6)
                data = ds.read(src.index, window=win, out_shape=out_shape, boundless=outside, resampling=resampling,
                               fill_value=ds.nodata if ds.nodata is not None else 0)
                mask = ds.read_masks(src.index, window=win, out_shape=out_shape, boundless=outside,
                                     resampling=Resampling.nearest)
                valid &= mask > 0
                if np.issubdtype(data.dtype, np.floating):
                    valid &= np.isfinite(data)
                bands.append(data)
        return bands, valid

    def _stretch(self, scale: tuple[float, float] | None) -> Stretch:
        if scale is not None:
            n = len(self.sources)
            return Stretch((scale[0],) * n, (scale[1],) * n, f"fixed {scale[0]:g},{scale[1]:g}")
        if all(np.dtype(d) == np.uint8 for d in self.dtypes):
            return Stretch(None, None, "none (8-bit)")
        shape = fit_within(self.width, self.height, OVERVIEW_SIZE)
        bands, valid = self._read(Window(0, 0, self.width, self.height), shape, Resampling.nearest)
        los, his = [], []
        for b in bands:
            values = b[valid].astype(np.float32)
            lo, hi = np.percentile(values, STRETCH_PERCENTILES) if values.size else (0.0, 1.0)
            los.append(float(lo))
            his.append(float(hi) if hi > lo else float(lo) + 1.0)
        return Stretch(tuple(los), tuple(his), f"percentiles {STRETCH_PERCENTILES[0]:g}-{STRETCH_PERCENTILES[1]:g} "
                                               f"of a {shape[1]}x{shape[0]} overview")

    # -- geometry --------------------------------------------------------------------------------

    def footprint(self, window: Window) -> tuple[list[list[float]], list[list[float]] | None]:
        """The window's closed ring in the scene's CRS (pixel coordinates when it has none), and in
        lon/lat (EPSG:4326), or None without a CRS."""
        left, bottom, right, top = window_bounds(window, self.transform)
        ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
        if self.crs is None:
            return ring, None
        geom = transform_geom(self.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
        return ring, [list(p) for p in geom["coordinates"][0]]

    def describe(self) -> str:
        bands = ",".join(s.name for s in self.sources)
        crs = self.crs.to_string() if self.crs else "no CRS"
        return (f"{self.path}: {self.width} x {self.height} px, {crs}, {self.res[0]:g} units/px, bands {bands} "
                f"({'/'.join(sorted(set(self.dtypes)))}), stretch {self.stretch.how}"
                + (f", gamma {self.stretch.gamma:g}" if self.stretch.gamma != 1.0 else ""))

    def close(self) -> None:
        for ds in self._datasets.values():
            ds.close()
        self._datasets.clear()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: str) -> rasterio.io.DatasetReader:
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        if not os.path.exists(path):
            raise RasterError(f"{path}: no such raster file") from None
        raise RasterError(f"{path}: cannot read as a raster: {e}") from None


def open_scene(path: str | os.PathLike, bands: Sequence[int] | Sequence[str] | None = None,
               scale: tuple[float, float] | None = None, gamma: float = 1.0) -> Scene:
    """Opens a raster file, a folder of band files, or a local STAC item JSON as a `Scene`.

    Args:
        path: a GeoTIFF/COG/JP2/VRT file; a folder whose band files end in the band names
            (`T33UUU_20170216T102101_B04.jp2` is band B04); or a STAC item `.json` whose assets
            are local files (relative hrefs resolve against the JSON's folder).
        bands: 1-based indexes into a file (default: its red/green/blue bands by colour
            interpretation, else bands 1,2,3, or band 1 of a one- or two-band file), or band
            names for folders and STAC items (required there).
        scale: fixed stretch range instead of the percentiles.
        gamma: display gamma applied after the stretch (1: linear).

    Raises:
        RasterError: naming the path and the band for anything missing, ambiguous or out of range.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.lower().endswith(".json"):
        if not bands or isinstance(bands[0], int):
            raise RasterError(f"{path}: a folder of band files or a STAC item needs band names, e.g. "
                              "--bands B04,B03,B02")
        if os.path.isdir(path):
            sources = [_band_file(path, name) for name in bands]
            date = date_from_name(sources[0].path)
        else:
            sources, date = _stac_bands(path, list(bands))
        return Scene(path, sources, scale, date, gamma)
    if bands and isinstance(bands[0], str):
        raise RasterError(f"{path}: --bands {','.join(bands)} names bands, which needs a folder of band files or a "
                          "STAC item; for one file give band indexes, e.g. --bands 4,3,2")
    ds = _open(path)
    try:
        count, interp, tags = ds.count, ds.colorinterp, ds.tags()
    finally:
        ds.close()
    if bands is None:
        rgb = [interp.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue) if c in interp]
        bands = rgb if len(rgb) == 3 else [1, 2, 3] if count >= 3 else [1]
    for b in bands:
        if b > count:
            raise RasterError(f"{path}: has {count} band(s); --bands {','.join(map(str, bands))} asks for band {b}")
    date = _date_from_tags(tags) or date_from_name(path)
    return Scene(path, [BandSource(path, int(b), str(b)) for b in bands], scale, date, gamma)


def band_files(folder: str, name: str) -> list[str]:
    """The raster files of `folder` whose name ends in band `name` (`T33UUU_20170216T102101_B04.jp2`
    is band B04; any case), sorted."""
    pattern = re.compile(rf"(^|[_\-.]){re.escape(name)}$", re.IGNORECASE)
    return sorted(f for f in os.listdir(folder) if is_raster_name(f) and pattern.search(os.path.splitext(f)[0]))


def _band_file(folder: str, name: str) -> BandSource:
    found = band_files(folder, name)
    if not found:
        raise RasterError(f"{folder}: no band file for {name} (looked for raster files whose name ends in "
                          f"_{name}, e.g. T33UUU_20170216T102101_{name}.jp2)")
    if len(found) > 1:
        raise RasterError(f"{folder}: {len(found)} files match band {name} ({', '.join(found[:3])}); keep one per band")
    return BandSource(os.path.join(folder, found[0]), 1, name)


def _stac_bands(path: str, names: list[str]) -> tuple[list[BandSource], str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            item = json.load(f)
    except (OSError, ValueError) as e:
        raise RasterError(f"{path}: cannot read as a STAC item JSON: {e}") from None
    assets = item.get("assets") if isinstance(item, dict) else None
    if not isinstance(assets, dict):
        raise RasterError(f"{path}: not a STAC item (no 'assets' object)")
    by_name: dict[str, str] = {}
    for key, asset in assets.items():
        aliases = {key}
        for band in asset.get("eo:bands", []) + asset.get("bands", []):
            aliases |= {band.get("name"), band.get("common_name")} - {None}
        for a in aliases:
            by_name.setdefault(a.lower(), key)
    sources = []
    for name in names:
        key = by_name.get(name.lower())
        if key is None:
            raise RasterError(f"{path}: no asset for band {name}; the item has {', '.join(sorted(assets))}")
        href = assets[key].get("href", "")
        if re.match(r"^[a-z][a-z0-9+.-]*://", href) and not href.startswith("file://"):
            raise RasterError(f"{path}: asset {key} is remote ({href}); download it and point the href at the "
                              "local file (rsclip reads local files only)")
        href = href[len("file://"):] if href.startswith("file://") else href
        sources.append(BandSource(os.path.join(os.path.dirname(os.path.abspath(path)), href), 1, name))
    date = (item.get("properties") or {}).get("datetime")
    return sources, date[:10] if isinstance(date, str) else None


# The one rule for acquisition dates (scenes here, plain images in rsclip_jax.apps.index_inputs).
_NAME_DATE = re.compile(r"(?<!\d)((?:19|20)\d{2})[-_]?(0[1-9]|1[0-2])[-_]?(0[1-9]|[12]\d|3[01])(?:T\d{4,6})?(?!\d)")
_STAMP_DATE = re.compile(r"(\d{4})[:\-](\d{2})[:\-](\d{2})")


def date_from_stamp(value: object) -> str | None:
    """The ISO date of a TIFF/EXIF time stamp ("2017:02:16 10:21:01", "2017-02-16..."), or None."""
    m = _STAMP_DATE.match(str(value or ""))
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def date_from_name(name: str) -> str | None:
    """An ISO date in a file name (`..._20170216T102101_...`, `2017-02-16`, `2017_02_16`), or None."""
    m = _NAME_DATE.search(os.path.basename(name))
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def _date_from_tags(tags: dict[str, str]) -> str | None:
    return date_from_stamp(tags.get("TIFFTAG_DATETIME") or tags.get("ACQUISITION_DATE"))


def read_image(path: str | os.PathLike, bands: Sequence[int] | Sequence[str] | None = None,
               scale: tuple[float, float] | None = None, max_pixels: int | None = None,
               gamma: float = 1.0) -> np.ndarray:
    """A whole (small) raster as uint8 (h, w, 3) RGB: the fallback for files PIL cannot read
    (16-bit multi-band, band-interleaved, float, JPEG2000). Invalid pixels are 0.

    Raises:
        RasterError: for a scene above `max_pixels`, pointing at `rsclip map` for whole scenes.
    """
    with open_scene(path, bands, scale, gamma) as scene:
        if max_pixels is not None and scene.width * scene.height > max_pixels:
            raise RasterError(f"{path}: {scene.width} x {scene.height} pixels is too large to read whole; tile it "
                              "with `rsclip map` or `rsclip index build --tile`")
        return scene.read_rgb(Window(0, 0, scene.width, scene.height))[0]
