"""Tiled zero-shot mapping of a whole scene: `rsclip map`.

The scene is cut into square tiles every `stride` pixels (`raster.tile_windows`: the last tile of
a row or column ends at the edge), each tile is embedded and scored against the prompt-ensemble
classifier, and every pixel gets the **average of the class probabilities of the tiles that cover
it**. The class map takes the most probable class.

Memory is bounded by a window of rows, whatever the scene's size: tile rows are read as strips of
`tile` pixel rows, embedded a few rows at a time (enough tiles to fill a batch), and accumulated
into a rolling buffer of per-class sums; rows no later tile can touch are finished and written
out at once. The result does not depend on how many tile rows are embedded together.

`--gsd-resample M` maps at M metres per pixel: a tile covers `tile` x M metres on the ground (it
is read at the scene's resolution and resized to the model's input), while the outputs stay on
the scene's own grid.

Outputs (all written atomically, and only when the whole map succeeds):
- the class map, a tiled deflate GeoTIFF with the scene's size, CRS and transform: class k of
  the label list is value k+1, 0 (or the scene's own nodata value) is no data; a colour table,
  and the class names as `CLASS_<value>` tags;
- optionally the per-class probabilities as a COG, one band per class: uint8 percent (0-100,
  nodata 255) or float32 (nodata NaN);
- optionally polygons of the class regions (GeoJSON or GeoPackage, scene CRS) with the class
  and its mean probability (`rsclip_jax.apps.mapping_outputs`), and a quick-look PNG.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from PIL import Image
from rasterio.windows import Window
from tqdm import tqdm

from rsclip_jax.apps.mapping_outputs import PolygonCollector, palette, write_polygons, write_preview
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.fileio import atomic_files
from rsclip_jax.raster import RasterError, Scene, bounded_gdal_cache, tile_windows

# float32, not float16: rasterio 1.4 (the release for Python 3.11) cannot write GDAL Float16
PROBS_DTYPES = ("uint8", "float32")
DEFAULT_MIN_VALID = 0.5


@dataclass
class MapReport:
    """What `map_scene` did: counts, class areas and the files it wrote."""

    scene: str
    tile_pixels: int  # tile side in scene pixels
    stride_pixels: int
    tiles: int = 0
    embedded: int = 0
    skipped_nodata: int = 0  # tiles below min_valid
    unmapped_pixels: int = 0  # valid scene pixels that no embedded tile covers (written as nodata)
    class_pixels: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    nodata: int | None = None

    def summary(self) -> str:
        total = sum(self.class_pixels.values()) or 1
        shares = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in self.class_pixels.items())
        return (f"mapped {self.embedded} of {self.tiles} tiles ({self.tile_pixels} px, stride {self.stride_pixels}) in "
                f"{self.seconds:.1f} s; skipped {self.skipped_nodata} tiles without enough valid pixels"
                + (f", {self.unmapped_pixels} valid pixels unmapped" if self.unmapped_pixels else "")
                + f"; classes: {shares}")


class _StripReader:
    """`Extractor` items "row:col" read as tiles of in-memory strips (one strip per tile row).

    The cache identity of a tile is its scene (files, sizes, mtimes, bands, stretch), its place
    and its size, so an Extractor with a disk cache never mixes tiles of different scenes.
    """

    def __init__(self, strips: dict[int, np.ndarray], tile: int, scene_key: list):
        self.strips, self.tile, self.scene_key = strips, tile, scene_key

    def identity(self, item: str) -> list:
        return [self.scene_key, item, self.tile]

    def read(self, item: str) -> Image.Image:
        row, col = (int(v) for v in item.split(":"))
        return Image.fromarray(self.strips[row][:, col:col + self.tile])


def tile_size_in_pixels(scene: Scene, tile: int, stride: int, gsd_resample: float | None) -> tuple[int, int]:
    """Tile and stride in scene pixels: as given, or scaled so a tile covers `tile` x M metres."""
    if gsd_resample is None:
        return tile, stride
    if not gsd_resample > 0:
        raise RasterError(f"--gsd-resample {gsd_resample}: give the ground sampling distance in metres, above 0")
    if scene.crs is None or not scene.crs.is_projected:
        raise RasterError(f"{scene.path}: --gsd-resample needs a projected CRS in metres; the scene has "
                          f"{scene.crs.to_string() if scene.crs else 'none'}")
    factor = gsd_resample / abs(scene.res[0])
    return max(1, round(tile * factor)), max(1, round(stride * factor))


def output_nodata(scene: Scene, num_classes: int) -> int:
    """The class map's nodata: the scene's own when it fits uint8 and is not a class value, else 0."""
    nd = scene.nodata
    if nd is not None and float(nd).is_integer() and 0 <= nd <= 255 and not 1 <= nd <= num_classes:
        return int(nd)
    return 0


def map_scene(scene: Scene, extractor: Extractor, classes: np.ndarray, labels: Sequence[str], out: str, *,
              tile: int = 224, stride: int = 112, gsd_resample: float | None = None,
              min_valid: float = DEFAULT_MIN_VALID, probs: str | None = None, probs_dtype: str = "uint8",
              vector: str | None = None, preview: str | None = None, rows_per_batch: int | None = None,
              progress: bool = True) -> MapReport:
    """Maps `scene` with the zero-shot `classes` (C, D) of `labels`; writes `out` and the options.

    Args:
        rows_per_batch: tile rows embedded together (default: enough to fill a batch).

    Raises:
        RasterError: for a tile larger than the scene, a stride below 1, fewer than 2 labels.
    """
    if len(labels) < 2 or classes.shape[0] != len(labels):
        raise RasterError(f"give at least two labels (got {len(labels)})")
    if probs_dtype not in PROBS_DTYPES:
        raise RasterError(f"--probs-dtype {probs_dtype}: choose one of {', '.join(PROBS_DTYPES)}")
    t, s = tile_size_in_pixels(scene, tile, stride, gsd_resample)
    windows = tile_windows(scene.width, scene.height, t, s)
    rows = sorted({int(w.row_off) for w in windows})
    cols = sorted({int(w.col_off) for w in windows})
    per_call = rows_per_batch or max(1, math.ceil(extractor.batch_size / len(cols)))
    report = MapReport(scene.path, t, s, tiles=len(windows), nodata=output_nodata(scene, len(labels)))
    if scene.crs is None:
        print(f"warning: {scene.path} has no CRS: the map is written on pixel coordinates, not georeferenced",
              file=sys.stderr)
    paths = [out] + [p for p in (probs, vector, preview) if p]
    scene_key = [[(src.path, src.index, *_stat(src.path)) for src in scene.sources], dataclasses.astuple(scene.stretch)]
    start = time.time()
    with bounded_gdal_cache(), atomic_files(*paths) as tmps:
        tmp = dict(zip(paths, tmps))
        polygons = PolygonCollector(labels, scene.transform) if vector else None
        writer = _MapWriter(scene, labels, str(tmp[out]), report.nodata,
                            str(tmp[probs]) + ".tiles.tif" if probs else None, probs_dtype, polygons)
        try:
            acc = _Accumulator(len(labels), scene.width)
            bar = tqdm(total=len(windows), unit="tile", file=sys.stderr, disable=not progress,
                       desc=f"map {scene.path}")
            for i in range(0, len(rows), per_call):
                group = rows[i:i + per_call]
                strips, valids, items = {}, {}, []
                for y in group:
                    strips[y], valids[y] = scene.read_rgb(Window(0, y, scene.width, t))
                    for x in cols:
                        if valids[y][:, x:x + t].mean() >= min_valid:
                            items.append(f"{y}:{x}")
                        else:
                            report.skipped_nodata += 1
                p = _probabilities(extractor, items, _StripReader(strips, t, scene_key), classes)
                report.embedded += len(items)
                by_row: dict[int, list[tuple[int, np.ndarray]]] = {y: [] for y in group}
                for item, prob in zip(items, p):
                    y, x = (int(v) for v in item.split(":"))
                    by_row[y].append((x, prob))
                for j, y in enumerate(group, start=i):
                    acc.add(y, t, by_row[y], valids[y])
                    # rows above the next tile row are final: no later tile reaches them
                    writer.write(*acc.flush(rows[j + 1] if j + 1 < len(rows) else scene.height))
                bar.update(len(cols) * len(group))
            bar.close()
            report.unmapped_pixels = writer.unmapped
            report.class_pixels = {label: int(n) for label, n in zip(labels, writer.class_counts)}
        except BaseException:
            writer.close()
            if probs and os.path.exists(str(tmp[probs]) + ".tiles.tif"):
                os.remove(str(tmp[probs]) + ".tiles.tif")  # the strip file is not one of atomic_files' names
            raise
        writer.close()
        if probs:
            # a COG (overviews, tiled, deflate) from the strip-written tiled GeoTIFF
            strips = str(tmp[probs]) + ".tiles.tif"
            try:
                rasterio.shutil.copy(strips, str(tmp[probs]), driver="COG", compress="DEFLATE")
            finally:
                os.remove(strips)
        if vector:
            write_polygons(polygons, str(tmp[vector]), scene.crs, vector)
        if preview:
            write_preview(str(tmp[out]), labels, str(tmp[preview]))
    report.outputs = paths
    report.seconds = time.time() - start
    return report


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _probabilities(extractor: Extractor, items: list[str], reader: _StripReader, classes: np.ndarray) -> np.ndarray:
    if not items:
        return np.zeros((0, classes.shape[0]), np.float32)
    emb = extractor.images(items, reader=reader).embeddings
    logits = extractor.logit_scale * emb @ classes.T
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class _Accumulator:
    """Per-class probability sums and tile counts for the rows not yet written: [base, base + n)."""

    def __init__(self, num_classes: int, width: int):
        self.base = 0
        self.sums = np.zeros((num_classes, 0, width), np.float32)
        self.counts = np.zeros((0, width), np.uint16)
        self.valid = np.zeros((0, width), bool)

    def add(self, y: int, t: int, tiles: list[tuple[int, np.ndarray]], valid: np.ndarray) -> None:
        end = y + t - self.base
        if end > self.counts.shape[0]:  # grow the buffer to the strip's last row
            grow = end - self.counts.shape[0]
            self.sums = np.concatenate([self.sums, np.zeros((self.sums.shape[0], grow, self.sums.shape[2]),
                                                            np.float32)], axis=1)
            self.counts = np.concatenate([self.counts, np.zeros((grow, self.counts.shape[1]), np.uint16)])
            self.valid = np.concatenate([self.valid, np.zeros((grow, self.valid.shape[1]), bool)])
        r = y - self.base
        self.valid[r:r + t] |= valid
        for x, prob in tiles:
            self.sums[:, r:r + t, x:x + t] += prob[:, None, None]
            self.counts[r:r + t, x:x + t] += 1

    def flush(self, upto: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Removes and returns rows [base, upto): (first row, sums, counts, valid)."""
        n = upto - self.base
        out = (self.base, self.sums[:, :n], self.counts[:n], self.valid[:n])
        self.sums, self.counts, self.valid = self.sums[:, n:], self.counts[n:], self.valid[n:]
        self.base = upto
        return out


