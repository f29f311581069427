"""The on-disk layout of a search index: a manifest, and shards that are never modified once written.

    INDEX/
      manifest.json            written last, atomically: the index is what it lists
      shard-00000-1a2b3c4d/    one per `index build` (or several: --shard-size) and per `index add`
        embeddings.npy         (n, D) float32, L2-normalised, row r is id first_id + r
        metadata.parquet       one row per embedding (GeoParquet: `geometry` is the lon/lat footprint)
        vectors.faiss          approximate shards only: IVF-Flat index (see index_vectors)
      .lock                    held (flock) while a build or add changes the manifest

A shard folder is published whole (`fileio.atomic_write_folder`) before the manifest names it, so a
crash leaves at most an unlisted folder, which readers ignore (and `Searcher` reports). Ids are
stable: a shard covers ids [first_id, first_id + count), and later shards only append.

Searching reads one shard at a time (embeddings memory-mapped, IVF files memory-mapped) and merges
the per-shard top-k by score, so an archive larger than one machine's memory is searched with the
memory of one block of one shard. Shards can live on different disks by symlinking their folders.

metadata.parquet columns: id (int64), item (the embedded item: path, or "path#col,row,w,h" for a
scene tile), path (absolute), col_off/row_off/width/height (int32, null for whole images), crs
(e.g. "EPSG:32616", null without one), footprint (WKB polygon in the source CRS: pixel corners
without a CRS), geometry (WKB polygon in lon/lat, null without a CRS), date (ISO, null if unknown),
valid_fraction (float32: share of valid pixels), file_size and file_mtime_ns (int64: to tell an
indexed file from a changed one). The file carries GeoParquet 1.0 "geo" metadata with `geometry`
as primary column (OGC:CRS84), so `geopandas.read_parquet` opens it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from rsclip_jax.apps.index_vectors import VectorInfo, write_vectors
from rsclip_jax.fileio import atomic_write_folder, atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "rsclip-search-index"
VERSION = 1
# Parquet row groups: a hit's metadata is read from its own group only (row r of a shard is in group
# r // ROW_GROUP), so a query's 50 hits cost a few small reads whatever the shard's size.
ROW_GROUP = 1024


class IndexFormatError(ValueError):
    """A folder that is not (or no longer) a readable search index; the message names it."""


@dataclass(frozen=True)
class Record:
    """What is known about one embedded item."""

    item: str
    path: str
    window: tuple[int, int, int, int] | None = None
    crs: str | None = None
    footprint: list[list[float]] | None = None
    footprint_lonlat: list[list[float]] | None = None
    date: str | None = None
    valid_fraction: float = 1.0
    file_size: int | None = None
    file_mtime_ns: int | None = None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def manifest_path(index_dir: str | os.PathLike) -> Path:
    return Path(index_dir) / MANIFEST


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    """The index's manifest.

    Raises:
        FileNotFoundError: naming the folder, when it or its manifest is missing.
        IndexFormatError: for a manifest of another format or a newer version.
    """
    path = manifest_path(index_dir)
    if not Path(index_dir).is_dir():
        raise FileNotFoundError(f"{index_dir}: no such index folder; build one with `rsclip index build --out "
                                f"{index_dir} ...`")
    if not path.is_file():
        raise FileNotFoundError(f"{index_dir}: not a search index (no {MANIFEST}; an interrupted build leaves "
                                "none); build one with `rsclip index build`")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not an rsclip search index manifest (format {manifest.get('format')!r})"
                               if isinstance(manifest, dict) else f"{path}: not an rsclip search index manifest")
    if manifest.get("version", 0) > VERSION:
        raise IndexFormatError(f"{path}: index format version {manifest['version']} is newer than this rsclip "
                               f"reads ({VERSION}); upgrade rsclip_jax")
    return manifest


def write_manifest(index_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Publishes the manifest (atomically): from now on the index is what it lists."""
    manifest = dict(manifest, updated=now(), count=sum(s["count"] for s in manifest["shards"]))
    atomic_write_json(manifest_path(index_dir), manifest)


