"""hub: a pretrained tag's weights are looked for in the Hugging Face cache first, then the hub is asked once."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import pytest

from clipsearch import hub
from clipsearch.open_clip_import import import_open_clip

NAME, TAG = "ViT-B-32", "laion2b_s34b_b79k"
REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def hub_at(monkeypatch, tmp_path):
    """Point huggingface_hub at an empty cache and at ``endpoint`` (read at its import, so patched in place)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def point(endpoint: str) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    return point


def _cache(tmp_path, filename: str) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit / filename).write_bytes(b"weights")


def test_the_default_tag_comes_from_its_hub_repository():
    assert hub.hub_file(import_open_clip(), NAME, TAG) == (REPO, hub.DEFAULT_FILE)
    assert hub.hub_file(import_open_clip(), NAME, "/some/checkpoint.pt") is None  # a file: nothing to download
    assert hub.hub_file(import_open_clip(), f"hf-hub:{REPO}", "") == (REPO, hub.DEFAULT_FILE)


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_cached_weights_need_no_network(hub_at, tmp_path, filename):
    """Either file open_clip would take counts; the refused endpoint proves no request was made."""
    hub_at(REFUSED)
    _cache(tmp_path, filename)
    assert hub.unobtainable(import_open_clip(), NAME, TAG) is None


def test_weights_neither_cached_nor_reachable_say_why(hub_at):
    hub_at(REFUSED)
    why = hub.unobtainable(import_open_clip(), NAME, TAG)
    assert why and "refused" in why and "\n" not in why


def test_hf_hub_offline_is_named(hub_at, monkeypatch):
    hub_at(REFUSED)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.unobtainable(import_open_clip(), NAME, TAG) == "HF_HUB_OFFLINE is set"


def test_a_hub_that_answers_is_left_to_open_clip(hub_at):
    """Any answer, even 404, means the network works: open_clip's own download then says what is wrong."""
    asked: list[str] = []

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            asked.append(self.path)
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_address[1]}")
        assert hub.unobtainable(import_open_clip(), NAME, TAG) is None
    finally:
        server.shutdown()
        server.server_close()
    assert asked == [f"/{REPO}/resolve/main/{hub.DEFAULT_FILE}"]
