"""The JSON API of `clipsearch serve`, over a real HTTP socket: every endpoint, its bad requests, and its safety rules
(files only by indexed id, no file paths in queries, folder filters kept to indexed folders, capped uploads that never
land in a photo folder, loopback Host names only), plus thumbnail caching and EXIF rotation."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

import clipsearch
from clipsearch import server as server_room
from clipsearch.cli import cli
from clipsearch.errors import BadInput
from conftest import TINY_MODEL, shared

PORTRAIT = "immich-test-assets/metadata/faces/portrait-orientation-6.jpg"  # stored 700x840, EXIF orientation 6
LINKED_CAPTION = "two scientists in a laboratory"


class Client:
    """Raw HTTP/1.1 requests: the path goes on the wire exactly as written (no client-side '..' clean-up)."""

    def __init__(self, url: str) -> None:
        self.host, port = url.split("//")[1].rstrip("/").split(":")
        self.port = int(port)

    def request(self, path: str, method: str = "GET", body=None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {},
                         encode_chunked=body is not None and not isinstance(body, (bytes, str)))
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, path: str, expect: int = 200, **kwargs):
        status, headers, body = self.request(path, **kwargs)
        assert status == expect, (path, status, body[:300])
        assert headers["content-type"].startswith("application/json")
        return json.loads(body)

    def error(self, path: str, expect: int, **kwargs) -> str:
        data = self.json(path, expect, **kwargs)
        assert set(data) == {"error"} and data["error"] and "\n" not in data["error"], data
        return data["error"]


def write_captions(path: Path, photos: Path) -> Path:
    """A small collection: 20 Flickr8k rows (linked to images that are not indexed) and one caption linked to an
    indexed photo."""
    flickr = shared("flickr8k-test1k")
    lines = (flickr / "captions.jsonl").read_text().splitlines()[:20]
    rows = [{**json.loads(line), "image": str(flickr / json.loads(line)["image"])} for line in lines]
    rows.append({"image": str(photos / PORTRAIT), "caption": LINKED_CAPTION})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """The shared photos indexed with the tiny model, a caption collection imported, and a server on a free port."""
    photos = shared("photos")
    work = tmp_path_factory.mktemp("web")
    with clipsearch.open(work / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=1)
        idx.add_captions(write_captions(work / "captions.jsonl", photos), collection="mixed")
    idx = clipsearch.open(work / "idx", create=False)
    web = server_room.WebServer(idx, "127.0.0.1", 0).start()
    try:
        yield Client(web.url), idx, photos
    finally:
        web.stop()
        idx.close()


def image_id(idx, path: Path) -> int:
    return idx.store.row_by_path(str(path))["id"]


# ------------------------------------------------------------------------------------------------------ page + docs
def test_page_static_files_and_openapi_schema(served):
    client, _, _ = served
    status, headers, body = client.request("/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'src="/app.js"' in body
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    assert client.request("/?q=a+dog")[2] == body  # the page keeps its query in the URL
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = client.request(path)
        assert status == 200 and headers["content-type"].startswith(kind) and len(body) > 1000
    schema = client.json("/openapi.json")
    image = "/api/images/{image_id}"
    assert {"/api/search", image, f"{image}/similar", f"{image}/captions", f"{image}/thumbnail", f"{image}/preview",
            f"{image}/file", "/api/captions", "/api/collections", "/api/info", "/api/upload"} <= set(schema["paths"])
    assert "image/*" in schema["paths"]["/api/upload"]["post"]["requestBody"]["content"]
    assert client.request("/docs")[0] == 404  # Swagger UI would load from a CDN: not offered


def test_warm_up_builds_the_scan_copy_before_the_first_query(served, monkeypatch):
    """The server's warm-up builds what a long-lived process's searches use (here the flat index's 8-bit copy, made
    worth it for 146 photos by lowering the size it starts at), so no user query pays for it."""
    from clipsearch import vectors as vector_room

    _, idx, _ = served
    monkeypatch.setattr(vector_room, "_COPY_MIN", 100)
    monkeypatch.setattr(idx.vectors().engine, "_copy", None)
    web = server_room.WebServer(idx, "127.0.0.1", 0)
    try:
        web.warm_up()
    finally:
        web.socket.close()
    assert idx.vectors().engine._copy is not None


def test_info_and_collections(served):
    client, idx, photos = served
    info = client.json("/api/info")
    assert info["images"] == idx.store.counts()["images"] > 100 and info["model"] == TINY_MODEL
    assert info["roots"][0]["path"] == str(photos) and info["captions"] == 101
    assert info["limits"]["max_upload_bytes"] == server_room.MAX_UPLOAD_BYTES
    collections = client.json("/api/collections")
    assert [(c["collection"], c["captions"], c["linked"]) for c in collections] == [("mixed", 101, 1)]


# ---------------------------------------------------------------------------------------------------------- search
def test_text_search_pages_through_the_library_ranking(served):
    client, idx, _ = served
    first = client.json("/api/search?q=a+dog+on+a+beach&k=5")
    second = client.json("/api/search?q=a+dog+on+a+beach&k=5&offset=5")
    expected = idx.search("a dog on a beach", 10)
    assert [h["id"] for h in first["hits"] + second["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in first["hits"]] == [h.score for h in expected[:5]]
    assert first["more"] and second["offset"] == 5
    hit = first["hits"][0]
    assert hit["thumbnail"].startswith(f"/api/images/{hit['id']}/thumbnail?v=") and hit["file"].endswith("/file")
    assert hit["name"] == os.path.basename(hit["path"]) and hit["width"] and hit["format"] == "JPEG"


def test_mixed_queries_with_ids_and_not(served):
    client, idx, photos = served
    portrait = image_id(idx, photos / PORTRAIT)
    other = client.json("/api/search?q=a+dog&k=1")["hits"][0]["id"]
    hits = client.json(f"/api/search?q=%23{portrait}+%2B+2*%22people%22&not=%23{other}&k=10")["hits"]
    expected = idx.search(f'#{portrait} + 2*"people"', 10, not_=[f"#{other}"])
    assert [h["id"] for h in hits] == [h.id for h in expected] and portrait not in [h["id"] for h in hits]
    by_param = client.json(f"/api/search?image={portrait}&k=3")["hits"]
    assert [h["id"] for h in by_param] == [h.id for h in idx.similar(portrait, 3)]


def test_filters_apply_inside_the_search(served):
    client, idx, photos = served
    folder = photos / "exif-samples"
    hits = client.json(f"/api/search?q=sunset&k=50&under={folder}")["hits"]
    assert hits and all(h["path"].startswith(f"{folder}/") for h in hits)
    assert len(hits) == min(50, len(idx.search("sunset", 500, under=str(folder))))
    dated = client.json("/api/search?q=sunset&k=50&after=2005&before=2010-06")["hits"]
    assert dated and all("2005-01-01" <= (h["taken"] or h["modified"]) <= "2010-06-30T23:59:59" for h in dated)
    assert client.json("/api/search?q=sunset&type=png")["hits"] == []
    assert len(client.json("/api/search?q=sunset&type=jpg,png&k=7")["hits"]) == 7
    scored = client.json("/api/search?q=sunset&k=50&threshold=0.05")["hits"]
    assert all(h["score"] >= 0.05 for h in scored) and len(scored) < 50


def test_queries_cannot_name_files(served):
    client, _, photos = served
    for query in ("beach.jpg", "dog+%2B+%2Fetc%2Fpasswd.png", f"{photos}/{PORTRAIT}".replace(" ", "%20"),
                  "2*%22dog%22+-+..%2F..%2Fsecret.jpeg"):
        assert "not file paths" in client.error(f"/api/search?q={query}", 400)
    assert "not file paths" in client.error("/api/search?q=dog&not=cat.jpg", 400)
    assert "not file paths" in client.error("/api/captions?q=x.png", 400)
    client.error("/api/search?image=beach.jpg", 400)


@pytest.mark.parametrize("query", [
    "q=dog&k=0", "q=dog&k=abc", f"q=dog&k={server_room.MAX_PAGE + 1}", "q=dog&offset=-1",
    f"q=dog&k=100&offset={server_room.MAX_RESULTS - 50}", "q=dog&threshold=2", "q=dog&threshold=nan",
    "q=dog&after=2019-13", "q=dog&after=2020&before=2019", "q=dog&type=exe", "q=dog&under=/etc",
    "q=dog&under=relative/folder", "q=dog&under=%2Fwork%2Fshared%2Fdata%2Fphotos%2F..%2F..", "q=dog&under=%00",
    "q=", "q=-+dog", "q=2*", "q=%23999999999", "q=dog&path=/etc/passwd", "q=dog&treshold=0.2",
])
def test_bad_search_parameters_are_400(served, query):
    client, _, _ = served
    client.error(f"/api/search?{query}", 400)


def test_captions_search(served):
    client, idx, _ = served
    result = client.json("/api/captions?q=children+playing&k=3")
    assert result["available"] and [h["id"] for h in result["hits"]] == \
        [h.id for h in idx.search_captions("children playing", 3)]
    assert client.json("/api/captions?q=dog&collection=mixed&k=2")["hits"]
    assert "no caption collection" in client.error("/api/captions?q=dog&collection=nope", 400)
    client.error("/api/captions?q=dog&k=0", 400)


# ---------------------------------------------------------------------------------------------------------- images
def test_image_detail_similar_and_nearest_captions(served):
    client, idx, photos = served
    portrait = image_id(idx, photos / PORTRAIT)
    detail = client.json(f"/api/images/{portrait}")
    assert detail["path"] == str(photos / PORTRAIT) and (detail["width"], detail["height"]) == (840, 700)
    assert [c["text"] for c in detail["captions"]] == [LINKED_CAPTION]
    similar = client.json(f"/api/images/{portrait}/similar?k=5")["hits"]
    assert [h["id"] for h in similar] == [h.id for h in idx.similar(portrait, 5)] and portrait not in \
        [h["id"] for h in similar]
    folder = photos / "immich-test-assets"
    assert all(h["path"].startswith(f"{folder}/") for h in
               client.json(f"/api/images/{portrait}/similar?k=5&under={folder}")["hits"])
    nearest = client.json(f"/api/images/{portrait}/captions?k=4")
    assert nearest["available"] and [h["id"] for h in nearest["hits"]] == \
        [h.id for h in idx.search_captions("", 4, image=portrait)]


@pytest.mark.parametrize("suffix", ["", "/similar", "/captions", "/thumbnail", "/preview", "/file"])
@pytest.mark.parametrize("bad_id", ["999999", "0", "-1", "99999999999999999999999"])
def test_unknown_ids_are_404(served, suffix, bad_id):
    client, _, _ = served
    assert "no indexed image has id" in client.error(f"/api/images/{bad_id}{suffix}", 404)


def test_non_numeric_ids_are_400(served):
    client, _, _ = served
    assert "image_id" in client.error("/api/images/abc/thumbnail", 400)


@pytest.mark.parametrize("path", [
    "/api/images/../../etc/passwd", "/api/images/%2e%2e/%2e%2e/etc/passwd", "/api/images/..%2F..%2Fetc%2Fpasswd/file",
    "/api/images/1/file/../../../../etc/passwd", "/api/images/1/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/app.js/../../../../etc/passwd", "/static/../etc/passwd",
    "/api/images/1/file?path=/etc/passwd", "/api/images/1/thumbnail?path=../../../etc/passwd",
    "/api/images/1?file=/etc/passwd", "/api/images/%2Fetc%2Fpasswd/file", "/etc/passwd", "/api/files/etc/passwd",
])
def test_path_traversal_never_reaches_a_file(served, path):
    client, _, _ = served
    status, headers, body = client.request(path)
    assert status in (400, 404), (path, status)
    assert b"root:" not in body and headers["content-type"].startswith("application/json")


def test_only_loopback_host_names_are_answered(served):
    client, _, _ = served
    assert "only requests addressed to this machine" in client.error("/api/info", 400,
                                                                     headers={"Host": "rebind.example:8765"})
    for host in ("localhost:1", "127.0.0.1", "[::1]:8765"):
        assert client.request("/api/info", headers={"Host": host})[0] == 200


def test_original_file_is_served_by_id(served):
    client, idx, photos = served
    portrait = image_id(idx, photos / PORTRAIT)
    status, headers, body = client.request(f"/api/images/{portrait}/file")
    assert status == 200 and body == (photos / PORTRAIT).read_bytes()
    assert headers["content-type"] == "image/jpeg" and "portrait-orientation-6.jpg" in headers["content-disposition"]


# ------------------------------------------------------------------------------------------------------ thumbnails
def test_thumbnail_caching_headers_and_304(served):
    client, idx, _ = served
    hit = client.json("/api/search?q=a+tree&k=1")["hits"][0]
    status, headers, body = client.request(hit["thumbnail"])
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
    assert headers["cache-control"] == "private, max-age=31536000, immutable" and headers["etag"].startswith('"')
    cached = list((idx.path / server_room.THUMBNAILS_DIR).rglob(f"{hit['id']}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == body  # next to the index, inside its directory
    modified = cached[0].stat().st_mtime_ns
    status, again, body2 = client.request(f"/api/images/{hit['id']}/thumbnail")  # no version: must revalidate
    assert status == 200 and body2 == body and again["etag"] == headers["etag"] and "no-cache" in again["cache-control"]
    assert cached[0].stat().st_mtime_ns == modified  # served from the disk cache, not made again
    status, not_modified, empty = client.request(hit["thumbnail"], headers={"If-None-Match": headers["etag"]})
    assert status == 304 and empty == b"" and not_modified["etag"] == headers["etag"]
    assert client.request(hit["thumbnail"], headers={"If-None-Match": 'W/"other", ' + headers["etag"]})[0] == 304
    assert client.request(hit["thumbnail"], headers={"If-None-Match": '"other"'})[0] == 200
    stale = client.request(f"/api/images/{hit['id']}/thumbnail?v=0123456789abcdef")
    assert stale[0] == 200 and "no-cache" in stale[1]["cache-control"]


def test_thumbnails_and_previews_are_exif_rotated(served):
    client, idx, photos = served
    portrait = image_id(idx, photos / PORTRAIT)
    raw = Image.open(photos / PORTRAIT)
    assert raw.size == (700, 840) and raw.getexif()[274] == 6
    upright = ImageOps.exif_transpose(raw).convert("RGB")
    for kind, side in server_room.SIZES.items():
        status, _, body = client.request(f"/api/images/{portrait}/{kind}")
        made = Image.open(BytesIO(body))
        expected_size = (side, round(side * 700 / 840)) if side < 840 else (840, 700)
        assert status == 200 and made.size == expected_size, kind
        right = np.asarray(upright.resize(made.size), dtype=np.float32)
        wrong = np.asarray(raw.convert("RGB").resize(made.size), dtype=np.float32)  # not rotated, squashed
        got = np.asarray(made, dtype=np.float32)
        assert np.abs(got - right).mean() < 6 < np.abs(got - wrong).mean(), kind
    upright_twin = image_id(idx, photos / "immich-test-assets/metadata/faces/portrait.jpg")  # same picture, no EXIF
    twins = [np.asarray(Image.open(BytesIO(client.request(f"/api/images/{i}/thumbnail")[2])), dtype=np.float32)
             for i in (portrait, upright_twin)]
    assert twins[0].shape == twins[1].shape and np.abs(twins[0] - twins[1]).mean() < 3


def test_thumbnail_of_a_vanished_file(tmp_path, tiny_checkpoint):
    """A cached thumbnail outlives its file (an unplugged drive still shows its photos); an uncached one is a 404."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(shared("photos", PORTRAIT), photos / "a.jpg")
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=0)
        with server_room.WebServer(idx, "127.0.0.1", 0) as web:
            client = Client(web.url)
            only = image_id(idx, photos / "a.jpg")
            first = client.request(f"/api/images/{only}/thumbnail")
            (photos / "a.jpg").unlink()
            assert first[0] == 200 and client.request(f"/api/images/{only}/thumbnail")[2] == first[2]
            assert "image file not available" in client.error(f"/api/images/{only}/preview", 404)
            assert "is not there now" in client.error(f"/api/images/{only}/file", 404)