@contextlib.contextmanager
def index_lock(index_dir: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock of the index folder for a build or add (released when the process dies)."""
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(index_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexFormatError(f"{index_dir}: another `rsclip index` is changing this index; wait for it "
                                   "to finish") from None
        yield
    finally:
        os.close(fd)


def unlisted_shards(index_dir: str | os.PathLike, manifest: dict[str, Any] | None) -> list[str]:
    """Shard folders the manifest does not name: left by an interrupted build or add (safe to delete)."""
    listed = {s["name"] for s in (manifest or {}).get("shards", [])}
    return sorted(p.name for p in Path(index_dir).glob("shard-*") if p.is_dir() and p.name not in listed)


def new_shard_name(number: int) -> str:
    return f"shard-{number:05d}-{uuid.uuid4().hex[:8]}"


def _polygon_wkb(ring: list[list[float]] | None) -> bytes | None:
    return None if ring is None else shapely.to_wkb(shapely.Polygon(ring))


def _ring(wkb: bytes | None) -> list[list[float]] | None:
    if wkb is None:
        return None
    return [list(map(float, p)) for p in shapely.from_wkb(wkb).exterior.coords]


def records_table(records: Sequence[Record], first_id: int) -> pa.Table:
    """The metadata table of a shard (ids from `first_id`), with GeoParquet metadata."""
    def window_part(i: int) -> pa.Array:
        return pa.array([None if r.window is None else r.window[i] for r in records], pa.int32())

    table = pa.table({
        "id": pa.array(np.arange(first_id, first_id + len(records), dtype=np.int64)),
        "item": pa.array([r.item for r in records], pa.string()),
        "path": pa.array([r.path for r in records], pa.string()),
        "col_off": window_part(0), "row_off": window_part(1), "width": window_part(2), "height": window_part(3),
        "crs": pa.array([r.crs for r in records], pa.string()),
        "footprint": pa.array([_polygon_wkb(r.footprint) for r in records], pa.binary()),
        "geometry": pa.array([_polygon_wkb(r.footprint_lonlat) for r in records], pa.binary()),
        "date": pa.array([r.date for r in records], pa.string()),
        "valid_fraction": pa.array([r.valid_fraction for r in records], pa.float32()),
        "file_size": pa.array([r.file_size for r in records], pa.int64()),
        "file_mtime_ns": pa.array([r.file_mtime_ns for r in records], pa.int64()),
    })
    lonlat = [r.footprint_lonlat for r in records if r.footprint_lonlat is not None]
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"] if lonlat else [],
                                    # no "crs" key: GeoParquet's default, OGC:CRS84 (lon/lat)
                                    **({"bbox": list(bbox(lonlat))} if lonlat else {})}}}
    return table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})


def bbox(rings: Sequence[list[list[float]]]) -> tuple[float, float, float, float]:
    """(min x, min y, max x, max y) over rings."""
    xy = np.concatenate([np.asarray(r, np.float64) for r in rings])
    return float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())


def write_shard(index_dir: str | os.PathLike, name: str, embeddings: np.ndarray, records: Sequence[Record],
                first_id: int, kind: str, extra_queries: np.ndarray | None = None,
                settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Writes a complete shard folder (published whole) and returns its manifest entry."""
    if len(embeddings) != len(records):
        raise ValueError(f"{len(embeddings)} embeddings for {len(records)} records")
    info: list[VectorInfo] = []

    def write(folder: Path) -> None:
        np.save(folder / "embeddings.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
        pq.write_table(records_table(records, first_id), folder / "metadata.parquet", row_group_size=ROW_GROUP)
        info.append(write_vectors(folder, embeddings, kind, extra_queries))

    atomic_write_folder(Path(index_dir) / name, write)
    lonlat = [r.footprint_lonlat for r in records if r.footprint_lonlat is not None]
    entry = {"name": name, "first_id": first_id, "count": len(records), "row_group": ROW_GROUP, **info[0].to_dict(),
             "files": len({r.path for r in records}), "created": now(), **(settings or {})}
    if lonlat:
        entry["extent_lonlat"] = list(bbox(lonlat))
    return entry


def shard_embeddings(index_dir: str | os.PathLike, shard: dict[str, Any]) -> np.ndarray:
    """The shard's embeddings, memory-mapped read-only."""
    path = Path(index_dir) / shard["name"] / "embeddings.npy"
    try:
        emb = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: cannot read the shard's embeddings ({e}); rebuild the index") from None
    if emb.shape[0] != shard["count"]:
        raise IndexFormatError(f"{path}: {emb.shape[0]} rows where the manifest says {shard['count']}; "
                               "rebuild the index")
    return emb


class MetadataReader:
    """Reads the metadata rows of hits: a shard's row r lies in Parquet row group r // ROW_GROUP.

    Row groups are kept in an LRU cache of `max_groups` groups (1024 rows each), so repeated queries
    (a web page) cost no reads, and memory stays bounded whatever the archive's size.
    """

    def __init__(self, index_dir: str | os.PathLike, max_groups: int = 1024):
        self.index_dir = Path(index_dir)
        self.max_groups = max_groups
        self._files: dict[str, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._lock = threading.Lock()  # the web server queries from several threads

    def _group(self, shard: dict[str, Any], group: int) -> pa.Table:
        key = (shard["name"], group)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
            path = self.index_dir / shard["name"] / "metadata.parquet"
            try:
                if shard["name"] not in self._files:
                    self._files[shard["name"]] = pq.ParquetFile(path)
                table = self._files[shard["name"]].read_row_group(group)
            except (OSError, pa.ArrowException, IndexError) as e:
                raise IndexFormatError(f"{path}: cannot read the shard's metadata ({e}); rebuild the index") from None
            self._groups[key] = table
            while len(self._groups) > self.max_groups:
                self._groups.popitem(last=False)
            return table

    def rows(self, shard: dict[str, Any], ids: Sequence[int]) -> list[dict[str, Any]]:
        """The rows of these ids of a shard as dicts (rings decoded, window a tuple or None), in id order."""
        size = int(shard.get("row_group", ROW_GROUP))  # the size the shard was written with
        by_group: dict[int, list[int]] = {}
        for i in sorted({int(i) for i in ids}):
            r = i - shard["first_id"]
            by_group.setdefault(r // size, []).append(r % size)
        out = []
        for group, offsets in sorted(by_group.items()):
            out.extend(_decode(row) for row in self._group(shard, group).take(offsets).to_pylist())
        return out


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    if "col_off" in row:
        parts = [row.pop(k) for k in ("col_off", "row_off", "width", "height")]
        row["window"] = None if parts[0] is None else tuple(int(p) for p in parts)
    for key, out in (("footprint", "footprint"), ("geometry", "footprint_lonlat")):
        if key in row:
            row[out] = _ring(row.pop(key))
    return row


def indexed_files(index_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, tuple[int | None, int | None]]:
    """{absolute path: (size, mtime_ns)} of every file the index holds (scene files once)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    for shard in manifest["shards"]:
        path = Path(index_dir) / shard["name"] / "metadata.parquet"
        table = pq.read_table(path, columns=["path", "file_size", "file_mtime_ns"])
        for p, s, m in zip(*(table.column(c).to_pylist() for c in ("path", "file_size", "file_mtime_ns"))):
            out.setdefault(p, (s, m))
    return out
