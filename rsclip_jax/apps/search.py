"""Searching an index by text, by example image or by an indexed item: `rsclip search` and its Python API.

    searcher = Searcher("archive.index")            # the checkpoint recorded at build time
    hits = searcher.search(text="ships in a harbour", negative_texts=["clouds"], k=20)
    geojson = hits_to_geojson(hits)

The query vector is the normalised sum of the unit embeddings of what is given (the texts' mean,
the images' mean, the stored embedding of `similar_to`). Scores are cosine similarities; with
negatives, score(x) = cos(q, x) - w * mean_j cos(n_j, x) (w = `negative_weight`, 1 by default).
That score is the inner product of x with q - w * mean_j n_j, so the index ranks by it directly:
for an exact shard the hits are the true top-k of the combined score, with no candidate cut-off.

Shards are searched one at a time and their top-k merged by score (`index_store`).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsclip_jax.apps.index import check_same_model, load_embedder
from rsclip_jax.apps.index_inputs import Options, read_tile
from rsclip_jax.apps.index_store import MetadataReader, read_manifest, shard_embeddings, unlisted_shards
from rsclip_jax.apps.index_vectors import VectorInfo, merge_top_k, open_vectors, search_shard
from rsclip_jax.evaluate.embeddings import Extractor
from rsclip_jax.fileio import atomic_write
from rsclip_jax.preprocess import load_image

QUERY_BATCH = 8  # query texts/images embedded per batch: a search embeds one or a few


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int  # 1-based
    score: float  # cosine similarity (or combined score with negatives)
    id: int  # row id in the index, stable across `index add`
    path: str  # absolute path of the image or scene file
    window: tuple[int, int, int, int] | None  # (col_off, row_off, width, height) of a scene tile; None: whole image
    crs: str | None  # e.g. "EPSG:32616"
    footprint: list[list[float]] | None  # closed ring in the source CRS
    footprint_lonlat: list[list[float]] | None  # closed ring in EPSG:4326 lon/lat
    date: str | None  # acquisition date if known, ISO

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": self.score, "id": self.id, "path": self.path,
                "window": list(self.window) if self.window is not None else None, "crs": self.crs,
                "footprint": self.footprint, "footprint_lonlat": self.footprint_lonlat, "date": self.date}


class _MemoryReader:
    """`Extractor.images` reader for query images given as PIL images or files."""

    def __init__(self, images: Sequence[str | Image.Image]):
        self.images = list(images)

    def identity(self, item: str) -> Any:
        # The extractor memoises by identity: it must change with the content (a new upload, an edited file).
        image = self.images[int(item)]
        if isinstance(image, (str, os.PathLike)):
            st = os.stat(image)
            return [os.path.abspath(image), st.st_size, st.st_mtime_ns]
        return [image.mode, list(image.size), hashlib.sha256(image.tobytes()).hexdigest()]

    def read(self, item: str) -> Image.Image:
        image = self.images[int(item)]
        return load_image(image) if isinstance(image, (str, os.PathLike)) else image.convert("RGB")


class Searcher:
    """A search index opened for queries. The model is loaded at the first text or image query.

    Args:
        index_dir: the index folder (`rsclip index build --out`).
        checkpoint: the model for queries; default: the checkpoint recorded at build time. Its weights
            must be the index's (fingerprint checked), else a ValueError names both.
        model, dtype: as for loading any checkpoint (the fingerprint covers the compute dtype).
        batch_size: upper bound of the query batch (queries are embedded at most 8 at a time).
    """

    def __init__(self, index_dir: str, checkpoint: str | None = None, model: str | None = None,
                 dtype: str = "float32", batch_size: int = 64):
        self.index_dir = os.path.abspath(index_dir)
        self.manifest = read_manifest(self.index_dir)
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self._starts = [s["first_id"] for s in self.shards]
        self.root: str = self.manifest.get("root") or os.path.dirname(self.index_dir)
        self.checkpoint = checkpoint or self.manifest["checkpoint"]
        self._model, self._dtype, self._batch = model, dtype, max(1, min(batch_size, QUERY_BATCH))
        self._extractor: Extractor | None = None
        self._vectors: dict[str, Any] = {}
        self._metadata = MetadataReader(self.index_dir)
        self._lock = threading.RLock()
        orphans = unlisted_shards(self.index_dir, self.manifest)
        if orphans:
            print(f"warning: {self.index_dir}: {len(orphans)} shard folder(s) not in the manifest, left by an "
                  f"interrupted build or add, are ignored (safe to delete: {', '.join(orphans[:3])})", file=sys.stderr)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    # -- queries ---------------------------------------------------------------------------------

    @property
    def extractor(self) -> Extractor:
        """The query model, loaded (and checked against the index) on first use."""
        with self._lock:
            if self._extractor is None:
                if not os.path.exists(self.checkpoint):
                    raise FileNotFoundError(f"{self.checkpoint}: the index's checkpoint is missing; pass the same "
                                            "weights with --checkpoint (checkpoint=...)")
                same = os.path.abspath(self.checkpoint) == self.manifest["checkpoint"]
                extractor, info = load_embedder(self.checkpoint, self._model, self._dtype, self._batch,
                                                step=self.manifest.get("step") if same else None)
                check_same_model(self.index_dir, self.manifest, extractor, info)
                self._extractor = extractor
            return self._extractor

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit embeddings of texts with the index's model."""
        texts = [t.strip() for t in texts]
        if not texts or any(not t for t in texts):
            raise ValueError("a text query is empty; give some words, e.g. --text \"ships in a harbour\"")
        with self._lock:
            return self.extractor.texts(texts)

    def embed_images(self, images: Sequence[str | Image.Image]) -> np.ndarray:
        """(N, D) unit embeddings of query images (files or PIL images), preprocessed as indexed images are."""
        with self._lock:
            return self.extractor.images([str(i) for i in range(len(images))], reader=_MemoryReader(images)).embeddings

    def embedding(self, id: int) -> np.ndarray:
        """The stored (D,) embedding of an indexed item."""
        shard, row = self._locate(id)
        return np.asarray(shard_embeddings(self.index_dir, shard)[row], np.float32)

    def search(self, text: str | Sequence[str] | None = None, image: str | Image.Image | None = None,
               negative_texts: Sequence[str] = (), negative_images: Sequence[str | Image.Image] = (),
               similar_to: int | None = None, k: int = 50, negative_weight: float = 1.0) -> list[Hit]:
        """The k best items for the query, best first (see the module docstring for the score).

        Raises:
            ValueError: for k < 1, no query at all, an unknown `similar_to` id, or a model mismatch.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"--k {k}: must be a positive integer (1 or more)")
        parts = []
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            parts.append(_unit(self.embed_texts(texts).mean(axis=0)))
        if image is not None:
            parts.append(self.embed_images([image])[0])
        if similar_to is not None:
            parts.append(self.embedding(int(similar_to)))
        if not parts:
            raise ValueError("give a query: --text, --image (or similar_to in the API)")
        query = _unit(np.sum(parts, axis=0))
        negatives = []
        if negative_texts:
            negatives.append(self.embed_texts(list(negative_texts)))
        if negative_images:
            negatives.append(self.embed_images(list(negative_images)))
        if negatives:
            query = query - float(negative_weight) * np.concatenate(negatives).mean(axis=0)
        return self.search_vector(query, k)

    def search_vector(self, query: np.ndarray, k: int) -> list[Hit]:
        """The k items with the largest inner product with `query` (D,), shard by shard, merged."""
        q = np.asarray(query, np.float32).reshape(1, -1)
        if q.shape[1] != self.manifest["embed_dim"]:
            raise ValueError(f"query has {q.shape[1]} dimensions, the index {self.manifest['embed_dim']}")
        scores, ids = [np.zeros((1, 0), np.float32)], [np.zeros((1, 0), np.int64)]
        for shard in self.shards:
            s, rows = search_shard(self._shard_index(shard), shard_embeddings(self.index_dir, shard), q, k)
            scores.append(s)
            ids.append(np.where(rows >= 0, rows + shard["first_id"], -1))
        s, i = merge_top_k(scores, ids, k)
        found = [(float(a), int(b)) for a, b in zip(s[0], i[0]) if b >= 0]
        meta = self._rows([b for _, b in found])
        return [Hit(rank=r, score=score, id=id, path=meta[id]["path"], window=meta[id]["window"],
                    crs=meta[id]["crs"], footprint=meta[id]["footprint"],
                    footprint_lonlat=meta[id]["footprint_lonlat"], date=meta[id]["date"])
                for r, (score, id) in enumerate(found, start=1)]

    # -- items -----------------------------------------------------------------------------------

    def tile(self, id: int) -> Image.Image:
        """The indexed image, or the scene window, as 8-bit RGB (as it was embedded, before resizing)."""
        shard, _ = self._locate(id)
        row = self._rows([id])[id]
        return read_tile(row["path"], row["window"], Options.from_settings(shard.get("settings") or {}))

    def extent_lonlat(self) -> tuple[float, float, float, float] | None:
        """(west, south, east, north) over every footprint, or None when nothing is georeferenced."""
        boxes = [s["extent_lonlat"] for s in self.shards if s.get("extent_lonlat")]
        if not boxes:
            return None
        b = np.asarray(boxes)
        return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())

    def _locate(self, id: int) -> tuple[dict[str, Any], int]:
        j = bisect.bisect_right(self._starts, int(id)) - 1
        if id < 0 or j < 0 or id >= self._starts[j] + self.shards[j]["count"]:
            raise ValueError(f"no item {id} in {self.index_dir} (ids are 0..{len(self) - 1})")
        return self.shards[j], int(id) - self._starts[j]

    def _rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        by_shard: dict[int, list[int]] = {}
        for id in ids:
            by_shard.setdefault(bisect.bisect_right(self._starts, id) - 1, []).append(id)
        out: dict[int, dict[str, Any]] = {}
        for j, shard_ids in by_shard.items():
            out.update({row["id"]: row for row in self._metadata.rows(self.shards[j], shard_ids)})
        return out

    def _shard_index(self, shard: dict[str, Any]) -> Any:
        with self._lock:
            if shard["name"] not in self._vectors:
                self._vectors[shard["name"]] = open_vectors(os.path.join(self.index_dir, shard["name"]),
                                                            VectorInfo.from_dict(shard))
            return self._vectors[shard["name"]]


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


# -- outputs -----------------------------------------------------------------------------------------


def hits_to_geojson(hits: Sequence[Hit]) -> dict:
    """A GeoJSON FeatureCollection in lon/lat: one feature per hit, geometry null without a footprint."""
    features = []
    for h in hits:
        props = h.to_dict()
        props.pop("footprint_lonlat")
        props["footprint_source_crs"] = props.pop("footprint")
        geometry = {"type": "Polygon", "coordinates": [h.footprint_lonlat]} if h.footprint_lonlat else None
        features.append({"type": "Feature", "id": h.id, "geometry": geometry, "properties": props})
    return {"type": "FeatureCollection", "features": features}


CSV_COLUMNS = ["rank", "score", "id", "path", "col_off", "row_off", "width", "height", "crs", "date",
               "footprint_lonlat_wkt"]


def hits_to_csv(hits: Sequence[Hit]) -> str:
    """CSV, one row per hit; the lon/lat footprint as WKT (GIS tools read it as geometry)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for h in hits:
        window = list(h.window) if h.window is not None else ["", "", "", ""]
        wkt = ("POLYGON ((" + ", ".join(f"{x!r} {y!r}" for x, y in h.footprint_lonlat) + "))"
               if h.footprint_lonlat else "")
        writer.writerow([h.rank, f"{h.score:.6f}", h.id, h.path, *window, h.crs or "", h.date or "", wkt])
    return buf.getvalue()


