"""What `rsclip index build|add` embeds: the items of its inputs, and reading them.

Inputs are files and folders:
- plain images (PNG, JPEG, ... as `preprocess.is_image_name` says) are one item each, read by PIL;
- rasters (`raster.is_raster_name`: GeoTIFF, COG, JP2, VRT) and local STAC item JSON are scenes:
  cut into `tile` x `tile` windows every `stride` pixels (`raster.tile_windows`), one item per
  window, named "path#col,row,width,height". A raster smaller than the tile on a side, or every
  raster with `whole_rasters` (an archive of chips), is one item: the whole raster;
- folders are walked recursively (sorted, hidden entries skipped). With band names (`--bands
  B04,B03,B02`) a folder holding those band files is one scene.

Scene tiles are read ahead of the embedding (a bounded number at a time) so that tiles with too
few valid pixels (nodata, masks) are skipped and counted before anything is embedded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import ExifTags, Image
from rasterio.windows import Window

from rsclip_jax.apps.index_store import Record
from rsclip_jax.preprocess import ImageReadError, is_image_name, load_image
from rsclip_jax.raster import (
    RasterError,
    Scene,
    band_files,
    date_from_name,
    date_from_stamp,
    fit_within,
    is_raster_name,
    open_scene,
    tile_windows,
)

WHOLE_MAX_SIDE = 2048  # a whole raster item is read decimated to at most this many pixels a side
@dataclass(frozen=True)
class Options:
    """How inputs become items (recorded in each shard's manifest entry)."""

    tile: int = 224
    stride: int | None = None  # default: tile (no overlap)
    bands: list[int] | list[str] | None = None
    scale: tuple[float, float] | None = None
    gamma: float = 1.0
    min_valid: float = 0.5  # tiles with a smaller share of valid pixels are skipped (nodata)
    whole_rasters: bool = False

    def settings(self) -> dict[str, Any]:
        return {"tile": self.tile, "stride": self.stride, "bands": self.bands,  # stride None: the tile
                "scale": list(self.scale) if self.scale else None, "gamma": self.gamma,
                "min_valid": self.min_valid, "whole_rasters": self.whole_rasters}

    @staticmethod
    def from_settings(s: dict[str, Any]) -> "Options":
        return Options(tile=s.get("tile", 224), stride=s.get("stride"), bands=s.get("bands"),
                       scale=tuple(s["scale"]) if s.get("scale") else None, gamma=s.get("gamma", 1.0),
                       min_valid=s.get("min_valid", 0.5), whole_rasters=s.get("whole_rasters", False))


@dataclass
class Item:
    """One thing to embed: a plain image file, a scene window, or a whole raster (window None)."""

    name: str
    path: str
    scene: Scene | None = None
    window: Window | None = None


def is_scene_input(path: str, options: Options) -> bool:
    """Whether an input path is read through rasterio (a raster file, a STAC item, a band folder)."""
    if os.path.isdir(path):
        return is_band_folder(path, options.bands)
    return is_raster_name(path) or path.lower().endswith(".json")


def is_band_folder(folder: str, bands: Sequence[int] | Sequence[str] | None) -> bool:
    """A folder holding a raster file for each named band (`..._B04.jp2`)."""
    if not bands or isinstance(bands[0], int):
        return False
    return all(band_files(folder, b) for b in bands)


def collect(inputs: Sequence[str | os.PathLike], options: Options) -> tuple[list[str], int]:
    """The absolute paths of the files and scenes under `inputs`, in order, each once, and how many
    more times some were named (a file given and also inside a given folder).

    Raises:
        ImageReadError: naming an input that does not exist, or a folder with nothing to index.
    """
    out: list[str] = []
    seen: set[str] = set()
    repeated = [0]

    def add(path: str) -> None:
        if path in seen:
            repeated[0] += 1
        else:
            seen.add(path)
            out.append(path)

    def walk(folder: str) -> int:
        if is_band_folder(folder, options.bands):
            add(folder)
            return 1
        found = 0
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if name.startswith("."):
                continue
            if os.path.isdir(full):
                found += walk(full)
            elif is_image_name(name) or is_raster_name(name):
                add(full)
                found += 1
        return found

    for given in inputs:
        path = os.path.abspath(os.fspath(given))
        if os.path.isdir(path):
            if walk(path) == 0:
                raise ImageReadError(f"{given}: folder holds no images or rasters (searched recursively)")
        elif os.path.exists(path):
            add(path)
        else:
            raise ImageReadError(f"{given}: no such file or folder")
    return out, repeated[0]


def file_identity(path: str) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a file; for a band folder the newest of its files and their total size."""
    try:
        if os.path.isdir(path):
            stats = [os.stat(os.path.join(path, f)) for f in os.listdir(path)]
            return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None, None


def image_date(path: str) -> str | None:
    """Acquisition date of a plain image: EXIF DateTimeOriginal / TIFF DateTime, else the file name."""
    try:
        with Image.open(path) as img:  # lazy: reads the header only
            exif = img.getexif()
            value = (exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal)
                     or exif.get(ExifTags.Base.DateTime))
    except (OSError, ValueError, SyntaxError):
        value = None
    return date_from_stamp(value) or date_from_name(path)


def scene_items(path: str, options: Options) -> tuple[Scene, list[Item]]:
    """Opens a scene and lists its items: tiles, or one whole-raster item.

    Raises:
        RasterError: naming the file, when it cannot be opened with the chosen bands.
    """
    scene = open_scene(path, options.bands, options.scale, options.gamma)
    tile = options.tile
    if options.whole_rasters or scene.width < tile or scene.height < tile:
        return scene, [Item(path, path, scene, None)]
    windows = tile_windows(scene.width, scene.height, tile, options.stride or tile)
    return scene, [Item(tile_name(path, w), path, scene, w) for w in windows]


def tile_name(path: str, window: Window) -> str:
    return f"{path}#{int(window.col_off)},{int(window.row_off)},{int(window.width)},{int(window.height)}"


def read_item(item: Item) -> tuple[Image.Image, float]:
    """A scene item as an RGB image and its share of valid pixels.

    Raises:
        ImageReadError: naming the item, for a window that cannot be read.
    """
    scene = item.scene
    assert scene is not None
    try:
        if item.window is None:
            size = fit_within(scene.width, scene.height, WHOLE_MAX_SIDE)
            rgb, valid = scene.read_rgb(Window(0, 0, scene.width, scene.height), out_size=size)
        else:
            rgb, valid = scene.read_rgb(item.window)
    except (RasterError, OSError) as e:
        raise ImageReadError(f"{item.name}: cannot read: {e}") from None
    return Image.fromarray(rgb, "RGB"), float(valid.mean()) if valid.size else 0.0


def read_tile(path: str, window: tuple[int, int, int, int] | None, options: Options) -> Image.Image:
    """An indexed item as 8-bit RGB, as it was embedded: a plain image, a scene window or a whole raster."""
    if not is_scene_input(path, options):
        return load_image(path)
    try:
        with open_scene(path, options.bands, options.scale, options.gamma) as scene:
            win = None if window is None else Window(*window)
            return read_item(Item(path, path, scene, win))[0]
    except RasterError as e:
        raise ImageReadError(str(e)) from None


def record_of(item: Item, valid_fraction: float, identity: tuple[int | None, int | None]) -> Record:
    """The metadata record of an embedded item."""
    scene = item.scene
    if scene is None:
        return Record(item=item.name, path=item.path, date=image_date(item.path),
                      file_size=identity[0], file_mtime_ns=identity[1])
    window = item.window or Window(0, 0, scene.width, scene.height)
    ring, lonlat = scene.footprint(window)
    return Record(item=item.name, path=item.path,
                  window=None if item.window is None else tuple(int(v) for v in (window.col_off, window.row_off,
                                                                                  window.width, window.height)),
                  crs=scene.crs.to_string() if scene.crs else None,
                  footprint=[[float(x), float(y)] for x, y in ring],
                  footprint_lonlat=lonlat, date=scene.date or date_from_name(item.path),
                  valid_fraction=valid_fraction, file_size=identity[0], file_mtime_ns=identity[1])


class ArchiveReader:
    """`Extractor.images` reader: scene items from the images read ahead, plain images from their files."""

    def __init__(self) -> None:
        self.ready: dict[str, Image.Image] = {}

    def identity(self, item: str) -> Any:
        # the extractor memoises by identity; a file edited between two chunks must not hit the memo
        return [item, *file_identity(item.split("#")[0])]

    def read(self, item: str) -> Image.Image:
        img = self.ready.get(item)
        return img if img is not None else load_image(item)


def iter_chunks(items: Iterator[Item], max_items: int, max_bytes: int) -> Iterator[list[Item]]:
    """Consecutive items in groups of at most `max_items`, and of read-ahead scene pixels at most `max_bytes`."""
    chunk: list[Item] = []
    size = 0
    for item in items:
        chunk.append(item)
        if item.scene is not None:
            w = item.window
            size += 3 * (int(w.width) * int(w.height) if w is not None else WHOLE_MAX_SIDE ** 2)
        if len(chunk) >= max_items or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