class _MapWriter:
    """Writes finished rows of the class map (and probabilities) into tiled GeoTIFFs."""

    def __init__(self, scene: Scene, labels: Sequence[str], path: str, nodata: int, probs_path: str | None,
                 probs_dtype: str, polygons: PolygonCollector | None):
        profile: dict[str, Any] = dict(driver="GTiff", width=scene.width, height=scene.height, crs=scene.crs,
                                       transform=scene.transform, tiled=True, blockxsize=256, blockysize=256,
                                       compress="deflate")
        self.nodata, self.probs_dtype, self.polygons = nodata, probs_dtype, polygons
        self.class_counts = np.zeros(len(labels), np.int64)
        self.unmapped = 0
        self.dst = rasterio.open(path, "w", count=1, dtype="uint8", nodata=nodata, **profile)
        self.dst.write_colormap(1, {i + 1: c for i, c in enumerate(palette(len(labels)))})
        self.dst.update_tags(1, **{f"CLASS_{i + 1}": label for i, label in enumerate(labels)})
        self.dst.update_tags(CLASSES=",".join(labels), NODATA_MEANS="no valid pixels, or not covered by a tile",
                             SOFTWARE="rsclip map (rsclip_jax)")
        self.probs = None
        if probs_path:
            nd = 255 if probs_dtype == "uint8" else float("nan")
            self.probs = rasterio.open(probs_path, "w", count=len(labels), dtype=probs_dtype, nodata=nd, **profile)
            for i, label in enumerate(labels):
                self.probs.set_band_description(i + 1, label)
            self.probs.update_tags(SCALE="percent (0-100)" if probs_dtype == "uint8" else "probability (0-1)")

    def write(self, row: int, sums: np.ndarray, counts: np.ndarray, valid: np.ndarray) -> None:
        if counts.shape[0] == 0:
            return
        mapped = (counts > 0) & valid
        self.unmapped += int((valid & (counts == 0)).sum())
        prob = sums / np.maximum(counts, 1)[None]
        cls = np.where(mapped, prob.argmax(axis=0) + 1, self.nodata).astype(np.uint8)
        self.class_counts += np.bincount(cls[mapped] - 1, minlength=len(self.class_counts))
        win = Window(0, row, cls.shape[1], cls.shape[0])
        self.dst.write(cls, 1, window=win)
        if self.probs is not None:
            if self.probs_dtype == "uint8":
                out = np.where(mapped[None], np.rint(prob * 100), 255).astype(np.uint8)
            else:
                out = np.where(mapped[None], prob, np.nan).astype(np.float32)
            self.probs.write(out, window=win)
        if self.polygons is not None:
            best = np.take_along_axis(prob, (cls.astype(np.int64) - 1).clip(0)[None], axis=0)[0]
            self.polygons.add(row, cls, mapped, best)

    def close(self) -> None:
        self.dst.close()
        if self.probs is not None:
            self.probs.close()
