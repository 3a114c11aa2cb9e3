"""The query path without torch: the ONNX text tower exported at index time, used by text queries (same results as
the torch path), and queries that need no model at all (indexed images, #ids, copies of indexed files) loading none."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipsearch
from clipsearch.errors import ModelError
from clipsearch.index import TEXT_ENCODER_ENV, TEXT_ENCODER_NAME
from conftest import REPO, TINY_MODEL, shared

QUERIES = ["a dog", "kids on a beach at sunset", "café crème 東京 🐶", "x " * 100]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint):
    """A small index of real photos with the tiny model (its first run exports text.onnx)."""
    photos = tmp_path_factory.mktemp("photos")
    for source in sorted(shared("photos", "exif-samples").glob("*.jpg"))[:6]:
        shutil.copy2(source, photos / source.name)
    path = tmp_path_factory.mktemp("query-index") / "idx"
    with clipsearch.open(path, model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=0)
    return path, photos, report


@pytest.fixture
def index_copy(built, tmp_path):
    """A private copy of the built index, for tests that change it."""
    path, photos, _ = built
    shutil.copytree(path, tmp_path / "idx")
    return tmp_path / "idx", photos


def run_cli_in_fresh_python(commands: list[list[str]], env: dict[str, str] | None = None) -> dict:
    """Run CLI commands in one new interpreter; return their outputs and exit codes and which heavy modules got
    imported, read from sys.modules inside that process after the commands ran."""
    code = (
        "import io, json, sys, contextlib\n"
        "from clipsearch.cli import cli\n"
        "outputs = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            cli.main(args, prog_name='clipsearch')\n"
        "        except SystemExit as exc:\n"
        "            outputs.append([exc.code or 0, out.getvalue()])\n"
        "heavy = [m for m in ('torch', 'open_clip', 'PIL.JpegImagePlugin', 'onnxruntime', 'tqdm', 'clipsearch.indexer',"
        " 'sqlite_utils', 'faiss')"
        " if m in sys.modules]\n"
        "print(json.dumps({'outputs': outputs, 'imported': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def meta(path: Path) -> dict:
    with clipsearch.open(path, create=False) as idx:
        return idx.store.meta()


def test_indexing_exports_the_text_tower_once(built, tiny_checkpoint):
    path, photos, report = built
    assert not report.warnings
    data = meta(path)
    assert data["text_encoder"] == "onnx" and data["text_encoder_identity"] == data["identity"]
    assert (path / TEXT_ENCODER_NAME).is_file() and len(list(path.glob(f"{TEXT_ENCODER_NAME}.*.data"))) == 1
    weights = next(path.glob(f"{TEXT_ENCODER_NAME}.*.data"))
    with clipsearch.open(path) as idx:  # a second run finds a valid file and leaves it alone
        assert idx.index([photos], workers=0).warnings == []
        info = idx.info()
    assert weights.exists() and info["query_encoder"] == "onnx" and info["precision"] in ("fp32", "bf16")


def test_text_queries_use_onnx_and_agree_with_torch(built):
    path, _, _ = built
    with clipsearch.open(path, create=False) as idx:
        assert idx.query_encoder == "onnx"
        onnx_vectors = idx.encode_texts(QUERIES)
        assert "_model" in vars(idx) and idx._model is None  # no torch model was loaded for that
        torch_vectors = idx.model.encode_texts(QUERIES)
        assert float((onnx_vectors * torch_vectors).sum(axis=1).min()) >= 0.999
        fast = [(h.id, h.score) for h in idx.search("a dog", k=6)]
    with clipsearch.open(path, create=False) as idx:
        os.environ[TEXT_ENCODER_ENV] = "torch"
        try:
            assert idx.query_encoder == "torch"
            slow = [(h.id, h.score) for h in idx.search("a dog", k=6)]
        finally:
            del os.environ[TEXT_ENCODER_ENV]
    assert [i for i, _ in fast] == [i for i, _ in slow]
    assert np.allclose([s for _, s in fast], [s for _, s in slow], atol=2e-3)


def test_an_open_index_keeps_recent_query_vectors(built, monkeypatch):
    """Paging through results or asking again does not encode the text again; the least recently asked text is
    dropped first, and vectors from one encoder are never served for another."""
    import clipsearch.index as index_room

    path, _, _ = built
    monkeypatch.setattr(index_room, "TEXT_VECTORS_KEPT", 3)
    with clipsearch.open(path, create=False) as idx:
        encoder = idx.text_encoder()
        calls: list[list[str]] = []
        encode = encoder.encode_texts
        monkeypatch.setattr(encoder, "encode_texts", lambda texts: calls.append(list(texts)) or encode(texts))
        first = idx.encode_texts(["a dog", "a cat", "a dog"])
        assert calls == [["a dog", "a cat"]] and np.array_equal(first[0], first[2])
        top = [h.id for h in idx.search("a dog", k=4)]
        assert [h.id for h in idx.search("a dog", k=2)] == top[:2] and calls == [["a dog", "a cat"]]
        idx.encode_texts(["b", "c", "a cat"])  # "a dog" is now the least recent of four: dropped
        assert calls[-1] == ["b", "c"]
        assert np.allclose(idx.encode_texts(["a dog"])[0], first[0]) and calls[-1] == ["a dog"]
        assert len(calls) == 3
        idx.encode_texts(["a cat"])
        assert len(calls) == 3
        idx._text_encoder = None  # what a run that exports a new text.onnx does: the next query loads that file
        again = idx.text_encoder()
        assert again is not encoder
        monkeypatch.setattr(again, "encode_texts", lambda texts: calls.append(list(texts)) or encode(texts))
        idx.encode_texts(["a cat"])
        assert calls[-1] == ["a cat"] and len(calls) == 4


def test_cli_text_search_imports_neither_torch_nor_open_clip(built, monkeypatch):
    """`clipsearch search` in a new process: the ONNX path imports no torch and gives the torch path's answer."""
    path, _, _ = built
    run = run_cli_in_fresh_python([["search", "a dog", "--index", str(path), "--json", "-k", "6"]])
    assert run["outputs"][0][0] == 0
    assert "torch" not in run["imported"] and "open_clip" not in run["imported"]
    assert "tqdm" not in run["imported"] and "clipsearch.indexer" not in run["imported"]
    assert "sqlite_utils" not in run["imported"]  # reads are plain sqlite3; sqlite-utils is for writes
    assert "onnxruntime" in run["imported"]
    # a flat index is read with numpy from the mapped file: FAISS (70-200 ms to import) is never imported
    assert "faiss" not in run["imported"]
    fast = json.loads(run["outputs"][0][1])
    monkeypatch.setenv(TEXT_ENCODER_ENV, "torch")  # the torch path, here (this process has torch loaded already)
    with clipsearch.open(path, create=False) as idx:
        assert idx.query_encoder == "torch"
        slow = [h.to_dict() for h in idx.search("a dog", k=6)]
    assert [h["id"] for h in fast] == [h["id"] for h in slow] and len(fast) == 6
    assert np.allclose([h["score"] for h in fast], [h["score"] for h in slow], atol=2e-3)


