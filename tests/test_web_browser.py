"""The web page end to end in headless Chromium: `clipsearch serve` started as a person would, a query typed, thumbnails
seen loading, a result opened, "more like this", a folder filter, and an uploaded image's captions and similar photos.

Playwright's Python package drives Debian's Chromium (/usr/bin/chromium); `playwright install` is never needed. The
results page is saved as tests/artifacts/results.png for a person to look at.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

import clipsearch
from conftest import REPO, TINY_MODEL, shared
from test_server_api import LINKED_CAPTION, PORTRAIT, write_captions

CHROMIUM = os.environ.get("CLIPSEARCH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
START_TIMEOUT = 120
DROPPED = "exif-samples/exif-org/kodak-dc240.jpg"  # 640x480, EXIF orientation 1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra) for the "
                                                                 "browser tests")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does) for the browser tests")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_checkpoint):
    """The shared photos indexed with the tiny model and captions imported, served by `clipsearch serve --port 0`."""
    photos = shared("photos")
    work = tmp_path_factory.mktemp("browser")
    with clipsearch.open(work / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=1)
        idx.add_captions(write_captions(work / "captions.jsonl", photos), collection="mixed")
        portrait = idx.store.row_by_path(str(photos / PORTRAIT))["id"]
    env = {**os.environ, "CLIPSEARCH_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "clipsearch", "serve", "--index", str(work / "idx"), "--port",
                                "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url = _wait_for_url(lines, process)
        yield url, photos, portrait
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


def _wait_for_url(lines: queue.Queue, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"serving (http://127\.0\.0\.1:\d+/)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"clipsearch serve did not start: {''.join(seen)[-2000:]}")


def until(page, script: str, timeout: float = 60.0) -> None:
    """Poll a JS expression (the page's CSP forbids Playwright's eval-based wait_for_function, as it should)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        assert time.monotonic() < deadline, f"timed out waiting for: {script}"
        time.sleep(0.1)


THUMBS_LOADED = """n => { const imgs = Array.from(document.querySelectorAll('#grid .card img')).slice(0, n);
                         return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }"""


def thumbs_loaded(page, n: int) -> bool:
    return page.evaluate(f"({THUMBS_LOADED})({n})")


