"""`rsclip serve`: a local web page over a search index (a small FastAPI app, pages served from the package).

The page (static/index.html, app.js, style.css; no CDN, so it works offline) asks this JSON API:

- `GET  /api/info`                     archive size, lon/lat extent, upload bound;
- `POST /api/search` (multipart form)  `text`, `image` (upload), `negative_text` (repeatable),
  `negative_image` (repeatable uploads), `similar_to` (a hit id: "more like this"), `k`;
  `GET /api/search?text=...&similar_to=...&k=...` is the same without uploads;
- `GET  /api/thumb/{id}?size=256`      a JPEG thumbnail of one indexed tile;
- `GET  /api/tile/{id}`                the full tile as PNG;
- `GET  /api/download/{query}?format=geojson|csv`  the hits of a recent search, as a file;
- `GET  /tile?path=REL`                a source file of the archive: an indexed file inside `searcher.root`.

Safety: the CLI binds to 127.0.0.1 and, on a loopback address, answers only requests whose Host is a
loopback name (a web page elsewhere cannot reach it through DNS rebinding); request bodies are bounded
(413 before the upload is read when Content-Length says so, else as soon as the bound is passed);
uploads that are not images get 415 with a message; file paths are resolved (symlinks included),
must stay inside the archive root and be files the index holds; every response carries a
Content-Security-Policy of 'self' only.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import os
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError

from rsclip_jax.apps.index_store import indexed_files
from rsclip_jax.apps.search import Hit, Searcher, hits_to_csv, hits_to_geojson

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_K = 500
# Multipart headers and the text fields ride along with the uploaded file; the body may exceed the
# file bound by this much before the request is refused (the file itself is checked exactly).
FORM_SLACK_BYTES = 1024 * 1024
# An uploaded image is decoded whole before the model sees it: refuse more pixels than this (a small
# compressed file can decode to gigabytes).
MAX_UPLOAD_PIXELS = 64_000_000
RECENT_QUERIES = 64  # searches kept for their download links
THUMB_CACHE = 1024  # encoded thumbnails kept in memory (a few KB each)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                 b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                                 b"frame-ancestors 'none'; form-action 'self'"),
]
# Archive files the browser may show inline; anything else is sent as a download (never rendered
# under this origin, so a .html or .js file in the archive cannot run as part of the page).
INLINE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
                ".json": "application/json"}


class BodyTooLarge(HTTPException):
    """A request body over the bound (raised while it is being received, before it is all read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {_size(limit)}: uploads are limited to "
                              f"{_size(limit - FORM_SLACK_BYTES)} (rsclip serve --max-upload-mb)")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"