ORT_CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
                  "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "BITBUCKET_BUILD_NUMBER")  # its library's list


@pytest.mark.parametrize(("chosen", "queued"), [(None, False), ("0", True)], ids=["default", "user-enabled"])
def test_a_query_leaves_no_onnxruntime_telemetry_behind(built, tmp_path, monkeypatch, chosen, queued):
    """onnxruntime (1.32 here) queues usage events for upload under ~/.cache/Microsoft at import; clipsearch turns
    that off unless the user has set ORT_DISABLE_TELEMETRY either way (0 here: the queue appears, as ORT's own)."""
    path, _, _ = built
    for name in ("ORT_DISABLE_TELEMETRY", *ORT_CI_MARKERS):  # onnxruntime itself stays quiet on a CI machine
        monkeypatch.delenv(name, raising=False)
    env = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if chosen is not None:
        env["ORT_DISABLE_TELEMETRY"] = chosen
    run = run_cli_in_fresh_python([["search", "a dog", "--index", str(path), "-k", "2"]], env)
    assert run["outputs"][0][0] == 0 and "onnxruntime" in run["imported"]
    assert any((tmp_path / "cache").rglob("*")) == queued


@pytest.mark.parametrize("command", ["search", "similar"])
def test_a_cli_query_leaves_its_index_to_the_os(built, command):
    """A one-shot query prints its hits and ends the process without freeing the index first (unmapping its vectors,
    tearing down its onnxruntime session: 20-35 ms of a cold query's CPU at 100,000 images)."""
    path, photos, _ = built
    target = "a dog" if command == "search" else str(sorted(photos.glob("*.jpg"))[0])
    code = (
        "import sys, weakref\n"
        "import clipsearch.index as room\n"
        "opened = room.open\n"
        "def traced(*args, **kwargs):\n"
        "    index = opened(*args, **kwargs)\n"
        "    weakref.finalize(index, print, 'index freed', flush=True)\n"
        "    return index\n"
        "room.open = traced\n"
        "from clipsearch import cli\n"
        f"sys.argv = ['clipsearch', {command!r}, {target!r}, '--index', {str(path)!r}, '-k', '2']\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "index freed" not in proc.stdout


def test_queries_of_indexed_images_load_no_model(built, tmp_path):
    """`similar` of an indexed file, '#id' parts and a copy of an indexed file (same content, another path) take the
    stored vectors: no torch, no onnxruntime, no image decoder, and (a flat index) no FAISS."""
    path, photos, _ = built
    photo = sorted(photos.glob("*.jpg"))[0]
    copy = Path(shutil.copy(photo, tmp_path / "elsewhere.jpg"))  # new path and mtime, same bytes
    with clipsearch.open(path, create=False) as idx:
        own_id = idx.store.row_by_path(str(photo))["id"]
        expected = [h.id for h in idx.similar(photo, k=3)]
    run = run_cli_in_fresh_python([
        ["similar", str(photo), "--index", str(path), "--json", "-k", "3"],
        ["similar", str(copy), "--index", str(path), "--json", "-k", "3"],
        ["search", f"#{own_id}", "--index", str(path), "--json", "-k", "3"],
    ])
    assert [code for code, _ in run["outputs"]] == [0, 0, 0]
    for _, out in run["outputs"]:
        ids = [h["id"] for h in json.loads(out)]
        assert ids == expected and own_id not in ids
    assert not {"torch", "open_clip", "onnxruntime", "PIL.JpegImagePlugin", "faiss"} & set(run["imported"]), \
        run["imported"]


def test_a_new_image_file_still_works_through_the_image_model(built, tmp_path):
    path, photos, _ = built
    source = sorted(photos.glob("*.jpg"))[0]
    from PIL import Image

    changed = tmp_path / "changed.png"
    Image.open(source).convert("RGB").rotate(90, expand=True).save(changed)  # content no indexed file has
    with clipsearch.open(path, create=False) as idx:
        hits = idx.similar(changed, k=3)
        assert len(hits) == 3 and idx._model is not None


def test_a_damaged_or_foreign_text_encoder_falls_back_to_torch_and_is_repaired(index_copy, tiny_checkpoint):
    path, photos = index_copy
    with clipsearch.open(path, create=False) as idx:
        expected = [h.id for h in idx.search("a dog", k=4)]
    (path / TEXT_ENCODER_NAME).write_bytes(b"not an onnx file")
    with clipsearch.open(path, create=False) as idx:
        assert [h.id for h in idx.search("a dog", k=4)] == expected
        assert idx.query_encoder == "torch" and any("text encoder not usable" in n for n in idx.notices)
    with clipsearch.open(path) as idx:  # the next run exports it again
        assert idx.index([photos], workers=0).warnings == []
        assert idx.query_encoder == "onnx"
        # a file exported for another model (here: the same net under another identity) is refused, then replaced
        from clipsearch.text_onnx import export_text_tower

        real = idx.model.identity
        idx.model.identity = "another model"
        try:
            export_text_tower(idx.model, idx.text_encoder_path)
        finally:
            idx.model.identity = real
    with clipsearch.open(path, create=False) as idx:
        assert idx.query_encoder == "torch" and [h.id for h in idx.search("a dog", k=4)] == expected
    with clipsearch.open(path) as idx:
        idx.index([photos], workers=0)
    with clipsearch.open(path, create=False) as idx:
        assert idx.query_encoder == "onnx" and [h.id for h in idx.search("a dog", k=4)] == expected


def as_before_int8(path: Path) -> None:
    """Make the index's text encoder look like one the previous version wrote (no weights metadata)."""
    import onnx

    proto = onnx.load(str(path / TEXT_ENCODER_NAME), load_external_data=False)
    for prop in [p for p in proto.metadata_props if p.key in ("clipsearch.weights", "clipsearch.int8")]:
        proto.metadata_props.remove(prop)
    onnx.save_model(proto, str(path / TEXT_ENCODER_NAME))


def test_a_text_encoder_from_before_int8_is_exported_again_once(index_copy):
    path, photos = index_copy
    as_before_int8(path)
    with clipsearch.open(path) as idx:
        assert "weights" not in idx.text_encoder().metadata
        idx.index([photos], workers=0)
        assert idx._model is not None and idx.text_encoder().weights == "float32"
        assert "weights" in idx.text_encoder().metadata
    with clipsearch.open(path) as idx:  # done: the next refresh loads no model
        idx.index([photos], workers=0)
        assert idx._model is None


@pytest.mark.parametrize("failure", ["export", "model"])
def test_a_failed_upgrade_keeps_the_working_text_encoder_and_is_not_retried(index_copy, monkeypatch, failure):
    path, photos = index_copy
    as_before_int8(path)
    before = sorted(p.name for p in path.iterdir() if p.name.startswith(TEXT_ENCODER_NAME))
    with clipsearch.open(path, create=False) as idx:
        expected = [h.id for h in idx.search("a dog", k=4)]
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise (RuntimeError("exporter exploded") if failure == "export" else ModelError("checkpoint gone"))

    if failure == "export":
        monkeypatch.setattr("clipsearch.text_onnx.export_text_tower", broken)
    else:
        monkeypatch.setattr(clipsearch.Index, "model", property(broken))
    for _ in range(2):
        with clipsearch.open(path) as idx:
            assert idx.index([photos], workers=0).warnings == []
    assert len(calls) == 1  # tried once for this model and version, silently
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(TEXT_ENCODER_NAME)) == before
    with clipsearch.open(path, create=False) as idx:
        assert idx.query_encoder == "onnx" and [h.id for h in idx.search("a dog", k=4)] == expected