# ---------------------------------------------------------------------------------------------------------- upload
def upload_leftovers() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("clipsearch-upload-")}


def test_upload_finds_similar_images_and_captions(served):
    client, idx, photos = served
    before = sorted(p.name for p in photos.rglob("*"))
    leftovers = upload_leftovers()
    portrait = image_id(idx, photos / PORTRAIT)
    result = client.json("/api/upload?k=5&captions_k=3", method="POST", body=(photos / PORTRAIT).read_bytes(),
                         headers={"Content-Type": "image/jpeg"})
    assert (result["width"], result["height"]) == (840, 700)
    itself = next(h for h in result["similar"] if h["id"] == portrait)  # portrait.jpg, stored upright, ties with it
    assert itself["score"] > 0.999 and itself["score"] >= result["similar"][0]["score"] - 1e-4
    assert len(result["similar"]) == 5 and len(result["captions"]) == 3
    assert [c["id"] for c in result["captions"]] == [c.id for c in idx.search_captions("", 3, image=portrait)]
    filtered = client.json("/api/upload?k=5&type=png", method="POST", body=(photos / PORTRAIT).read_bytes())
    assert filtered["similar"] == []
    assert sorted(p.name for p in photos.rglob("*")) == before and upload_leftovers() == leftovers


def test_upload_mixes_with_query_parts(served):
    """`q` and `not` mix with the uploaded image like the CLI's `search --image FILE TEXT --not X`."""
    client, idx, photos = served
    portrait = image_id(idx, photos / PORTRAIT)
    other = client.json("/api/search?q=a+dog&k=1")["hits"][0]["id"]
    body = (photos / PORTRAIT).read_bytes()
    mixed = client.json(f"/api/upload?k=7&captions_k=3&q=2*%22a+dog%22&not=%23{other}", method="POST", body=body)
    expected = idx.search('2*"a dog"', 6, image=str(photos / PORTRAIT), not_=[f"#{other}"])  # leaves portrait out
    got = [h for h in mixed["similar"] if h["id"] != portrait][:6]
    assert [h["id"] for h in got] == [h.id for h in expected]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in expected], abs=1e-4)
    assert [c["id"] for c in mixed["captions"]] == [c.id for c in idx.search_captions("", 3, image=portrait)]
    plain = client.json("/api/upload?k=7&captions_k=0", method="POST", body=body)["similar"]
    assert [h["id"] for h in plain] != [h["id"] for h in mixed["similar"]]
    with_id = client.json(f"/api/upload?k=20&captions_k=0&q=%23{other}", method="POST", body=body)["similar"]
    assert other not in [h["id"] for h in with_id]  # images named in the query are left out, as in /api/search
    for bad in ("q=x.jpg", "not=%2Fetc%2Fpasswd.png", "q=2*", "not=", "q=%23999999999"):
        client.error(f"/api/upload?{bad}", 400, method="POST", body=body)