def _host_name(header: str) -> str:
    """The name of a Host header without its port: `[::1]:8080` -> `::1`, `localhost:80` -> `localhost`."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
    """ASGI middleware: Host check, request-body bound and security headers on every response.

    Pure ASGI (not BaseHTTPMiddleware) so that the body is counted as it arrives and an oversized
    upload is refused without being read into memory.
    """

    def __init__(self, app: Any, max_body: int, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        host = _host_name(headers.get("host", "")).lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return await JSONResponse({"detail": f"Host {headers.get('host', '')!r} refused: this server answers "
                                                 "only to loopback names (rsclip serve --host sets another)"},
                                      400)(scope, receive, send_with_headers)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await JSONResponse({"detail": BodyTooLarge(self.max_body).detail}, 413)(
                scope, receive, send_with_headers)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # An HTTPException: FastAPI's form parsing passes it on, the app answers 413.
                    raise BodyTooLarge(self.max_body)
            return message

        await self.app(scope, limited_receive, send_with_headers)


def _read_upload(upload: UploadFile, limit: int) -> Image.Image:
    """The uploaded file as an RGB image; 413 when over `limit` bytes or pixels, 415 when not an image."""
    name = upload.filename or "upload"
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{name}: larger than the upload limit of {_size(limit)} "
                                 "(rsclip serve --max-upload-mb)")
    if not data:
        raise HTTPException(400, f"{name}: the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise HTTPException(413, f"{name}: {image.width}x{image.height} pixels is more than the "
                                     f"{MAX_UPLOAD_PIXELS:,} an uploaded query image may have; send a smaller one")
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise HTTPException(415, f"{name}: not an image that can be read (PNG, JPEG, TIFF, WebP, ...); "
                                 "upload an image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise HTTPException(400, f"{name}: the image cannot be decoded ({e})") from None


def _archive_file(root: str, path: str, indexed: set[str]) -> str:
    """`path` (relative to `root`, or absolute) resolved with its symlinks; 403 unless it lies inside
    `root` (resolved too) and is one of the `indexed` files (resolved), 404 unless it is a file."""
    if "\0" in path:
        raise HTTPException(400, "a path cannot hold a NUL character")
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise HTTPException(403, f"{path!r}: outside the archive; only files under its root are served")
    if not os.path.isfile(real):
        raise HTTPException(404, f"{path!r}: no such file in the archive")
    # The root is the inputs' common folder, which can be wide (/ for inputs on two disks): only the
    # files the index holds are served, not their neighbours.
    if real not in indexed:
        raise HTTPException(403, f"{path!r}: not a file of this index; only indexed files are served")
    return real


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def create_app(searcher: Searcher, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The web app over `searcher`, for uvicorn (`serve`) or FastAPI's TestClient.

    Args:
        searcher: the opened index (`rsclip_jax.apps.search.Searcher`).
        max_upload_bytes: the largest uploaded query image; larger -> 413.
        allowed_hosts: Host header names answered (None: any). `serve` passes the loopback names when
            it listens on a loopback address.
    """
    app = FastAPI(title="rsclip search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, max_body=max_upload_bytes + FORM_SLACK_BYTES, allowed_hosts=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # The model and the index are not known to be thread-safe; FastAPI runs these handlers in a thread pool.
    lock = threading.Lock()
    recent: OrderedDict[str, tuple[list[Hit], str]] = OrderedDict()
    thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
    root = os.path.realpath(searcher.root)
    indexed: set[str] = set()  # resolved paths of the indexed files, read at the first /tile request

    def indexed_paths() -> set[str]:
        with lock:
            if not indexed:
                indexed.update(os.path.realpath(p) for p in indexed_files(searcher.index_dir, searcher.manifest))
            return indexed

    def check_id(id: int) -> None:
        if not 0 <= id < len(searcher):
            raise HTTPException(404, f"no item {id} in this index (ids are 0..{len(searcher) - 1})")

    def tile(id: int) -> Image.Image:
        check_id(id)
        try:
            with lock:
                return searcher.tile(id)
        except (OSError, ValueError) as e:  # the file moved, changed or went unreadable since indexing
            raise HTTPException(404, f"item {id}: its source file cannot be read ({e})") from None

    def hit_json(hit: Hit) -> dict:
        real = os.path.realpath(os.path.join(root, hit.path))
        inside = os.path.commonpath([root, real]) == root
        return {"rank": hit.rank, "score": hit.score, "id": hit.id, "path": hit.path,
                "relpath": os.path.relpath(real, root) if inside else hit.path,
                "window": list(hit.window) if hit.window is not None else None, "crs": hit.crs,
                "footprint_lonlat": hit.footprint_lonlat, "date": hit.date,
                "thumb": f"/api/thumb/{hit.id}", "tile": f"/api/tile/{hit.id}",
                "file": f"/tile?path={quote(os.path.relpath(real, root), safe='/')}" if inside else None}

    def run_search(text: str, negative_text: list[str], similar_to: int | None, k: int,
                   image: Image.Image | None, negative_images: list[Image.Image], described: str) -> dict:
        text = text.strip()
        negatives = [t.strip() for t in negative_text if t.strip()]
        if not text and image is None and similar_to is None:
            raise HTTPException(400, "give a text, an image or a hit to search like (similar_to)")
        if similar_to is not None:
            check_id(similar_to)
        t0 = time.perf_counter()
        try:
            with lock:
                hits = searcher.search(text=text or None, image=image, negative_texts=tuple(negatives),
                                       negative_images=tuple(negative_images), similar_to=similar_to, k=k)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        elapsed = time.perf_counter() - t0
        query_id = secrets.token_hex(8)
        with lock:
            recent[query_id] = (hits, described)
            while len(recent) > RECENT_QUERIES:
                recent.popitem(last=False)
        return {"query": query_id, "described": described, "count": len(hits), "seconds": round(elapsed, 4),
                "hits": [hit_json(h) for h in hits],
                "downloads": {fmt: f"/api/download/{query_id}?format={fmt}" for fmt in ("geojson", "csv")}}

    def describe(text: str, image_name: str | None, similar_to: int | None, negatives: list[str]) -> str:
        parts = [f'"{text.strip()}"'] if text.strip() else []
        parts += [f"image {image_name}"] if image_name else []
        parts += [f"more like #{similar_to}"] if similar_to is not None else []
        parts += [f'not "{n.strip()}"' for n in negatives if n.strip()]
        return ", ".join(parts)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/api/info")
    def info() -> dict:
        extent = searcher.extent_lonlat()
        return {"count": len(searcher), "root": root, "extent_lonlat": list(extent) if extent else None,
                "max_upload_bytes": max_upload_bytes, "max_k": MAX_K}

    @app.get("/api/search")
    def search_get(text: str = "", negative_text: list[str] = Query([]), similar_to: int | None = None,
                   k: int = Query(50, ge=1, le=MAX_K)) -> dict:
        return run_search(text, negative_text, similar_to, k, None, [],
                          describe(text, None, similar_to, negative_text))

    @app.post("/api/search")
    def search_post(text: str = Form(""), negative_text: list[str] = Form([]), similar_to: int | None = Form(None),
                    k: int = Form(50, ge=1, le=MAX_K), image: UploadFile | None = File(None),
                    negative_image: list[UploadFile] = File([])) -> dict:
        # A browser sends an empty file part when no file was chosen.
        query_image = _read_upload(image, max_upload_bytes) if image is not None and image.filename else None
        negatives = [_read_upload(f, max_upload_bytes) for f in negative_image if f.filename]
        return run_search(text, negative_text, similar_to, k, query_image, negatives,
                          describe(text, image.filename if query_image else None, similar_to, negative_text))

    @app.get("/api/thumb/{id}")
    def thumb(id: int, size: int = Query(256, ge=16, le=1024)) -> Response:
        key = (id, size)
        data = thumbs.get(key)
        if data is None:
            image = tile(id).copy()
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
            data = _encode(image.convert("RGB"), "JPEG", quality=85)
            with lock:
                thumbs[key] = data
                while len(thumbs) > THUMB_CACHE:
                    thumbs.popitem(last=False)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=600"})

    @app.get("/api/tile/{id}")
    def full_tile(id: int) -> Response:
        return Response(_encode(tile(id).convert("RGB"), "PNG"), media_type="image/png",
                        headers={"cache-control": "private, max-age=600"})

    @app.get("/api/download/{query_id}")
    def download(query_id: str, format: str = Query("geojson", pattern="^(geojson|csv)$")) -> Response:
        entry = recent.get(query_id)  # one lookup: another request may evict it meanwhile
        if entry is None:
            raise HTTPException(404, f"search {query_id} is no longer kept (the last {RECENT_QUERIES} are); "
                                     "run it again and download")
        hits, _ = entry
        attachment = {"content-disposition": f'attachment; filename="rsclip_hits.{format}"'}
        if format == "csv":
            return Response(hits_to_csv(hits), media_type="text/csv; charset=utf-8", headers=attachment)
        return JSONResponse(hits_to_geojson(hits), media_type="application/geo+json", headers=attachment)

    @app.get("/tile")
    def archive_file(path: str) -> FileResponse:
        real = _archive_file(root, path, indexed_paths())
        suffix = Path(real).suffix.lower()
        if suffix in INLINE_TYPES:
            return FileResponse(real, media_type=INLINE_TYPES[suffix])
        return FileResponse(real, media_type="application/octet-stream", filename=os.path.basename(real))

    return app


class PortInUseError(OSError):
    """The port asked for is taken by another process."""


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), so a taken port is reported before
    the model is loaded.

    Raises:
        PortInUseError: naming the port, when another process listens there.
        OSError: naming host and port, when the address cannot be used.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    # Lets a restarted server reuse a port left in TIME_WAIT; on Linux it does not let two servers
    # listen on the same port, so a running one is still detected.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(f"--port {port}: {host}:{port} is already in use by another program; choose "
                                 "another port with --port (--port 0 picks a free one)") from None
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """The http:// URL a browser on this machine opens for a socket from `bind`."""
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1" if sock.family == socket.AF_INET else "::1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(app: FastAPI, sock: socket.socket, access_log: bool = False) -> None:
    """Runs `app` on the bound socket until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
