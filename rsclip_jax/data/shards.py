"""What a training shard holds: the record format, the stored image bytes, ArrayRecord I/O.

One record is one image with all its captions:

    bytes 0-3   magic b"RSR" + format version (currently 1)
    bytes 4-7   header length N, unsigned 32-bit little-endian
    next N      header: UTF-8 JSON object
                  {"captions": [str, ...], "source": str, "id": str,
                   "width": int, "height": int, "format": "JPEG" | "PNG", "phash": "16 hex digits"}
    the rest    the encoded image file (JPEG or PNG bytes, decodable by PIL as RGB)

A JSON header keeps the format readable from any language without a schema library; the image
bytes follow raw so decoding never copies or base64-decodes them. Readers must reject other
magics or versions instead of guessing. `docs/data_pipeline.md` documents the format too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import warnings
from collections.abc import Iterable, Sequence

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image

from rsclip_jax.preprocess import resize_shortest_side, to_rgb

MAGIC = b"RSR"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record its own chunk: what grain's random access wants.
WRITER_OPTIONS = "group_size:1"
_PREFIX = struct.Struct("<3sBI")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One training image: encoded bytes plus its captions and provenance."""

    image: bytes
    captions: tuple[str, ...]
    source: str
    original_id: str
    width: int
    height: int
    format: str
    phash: str = ""


def encode_record(record: ImageRecord) -> bytes:
    """Serialises `record` (format above)."""
    header = json.dumps(
        {
            "captions": list(record.captions),
            "source": record.source,
            "id": record.original_id,
            "width": record.width,
            "height": record.height,
            "format": record.format,
            "phash": record.phash,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + record.image


def decode_header(data: bytes) -> tuple[dict, int]:
    """The JSON header of a serialised record and the offset where its image bytes start."""
    if len(data) < _PREFIX.size:
        raise ValueError(f"not an rsclip record: only {len(data)} bytes")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not an rsclip record: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"rsclip record format version {version} is not supported (this code reads {FORMAT_VERSION})")
    start = _PREFIX.size + header_len
    return json.loads(data[_PREFIX.size : start]), start


def decode_record(data: bytes) -> ImageRecord:
    """Parses a serialised record (raises ValueError for anything else)."""
    header, start = decode_header(data)
    return ImageRecord(
        image=bytes(data[start:]),
        captions=tuple(header["captions"]),
        source=header["source"],
        original_id=header["id"],
        width=int(header["width"]),
        height=int(header["height"]),
        format=header["format"],
        phash=header.get("phash", ""),
    )


class DecompressionBomb(ValueError):
    """An image declares more pixels than allowed."""


def open_checked(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """Opens an image lazily (header only), refusing more than `max_pixels` pixels.

    PIL's own limit (2x `Image.MAX_IMAGE_PIXELS`, process-global) still applies on top; we
    never change the global, so other code in the same process keeps its settings.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit
        img = Image.open(path)
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise DecompressionBomb(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return img


def encode_image(entry: dict, encode: dict) -> tuple[bytes, int, int, str]:
    """The image bytes a record stores: (bytes, width, height, format).

    RGB JPEG/PNG files no larger than `encode["image_size"]` (shorter side) keep their original
    bytes; anything else (TIFF, CMYK, grey, RGBA, 16-bit, too large) is converted to RGB,
    downscaled to that shorter side if needed, and re-encoded as `encode["format"]`.
    `entry` is a scan result (path, format, mode, width, height) of `rsclip_jax.data.build`.
    """
    size = encode["image_size"]
    if entry["format"] in ("JPEG", "PNG") and entry["mode"] == "RGB" and (
        size is None or min(entry["width"], entry["height"]) <= size
    ):
        with open(entry["path"], "rb") as f:
            return f.read(), entry["width"], entry["height"], entry["format"]
    with open_checked(entry["path"], encode["max_pixels"]) as img:
        if size is not None and img.format == "JPEG":
            scale = size / min(img.size)  # decode at the smallest DCT scale that still exceeds `size`
            img.draft("RGB", (int(img.width * scale) + 1, int(img.height * scale) + 1))
        img.load()
        rgb = to_rgb(img)
    if size is not None and min(rgb.size) > size:
        rgb = resize_shortest_side(rgb, size)
    buf = io.BytesIO()
    if encode["format"] == "JPEG":
        rgb.save(buf, "JPEG", quality=encode["quality"])
    else:
        rgb.save(buf, "PNG")
    return buf.getvalue(), rgb.width, rgb.height, encode["format"]


def shard_name(index: int, count: int) -> str:
    """File name of shard `index` of `count`, e.g. ``shard-00003-of-00010.array_record``."""
    return f"shard-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes serialised records to a new ArrayRecord file at `path`; returns how many."""
    writer = ArrayRecordWriter(os.fspath(path), WRITER_OPTIONS)
    count = 0
    try:
        for data in records:
            writer.write(data)
            count += 1
    finally:
        writer.close()
    return count


def read_shard(path: str | os.PathLike) -> list[bytes]:
    """All serialised records of one shard file, in order (for tests and inspection)."""
    reader = ArrayRecordReader(os.fspath(path))
    try:
        return list(reader.read_all())
    finally:
        reader.close()


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest that `rsclip data build` wrote into `data_dir`."""
    path = os.path.join(os.fspath(data_dir), MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; is {data_dir} the --out of `rsclip data build`?") from None


def _build_dirs(data_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """One build directory or several, as a list (what `data.train` may hold)."""
    return [data_dirs] if isinstance(data_dirs, (str, os.PathLike)) else list(data_dirs)


def max_caption_tokens(data_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> int | None:
    """The most tokens any caption in these build directories takes, from their manifests; None
    when a manifest predates the field (rebuild it with `rsclip data build` to record it)."""
    lengths = [load_manifest(d).get("max_caption_tokens") for d in _build_dirs(data_dirs)]
    return None if not lengths or None in lengths else max(lengths)


def shard_paths(data_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Absolute paths of the shards listed in the manifests of one or more build directories."""
    dirs = _build_dirs(data_dirs)
    paths = []
    for d in dirs:
        manifest = load_manifest(d)
        paths += [os.path.abspath(os.path.join(os.fspath(d), s["file"])) for s in manifest["shards"] if s["records"]]
    if not paths:
        raise ValueError(f"no non-empty shards in {', '.join(map(str, dirs))}")
    return paths
