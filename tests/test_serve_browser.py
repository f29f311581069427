"""`rsclip serve` in a real browser: the command runs as a subprocess on a free local port and headless
Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) types a query, sees the result
thumbnails load, opens a full tile, asks for "more like this", downloads the hits as GeoJSON, searches
by an uploaded image, and takes screenshots (kept as test artifacts: under the test's tmp_path, and
copied to $RSCLIP_TEST_ARTIFACTS when set). The same server then gets a path-traversal request and an
oversized upload over plain HTTP: 4xx answers, and it keeps serving.

Without the browser the test skips naming what is missing, except when $CI is set: this repository's
CI (.ci/run installs both packages) must run it, so there a missing browser fails.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from test_serve import build_archive_index

# Debian's paths; another install on PATH works too.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUERY = "trees seen from above"
WAIT_S = 30  # for one page event (a search on a cold server compiles the text tower first)


def _require_browser() -> None:
    """Skips (or, under $CI, fails) naming the missing browser pieces."""
    missing = [what for what, path in ((f"chromium ({CHROMIUM})", CHROMIUM),
                                       (f"chromedriver ({CHROMEDRIVER}, Debian package chromium-driver)", CHROMEDRIVER))
               if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401 -- only to report it missing; the test imports its parts below
    except ImportError:
        missing.append("the selenium Python package (requirements-test.txt)")
    if missing:
        message = (f"browser test needs {' and '.join(missing)}; install with "
                   "`apt-get install chromium chromium-driver` (.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI is set, so a missing browser is a failure, not a skip")
        pytest.skip(message)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


@pytest.fixture
def server(tmp_path: Path, tiny_checkpoint: Path):
    """`python -m rsclip_jax serve INDEX --port 0` running; yields its URL, then stops it and checks it ended."""
    archive, index = build_archive_index(tmp_path, tiny_checkpoint)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # A session of its own: teardown signals the whole group, so nothing it started survives.
        proc = subprocess.Popen([sys.executable, "-m", "rsclip_jax", "serve", str(index), "--port", "0",
                                 "--checkpoint", str(tiny_checkpoint)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            text = log_path.read_text()
            url = next((w for line in text.splitlines() if line.startswith("rsclip serve:")
                        for w in line.split() if w.startswith("http://")), None)
            if proc.poll() is not None:
                pytest.fail(f"rsclip serve exited with {proc.returncode} before serving:\n{text}")
            if time.monotonic() > deadline:
                pytest.fail(f"rsclip serve printed no URL in 120 s:\n{text}")
            time.sleep(0.2)
        assert url.startswith("http://127.0.0.1:"), url  # the default host is loopback
        yield {"url": url, "archive": archive, "log": log_path}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # uvicorn's clean shutdown
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
    assert proc.returncode is not None


@pytest.fixture
def browser(tmp_path: Path):
    _require_browser()
    from selenium import webdriver  # selenium is a test dependency, imported once the browser is known to exist
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1400,1000", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False,
                                              "download.directory_upgrade": True})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.downloads = downloads
        yield driver
    finally:
        driver.quit()


def _save_artifact(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), f"screenshot {name} not written"
    if os.environ.get("RSCLIP_TEST_ARTIFACTS"):
        target = Path(os.environ["RSCLIP_TEST_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait  # see the browser fixture

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=f"waited {timeout} s for {what}")


def _loaded_thumbs(driver, first: int) -> bool:
    """The first `first` thumbnails, and every other one in view (the rest load lazily), are decoded images."""
    return driver.execute_script(
        "const imgs = Array.from(document.querySelectorAll('#results .hit img.thumb'));"
        "const shown = imgs.filter((i, n) => n < arguments[0] || i.getBoundingClientRect().top < innerHeight);"
        "return imgs.length >= arguments[0] && shown.every(i => i.complete && i.naturalWidth > 0);", first)


def test_search_page_in_headless_chromium(browser, server, tmp_path):
    from selenium.webdriver.common.by import By  # see the browser fixture
    from selenium.webdriver.common.keys import Keys

    url = server["url"]
    info = _get_json(url + "api/info")
    expected = _get_json(url + "api/search?" + urllib.parse.urlencode({"text": QUERY}))["hits"]
    assert len(expected) == info["count"] > 3  # k=50 asks for more than the archive holds

    browser.get(url)
    _wait(browser, lambda d: f"{info['count']} items" in d.find_element(By.ID, "info").text, "the index info")

    # Type a query and submit it with Enter, as a user does.
    box = browser.find_element(By.ID, "text")
    box.send_keys(QUERY, Keys.ENTER)
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == len(expected), "result cards")
    first = min(4, len(expected))
    _wait(browser, lambda d: _loaded_thumbs(d, first), f"the first {first} thumbnails to load")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    # Same ranking as the API, with scores and paths shown on each card.
    assert [int(c.get_attribute("data-id")) for c in cards] == [h["id"] for h in expected]
    assert f"{expected[0]['score']:.4f}" in cards[0].text and expected[0]["relpath"] in cards[0].text
    assert f"{len(expected)} hits" in browser.find_element(By.ID, "status").text
    # Footprints on the map: one polygon per georeferenced hit.
    with_footprint = sum(1 for h in expected if h["footprint_lonlat"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#map polygon.footprint")) == with_footprint
    _save_artifact(browser, tmp_path, "serve_results.png")

    # Click a result: the full tile opens at its own resolution.
    cards[1].find_element(By.CSS_SELECTOR, "img.thumb").click()
    _wait(browser, lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is not None, "the tile viewer")
    _wait(browser, lambda d: d.execute_script("const i = document.getElementById('viewer-img');"
                                              "return i.complete && i.naturalWidth > 0;"), "the full tile")
    shown = browser.execute_script("const i = document.getElementById('viewer-img');"
                                   "return [i.naturalWidth, i.naturalHeight, new URL(i.src).pathname];")
    assert shown[2] == f"/api/tile/{expected[1]['id']}"
    with urllib.request.urlopen(url + shown[2].lstrip("/"), timeout=60) as response:
        tile = Image.open(io.BytesIO(response.read()))
    assert tuple(shown[:2]) == tile.size and min(tile.size) > 64  # the full tile, not the 256-px thumbnail's
    _save_artifact(browser, tmp_path, "serve_tile.png")

    # "More like this" from the viewer: the hit itself ranks first among its neighbours.
    browser.find_element(By.ID, "viewer-similar").click()
    _wait(browser, lambda d: re.match(rf"\d+ hits for more like #{expected[1]['id']}\b",
                                      d.find_element(By.ID, "status").text), "the more-like-this results")
    first_card = browser.find_elements(By.CSS_SELECTOR, "#results .hit")[0]
    assert int(first_card.get_attribute("data-id")) == expected[1]["id"]
    similar_ids = [int(c.get_attribute("data-id")) for c in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]

    # Download the current hits as GeoJSON through the page's link.
    browser.find_element(By.ID, "download-geojson").click()
    target = browser.downloads / "rsclip_hits.geojson"
    _wait(browser, lambda d: target.exists() and not list(browser.downloads.glob("*.crdownload")),
          "the GeoJSON download")
    collection = json.loads(target.read_text())
    assert collection["type"] == "FeatureCollection"
    assert [f["properties"]["id"] for f in collection["features"]] == similar_ids
    _save_artifact(browser, tmp_path, "serve_more_like_this.png")

    # Search by an uploaded image through the page's file input: that image comes first.
    name = "deepforest_SOAP_031.png"
    browser.find_element(By.ID, "text").clear()
    browser.find_element(By.ID, "image").send_keys(str(server["archive"] / name))
    browser.find_element(By.ID, "search-button").click()
    _wait(browser, lambda d: re.match(rf"\d+ hits for image {re.escape(name)}", d.find_element(By.ID, "status").text),
          "the image search's results")
    top = browser.find_elements(By.CSS_SELECTOR, "#results .hit")[0]
    assert name in top.find_element(By.CSS_SELECTOR, ".path").text

    # The real server (uvicorn) refuses traversal and an oversized upload, and keeps serving.
    host, port = urllib.parse.urlparse(url).hostname, urllib.parse.urlparse(url).port
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", "/tile?path=../../etc/passwd")
    assert connection.getresponse().status == 403
    connection.close()
    connection = http.client.HTTPConnection(host, port, timeout=60)
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
    connection.request("POST", "/api/search", body=part + b"\0" * (22 * 2**20) + b"\r\n--b--\r\n",
                       headers={"Content-Type": "multipart/form-data; boundary=b"})
    response = connection.getresponse()
    assert response.status == 413 and b"--max-upload-mb" in response.read()
    connection.close()
    assert _get_json(url + "api/info")["count"] == info["count"]

    # The page ran without a script error or a refused resource (the CSP allows only this origin).
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