def test_an_export_failure_is_a_warning_and_not_retried_for_the_same_model(index_copy, monkeypatch):
    path, photos = index_copy
    (path / TEXT_ENCODER_NAME).unlink()
    calls = []

    def failing(model, target):
        calls.append(target)
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr("clipsearch.text_onnx.export_text_tower", failing)
    with clipsearch.open(path) as idx:
        report = idx.index([photos], workers=0)
        assert report.embedded == 0 and len(calls) == 1
        assert report.warnings == ["could not export the text encoder to ONNX (exporter exploded); text queries will "
                                   "load the torch model"]
        assert idx.query_encoder == "torch" and len(idx.search("a dog", k=2)) == 2
        assert idx.info()["query_encoder_note"] == "export failed: exporter exploded"
        assert idx.index([photos], workers=0).warnings == [] and len(calls) == 1  # same model: not tried again
    monkeypatch.setattr(clipsearch, "__version__", "9.9.9")  # another clipsearch version tries again
    with clipsearch.open(path) as idx:
        assert len(idx.index([photos], workers=0).warnings) == 1 and len(calls) == 2
    assert meta(path)["text_encoder"] == "torch"


def test_a_model_without_a_torch_free_tokenizer_keeps_the_torch_path(index_copy, monkeypatch):
    path, photos = index_copy
    from clipsearch.tokenizer import UnsupportedTokenizer

    def unsupported(model, target):
        raise UnsupportedTokenizer("the model's tokenizer is open_clip's HFTokenizer, not the CLIP BPE tokenizer")

    monkeypatch.setattr("clipsearch.text_onnx.export_text_tower", unsupported)
    (path / TEXT_ENCODER_NAME).unlink()  # gone: the next run exports again
    with clipsearch.open(path) as idx:
        report = idx.index([photos], workers=0)
        assert report.warnings == ["text queries will load the torch model: the model's tokenizer is open_clip's "
                                   "HFTokenizer, not the CLIP BPE tokenizer"]
        assert not idx.text_encoder_path.exists() and idx.query_encoder == "torch"
        assert len(idx.search("a dog", k=2)) == 2


def test_info_names_the_query_encoder(built):
    path, _, _ = built
    run = run_cli_in_fresh_python([["info", "--index", str(path)], ["info", "--index", str(path), "--json"]])
    text, data = run["outputs"][0][1], json.loads(run["outputs"][1][1])
    # the tiny tower's two blocks are the ones int8 keeps in float32
    assert "queries     onnx, float32 weights (text queries need no torch)  [no matrix to quantize]" in text
    assert data["query_encoder"] == "onnx" and data["query_weights"] == "float32" and "torch" not in run["imported"]
    assert data["query_weights_note"] == "no matrix to quantize"