def write_contact_sheet(searcher: Searcher, hits: Sequence[Hit], path: str | os.PathLike, thumb: int = 192,
                        columns: int | None = None) -> None:
    """A grid of the hits' thumbnails, each captioned with its rank, score and file (and tile offset);
    JPEG or PNG by suffix, written atomically."""
    if not hits:
        raise ValueError("no hits to draw in a contact sheet")
    columns = columns or min(len(hits), max(1, math.ceil(math.sqrt(len(hits)))), 10)
    rows = math.ceil(len(hits) / columns)
    line = max(13, thumb // 12)
    font = ImageFont.load_default(size=line - 2)
    cell_w, cell_h = thumb + 6, thumb + 2 * line + 8
    sheet = Image.new("RGB", (columns * cell_w + 6, rows * cell_h + 6), "white")
    draw = ImageDraw.Draw(sheet)

    def fit(text: str) -> str:  # shortened from the left, so the end of a file name stays readable
        while len(text) > 1 and draw.textlength(text, font=font) > thumb:
            text = "…" + text[2:]
        return text

    for n, hit in enumerate(hits):
        x, y = 6 + (n % columns) * cell_w, 6 + (n // columns) * cell_h
        try:
            img = searcher.tile(hit.id)
            f = thumb / max(img.size)  # small tiles (a 24 px Sentinel-2 patch) are enlarged too
            size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
            img = img.resize(size, Image.NEAREST if f >= 2 else Image.BICUBIC)  # enlarged: crisp pixels
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        except (OSError, ValueError) as e:  # a file gone since indexing: a grey cell says so
            draw.rectangle([x, y, x + thumb, y + thumb], fill=(200, 200, 200))
            draw.text((x + 4, y + 4), fit(f"unreadable: {e}"), fill="black", font=font)
        where = "" if hit.window is None else f" @{hit.window[0]},{hit.window[1]}"
        draw.text((x, y + thumb + 2), f"#{hit.rank}   {hit.score:.3f}", fill="black", font=font)
        draw.text((x, y + thumb + 2 + line), fit(os.path.basename(hit.path) + where), fill=(60, 60, 60), font=font)
    fmt = "PNG" if str(path).lower().endswith(".png") else "JPEG"
    atomic_write(path, lambda tmp: sheet.save(tmp, format=fmt, **({"quality": 90} if fmt == "JPEG" else {})))
