"""`rsclip serve`'s web app (rsclip_jax/apps/serve.py) through FastAPI's TestClient, over a real index
built by `rsclip index build` on the bundled sample tiles with the tiny checkpoint: the search JSON,
thumbnails and tiles, GeoJSON/CSV downloads, archive files by path, and the 4xx answers to path
traversal, oversized and non-image uploads, after which the app keeps serving. The page itself runs
in a real browser in tests/test_serve_browser.py."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import TILES
from rsclip_jax.apps.search import Searcher
from rsclip_jax.apps.serve import STATIC_DIR, bind, create_app, is_loopback, url_of
from rsclip_jax.cli import main

ARCHIVE_SUFFIXES = (".png", ".jpg", ".tif")


def build_archive_index(tmp_path: Path, checkpoint: Path) -> tuple[Path, Path]:
    """A small archive (copies of the real sample tiles, a text file, a symlink pointing out of it) and its index,
    built with `rsclip index build`. Shared with tests/test_serve_browser.py."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in sorted(TILES.iterdir()):
        if path.suffix in ARCHIVE_SUFFIXES:
            shutil.copy(path, archive / path.name)
    (archive / "notes.txt").write_text("inside the archive, but not an indexed file\n")
    (tmp_path / "secret.txt").write_text("outside the archive\n")
    os.symlink(tmp_path / "secret.txt", archive / "secret.txt")
    index = tmp_path / "index"
    assert main(["index", "build", "--checkpoint", str(checkpoint), "--out", str(index), str(archive)]) == 0
    return archive, index


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict:
    tmp = tmp_path_factory.mktemp("serve")
    archive, index = build_archive_index(tmp, tiny_checkpoint)
    searcher = Searcher(str(index), checkpoint=str(tiny_checkpoint))
    return {"archive": archive, "index": index, "searcher": searcher, "tmp": tmp}


@pytest.fixture(scope="module")
def client(built: dict) -> TestClient:
    return TestClient(create_app(built["searcher"], max_upload_bytes=200_000))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _search_works(client: TestClient) -> None:
    response = client.post("/api/search", data={"text": "a forest", "k": "3"})
    assert response.status_code == 200, response.text
    assert len(response.json()["hits"]) == 3