def test_upload_bad_requests(served):
    client, _, photos = served
    leftovers = upload_leftovers()
    too_big = b"\xff" * (server_room.MAX_UPLOAD_BYTES + 1)
    assert "too large" in client.error("/api/upload", 413, method="POST", body=too_big)
    chunks = iter([b"\xff" * (1024 * 1024)] * 21)  # no Content-Length: the cap holds while streaming
    assert "too large" in client.error("/api/upload", 413, method="POST", body=chunks)
    assert "empty" in client.error("/api/upload", 400, method="POST", body=b"")
    assert "cannot read the uploaded image" in client.error("/api/upload", 400, method="POST", body=b"not an image")
    truncated = (photos / PORTRAIT).read_bytes()[:5000]
    assert "cannot read the uploaded image" in client.error("/api/upload", 400, method="POST", body=truncated)
    client.error("/api/upload?k=0", 400, method="POST", body=b"x")
    client.error("/api/upload?under=/etc", 400, method="POST", body=(photos / PORTRAIT).read_bytes())
    assert client.request("/api/upload")[0] == 405
    assert upload_leftovers() == leftovers


def test_concurrent_requests_share_the_index_safely(served):
    client, _, _ = served
    hits = client.json("/api/search?q=flowers&k=12")["hits"]
    results: list[int] = []

    def fetch(path: str) -> None:
        results.append(client.request(path)[0])

    paths = [h["preview"] for h in hits] + [f"/api/search?q=flower+{n}&k=20" for n in range(8)] + \
            [f"/api/images/{h['id']}/similar?k=3" for h in hits]
    threads = [threading.Thread(target=fetch, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [200] * len(paths)


# ----------------------------------------------------------------------------------------------------- serve + CLI
def test_is_loopback():
    assert all(map(server_room.is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.5.5.5"]))
    assert not any(map(server_room.is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.com"]))


def test_a_port_in_use_is_one_clear_error(served):
    client, idx, _ = served
    with pytest.raises(BadInput, match="cannot listen on 127.0.0.1"):
        server_room.WebServer(idx, "127.0.0.1", client.port)


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_cli_serve_warns_when_exposed(monkeypatch, host, warned):
    calls = []

    def fake_serve(index, host, port, *, open_browser, on_ready):
        calls.append((index, host, port, open_browser))
        on_ready(f"http://{host}:{port}/")

    monkeypatch.setattr(server_room, "serve", fake_serve)
    result = CliRunner().invoke(cli, ["serve", "--index", "idx", "--host", host, "--port", "9000", "--open"])
    assert result.exit_code == 0 and calls == [("idx", host, 9000, True)]
    assert ("warning: listening on 0.0.0.0" in result.stderr) == warned
    assert f"serving http://{host}:9000/" in result.stderr


def test_serve_refuses_a_missing_index(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--index", str(tmp_path / "none"), "--port", "0"])
    assert result.exit_code == 7 and "no index" in result.stderr