def wait_thumbs(page, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not thumbs_loaded(page, n):
        assert time.monotonic() < deadline, f"the first {n} thumbnails did not load"
        time.sleep(0.1)


def grid(page) -> list[dict]:
    return page.evaluate("""Array.from(document.querySelectorAll('#grid .card')).map(c => ({
        id: Number(c.dataset.id), path: c.querySelector('button').title,
        score: Number(c.querySelector('.score').textContent)}))""")


def test_search_open_more_like_this_filter_and_upload(browser, site):
    url, photos, portrait = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(url)
        until(page, "document.getElementById('status').textContent.includes('photos')")
        assert "101 captions" in page.text_content("#status")

        # type a query: a grid of thumbnails, best first, with scores
        page.fill("#q", "kids playing on a beach at sunset")
        page.press("#q", "Enter")
        wait_thumbs(page, 12)
        results = grid(page)
        assert len(results) == 48 and page.is_visible("#more")
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        assert "q=kids+playing" in page.url or "q=kids%20playing" in page.url
        ARTIFACTS.mkdir(exist_ok=True)
        wait_thumbs(page, 24)  # every card in view (4 rows of 6), so the screenshot shows no blank cards
        page.screenshot(path=str(ARTIFACTS / "results.png"))
        page.reload()  # the query lives in the URL: a reload (or a bookmark) shows the same results
        until(page, "document.querySelectorAll('#grid .card').length === 48")
        assert page.input_value("#q") == "kids playing on a beach at sunset" and grid(page) == results
        page.click("#more")
        until(page, "document.querySelectorAll('#grid .card').length > 48")

        # open a result: large image, metadata, nearest captions
        first = results[0]
        page.click("#grid .card button")
        until(page, "document.getElementById('detail').open")
        until(page, "(i => i.complete && i.naturalWidth > 0)(document.getElementById('detail-image'))")
        meta = page.text_content("#detail-meta")
        assert first["path"] in meta and f"#{first['id']}" in meta
        until(page, "document.querySelectorAll('#detail-nearest li').length === 5")
        page.screenshot(path=str(ARTIFACTS / "detail.png"))

        # more like this
        page.click("#more-like-this")
        until(page, f"document.getElementById('status').textContent.includes('like #{first['id']}')")
        wait_thumbs(page, 6)
        similar = grid(page)
        assert len(similar) == 48 and first["id"] not in [r["id"] for r in similar]
        assert page.input_value("#q") == f"#{first['id']}"
        assert not page.evaluate("document.getElementById('detail').open")

        # a folder filter narrows the same search
        folder = photos / "exif-samples"
        page.click("#toggle-filters")
        page.fill("#f-under", str(folder))
        page.dispatch_event("#f-under", "change")
        until(page, f"Array.from(document.querySelectorAll('#grid .card button')).every(b => "
                    f"b.title.startsWith({json.dumps(str(folder) + '/')})) && "
                    f"document.querySelectorAll('#grid .card').length > 0")
        page.click("#clear-filters")

        # upload an image: its nearest captions and similar photos (itself first)
        page.set_input_files("#upload", str(photos / PORTRAIT))
        until(page, "!document.getElementById('upload-panel').hidden")
        until(page, "document.querySelectorAll('#upload-captions li').length === 10")
        wait_thumbs(page, 6)
        top = grid(page)[:2]  # the photo itself, and portrait.jpg: the same picture stored upright
        assert portrait in [r["id"] for r in top] and min(r["score"] for r in top) > 0.999
        page.screenshot(path=str(ARTIFACTS / "upload.png"))

        # the uploaded photo's own page: EXIF-rotated preview and the caption linked to it
        page.click(f'#grid .card[data-id="{portrait}"] button')
        until(page, "(i => i.complete && i.naturalWidth === 840)(document.getElementById('detail-image'))")
        assert str(photos / PORTRAIT) in page.text_content("#detail-meta")
        assert page.text_content("#detail-linked").startswith(LINKED_CAPTION)
        page.click("#detail .close")
        until(page, "!document.getElementById('detail').open")

        # "not this" on a photo like the upload: the uploaded image minus that photo, run again
        third = grid(page)[2]
        name = json.dumps(os.path.basename(third["path"]))
        page.click(f'#grid .card[data-id="{third["id"]}"] button')
        until(page, f"document.getElementById('detail').open && "
                    f"document.getElementById('detail-name').textContent === {name}")
        page.click("#not-this")
        assert page.input_value("#f-not") == f"#{third['id']}"
        until(page, f"!document.querySelector('#grid .card[data-id=\"{third['id']}\"]') && "
                    f"document.querySelectorAll('#grid .card').length === 48")
        assert not page.evaluate("document.getElementById('status').classList.contains('error')")
        assert not page.is_hidden("#upload-panel")

        # drop an image on the page: the same as uploading it (filters cleared first: no "not" part now)
        page.click("#clear-filters")
        dropped = photos / DROPPED
        transfer = page.evaluate_handle(
            """([data, name]) => { const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
                                   const transfer = new DataTransfer();
                                   transfer.items.add(new File([bytes], name, { type: 'image/jpeg' }));
                                   return transfer; }""",
            [base64.b64encode(dropped.read_bytes()).decode(), dropped.name])
        page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
        assert page.is_visible("#drop-hint")
        page.dispatch_event("main", "drop", {"dataTransfer": transfer})
        assert page.is_hidden("#drop-hint")
        until(page, f"document.getElementById('status').textContent.includes('like {dropped.name}')")
        best = grid(page)[0]
        assert best["path"] == str(dropped) and best["score"] > 0.999
        assert page.get_attribute("#upload-preview", "src").startswith("blob:")

        # a bad query is one clear line, not a broken page
        page.fill("#q", "holiday.jpg")
        page.press("#q", "Enter")
        until(page, "document.getElementById('status').classList.contains('error')")
        assert "not file paths" in page.text_content("#status")
    finally:
        page.close()
    assert not [p for p in problems if "400" not in p], problems  # only the refused query may log an error