def test_page_and_assets_come_from_the_package_only(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="text"', 'id="image"', 'id="results"', 'id="map"', 'id="download-geojson"'):
        assert element in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    # No CDN, no web fonts: nothing the page references lives on another host (the SVG namespace URI
    # is a name, never fetched).
    for path in STATIC_DIR.iterdir():
        external = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", path.read_text()))
        assert external <= {"http://www.w3.org/2000/svg"}, (path.name, external)


def test_info_counts_the_archive(client, built):
    info = client.get("/api/info").json()
    assert info["count"] == len(built["searcher"]) > 3
    assert info["root"] == os.path.realpath(built["searcher"].root)
    assert info["max_upload_bytes"] == 200_000


def test_text_search_returns_the_searchers_ranking_with_links(client, built):
    response = client.post("/api/search", data={"text": "trees seen from above", "k": "5"})
    assert response.status_code == 200, response.text
    result = response.json()
    direct = built["searcher"].search(text="trees seen from above", k=5)
    assert [h["id"] for h in result["hits"]] == [h.id for h in direct]
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in result["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx([h.score for h in direct], abs=1e-6)
    for hit in result["hits"]:
        assert hit["thumb"] == f"/api/thumb/{hit['id']}" and hit["tile"] == f"/api/tile/{hit['id']}"
        assert (Path(os.path.realpath(built["searcher"].root)) / hit["relpath"]).is_file()
    # The GET form (no uploads) gives the same hits.
    again = client.get("/api/search", params={"text": "trees seen from above", "k": 5}).json()
    assert [h["id"] for h in again["hits"]] == [h["id"] for h in result["hits"]]


def test_image_upload_finds_that_image_first(client, built):
    name = "deepforest_SOAP_031.png"
    with Image.open(built["archive"] / name) as im:
        small = im.convert("RGB").resize((200, 200))  # under the test app's 200 kB bound
    response = client.post("/api/search", files={"image": (name, _png(small), "image/png")}, data={"k": "3"})
    assert response.status_code == 200, response.text
    hits = response.json()["hits"]
    assert Path(hits[0]["path"]).name == name
    assert name in response.json()["described"]


def test_more_like_this_ranks_the_hit_itself_first(client):
    first = client.get("/api/search", params={"text": "a river", "k": 3}).json()["hits"]
    target = first[2]["id"]
    similar = client.post("/api/search", data={"similar_to": str(target), "k": "4"}).json()
    assert similar["hits"][0]["id"] == target
    assert similar["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_thumbnails_and_full_tiles_are_images(client, built):
    searcher = built["searcher"]
    for id in range(len(searcher)):
        response = client.get(f"/api/thumb/{id}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.content))
        full = searcher.tile(id)
        assert thumb.format == "JPEG" and max(thumb.size) == min(256, max(full.size))
    small = Image.open(io.BytesIO(client.get("/api/thumb/0", params={"size": 64}).content))
    assert max(small.size) == 64
    response = client.get("/api/tile/1")
    assert response.headers["content-type"] == "image/png"
    served = Image.open(io.BytesIO(response.content))
    assert served.tobytes() == searcher.tile(1).convert("RGB").tobytes()  # lossless, full size


def test_geojson_and_csv_downloads_hold_the_hits(client):
    result = client.post("/api/search", data={"text": "buildings", "k": "4"}).json()
    geojson = client.get(result["downloads"]["geojson"])
    assert geojson.status_code == 200 and "attachment" in geojson.headers["content-disposition"]
    collection = json.loads(geojson.content)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 4
    assert [f["properties"]["id"] for f in collection["features"]] == [h["id"] for h in result["hits"]]
    table = client.get(result["downloads"]["csv"])
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [int(r["id"]) for r in rows] == [h["id"] for h in result["hits"]]
    assert client.get("/api/download/0123456789abcdef").status_code == 404


def test_archive_files_only_inside_the_root(client, built):
    name = "deepforest_OSBS_029.png"
    response = client.get("/tile", params={"path": name})
    assert response.status_code == 200 and response.content == (built["archive"] / name).read_bytes()
    outside = ["../../etc/passwd", "/etc/passwd", "../secret.txt", "secret.txt",  # the last: a symlink out
               f"{name}/../../{built['archive'].name}/../secret.txt", "%2e%2e/%2e%2e/etc/passwd"]
    for path in outside:
        response = client.get("/tile", params={"path": path})
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert "outside the archive" in response.json()["detail"] or response.status_code == 404, path
    # Inside the root but not indexed: refused too (the root is the inputs' common folder, maybe wide).
    response = client.get("/tile", params={"path": "notes.txt"})
    assert response.status_code == 403 and "not a file of this index" in response.json()["detail"]
    # The acceptance request exactly as a browser sends it (the query string unencoded).
    assert client.get("/tile?path=../../etc/passwd").status_code == 403
    assert client.get("/tile", params={"path": "no_such_file.png"}).status_code == 404
    _search_works(client)


def test_oversized_upload_is_refused_and_the_app_keeps_serving(client, built):
    with Image.open(built["archive"] / "deepforest_pelicans_drone.jpg") as im:
        big = _png(im.convert("RGB"))  # a real image over the 200 kB bound
    assert len(big) > 200_000
    response = client.post("/api/search", files={"image": ("drone.png", big, "image/png")})
    assert response.status_code == 413 and "upload limit" in response.json()["detail"]
    # A body past the bound plus the form slack is refused from its Content-Length, unread.
    response = client.post("/api/search", files={"image": ("huge.png", b"\0" * 1_400_000, "image/png")})
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]
    _search_works(client)


def test_non_image_upload_is_refused_with_a_message_and_the_app_keeps_serving(client, built):
    response = client.post("/api/search", files={"image": ("notes.txt", b"not an image at all", "text/plain")})
    assert response.status_code == 415
    assert "notes.txt" in response.json()["detail"] and "not an image" in response.json()["detail"]
    truncated = (built["archive"] / "deepforest_OSBS_029.png").read_bytes()[:5000]
    response = client.post("/api/search", files={"image": ("cut.png", truncated, "image/png")})
    assert response.status_code in (400, 415) and "cut.png" in response.json()["detail"]
    _search_works(client)


def test_bad_queries_get_clear_4xx(client, built):
    n = len(built["searcher"])
    assert "give a text" in client.post("/api/search", data={}).json()["detail"]
    assert client.post("/api/search", data={"text": "x", "k": "0"}).status_code == 422
    assert client.get(f"/api/thumb/{n}").status_code == 404
    assert client.get("/api/tile/-1").status_code == 404
    response = client.post("/api/search", data={"similar_to": str(n)})
    assert response.status_code == 404 and f"no item {n}" in response.json()["detail"]
    _search_works(client)


def test_loopback_server_answers_only_loopback_host_names(built):
    app = create_app(built["searcher"], allowed_hosts=("127.0.0.1", "localhost", "::1"))
    assert TestClient(app, base_url="http://localhost:8080").get("/api/info").status_code == 200
    assert TestClient(app, base_url="http://[::1]:8080").get("/api/info").status_code == 200
    refused = TestClient(app, base_url="http://attacker.example").get("/api/info")
    assert refused.status_code == 400 and "loopback" in refused.json()["detail"]


def test_bind_reports_a_taken_port_before_loading_the_model(built, capsys):
    sock = bind("127.0.0.1", 0)
    try:
        assert url_of(sock).startswith("http://127.0.0.1:")
        port = sock.getsockname()[1]
        # The index and a checkpoint that does not exist: the port error comes first.
        code = main(["serve", str(built["index"]), "--port", str(port), "--checkpoint", "missing.safetensors"])
    finally:
        sock.close()
    assert code == 1
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in capsys.readouterr().err


def test_bad_flags_and_host_names(built, capsys):
    with pytest.raises(SystemExit):
        main(["serve", str(built["index"]), "--port", "70000"])
    assert "--port: must be a port number 0..65535 (0: any free port), got 70000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(built["index"]), "--max-upload-mb", "0"])
    assert "--max-upload-mb: must be a size in MB above 0, got 0" in capsys.readouterr().err
    assert main(["serve", str(built["index"]), "--host", "no-such-host.invalid", "--port", "0"]) == 1
    assert "--host no-such-host.invalid" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    if socket.has_ipv6:
        try:
            sock = bind("::1", 0)
        except OSError:
            return  # no IPv6 loopback in this container
        try:
            assert url_of(sock).startswith("http://[::1]:")
        finally:
            sock.close()
