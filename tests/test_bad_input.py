"""Bad CLI input (issue 6, item 7): each case is one line on stderr, starting `clipsearch: error:`, no traceback, nothing
on stdout, and the exit code of its kind: 2 bad input, 3 model cannot load, 4 another model, 5 not an index, 7 no index."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from clipsearch import errors, media
from clipsearch.cli import cli
from conftest import TINY_MODEL

BAD_INPUT = errors.BadInput.exit_code


def fails(*args, code: int) -> str:
    """Run the CLI in-process and return its one stderr line, asserting the exit code and the one-line contract."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("clipsearch: error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lib")
    for n, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (64, 48), colour).save(folder / f"{n}.png")
    return folder


@pytest.fixture(scope="module")
def index(tmp_path_factory, lib, tiny_checkpoint) -> Path:
    idx = tmp_path_factory.mktemp("idx") / "idx"
    result = CliRunner().invoke(cli, ["index", str(lib), "--index", str(idx), "--model", TINY_MODEL,
                                      "--pretrained", str(tiny_checkpoint), "--workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return idx


@pytest.fixture()
def unreadable(monkeypatch):
    """chmod 0 the path; as root (where chmod does not bind) the permission check is refused the same way."""
    def make(path: Path) -> Path:
        path.chmod(0)
        if os.access(path, os.R_OK):  # running as root
            real_access, real_open = os.access, media.open if hasattr(media, "open") else open
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(path)
                                else real_access(p, mode, **kw))

            def refuse(file, *args, **kwargs):
                if os.fspath(file) == str(path):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(file, *args, **kwargs)
            monkeypatch.setattr(media, "open", refuse, raising=False)  # shadows the builtin inside media only
        return path
    yield make


# -------------------------------------------------------------------------------------------- paths


def test_index_a_missing_folder(tmp_path):
    assert "path not found" in fails("index", tmp_path / "no" / "such", "--index", tmp_path / "i", code=BAD_INPUT)


def test_index_an_unreadable_folder(tmp_path, unreadable):
    folder = tmp_path / "locked"
    folder.mkdir()
    try:
        line = fails("index", unreadable(folder), "--index", tmp_path / "i", code=BAD_INPUT)
        assert "permission denied" in line or "not readable" in line
    finally:
        folder.chmod(0o755)


def test_index_a_folder_whose_name_is_not_utf8(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    assert "not valid UTF-8" in fails("index", os.fsdecode(folder), "--index", tmp_path / "i", code=BAD_INPUT)


def test_similar_to_a_missing_image(index, tmp_path):
    assert "image not found" in fails("similar", tmp_path / "nope.jpg", "--index", index, code=BAD_INPUT)


def test_similar_to_an_unreadable_image(index, tmp_path, unreadable):
    image = tmp_path / "locked.png"
    Image.new("RGB", (32, 32), "white").save(image)
    try:
        line = fails("similar", unreadable(image), "--index", index, code=BAD_INPUT)
        assert "permission denied" in line or "not readable" in line
    finally:
        image.chmod(0o644)


def test_similar_to_a_file_that_is_not_an_image(index, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    assert "cannot read image" in fails("similar", notes, "--index", index, code=BAD_INPUT)


# -------------------------------------------------------------------------------------------- query and numbers


def test_empty_query(index):
    fails("search", "", "--index", index, code=BAD_INPUT)


def test_blank_query(index):
    fails("search", "   ", "--index", index, code=BAD_INPUT)


def test_k_zero(index):
    fails("search", "dog", "-k", "0", "--index", index, code=BAD_INPUT)


def test_k_negative(index):
    fails("search", "dog", "-k", "-3", "--index", index, code=BAD_INPUT)


def test_k_not_a_number(index):
    fails("search", "dog", "-k", "many", "--index", index, code=BAD_INPUT)


def test_batch_size_zero(lib, tmp_path):
    fails("index", lib, "--index", tmp_path / "i", "--batch-size", "0", code=BAD_INPUT)


def test_invalid_date(index):
    assert "invalid date" in fails("search", "dog", "--after", "2021-13-45", "--index", index, code=BAD_INPUT)


def test_date_that_is_not_a_date(index):
    assert "invalid date" in fails("search", "dog", "--before", "yesterday", "--index", index, code=BAD_INPUT)


def test_after_later_than_before(index):
    fails("search", "dog", "--after", "2022", "--before", "2021", "--index", index, code=BAD_INPUT)


def test_weight_that_is_not_a_number(index):
    assert "bad weight 'x'" in fails("search", "x*dog", "--index", index, code=BAD_INPUT)


def test_zero_weight(index):
    assert "weight" in fails("search", "0*dog", "--index", index, code=BAD_INPUT)


def test_huge_weight(index):
    assert "weight" in fails("search", "1e9*dog + cat", "--index", index, code=BAD_INPUT)


def test_threshold_out_of_range(index):
    assert "threshold" in fails("search", "dog", "--threshold", "5", "--index", index, code=BAD_INPUT)


def test_unknown_image_type(index):
    assert "unknown image type" in fails("search", "dog", "--type", "docx", "--index", index, code=BAD_INPUT)


# -------------------------------------------------------------------------------------------- models


def test_unknown_model(lib, tmp_path):
    fails("index", lib, "--index", tmp_path / "i", "--model", "ViT-Nope", code=errors.ModelError.exit_code)


def test_unknown_pretrained_tag(lib, tmp_path):
    fails("index", lib, "--index", tmp_path / "i", "--model", TINY_MODEL, "--pretrained", "nope_tag",
          code=errors.ModelError.exit_code)


def test_missing_checkpoint_file(lib, tmp_path):
    fails("index", lib, "--index", tmp_path / "i", "--model", TINY_MODEL, "--pretrained", tmp_path / "gone.pt",
          code=errors.ModelError.exit_code)


def test_index_made_with_another_model(index, lib):
    before = (index / "clipsearch.db").read_bytes()
    line = fails("index", lib, "--index", index, "--model", "ViT-B-32", code=errors.ModelMismatch.exit_code)
    assert TINY_MODEL in line and (index / "clipsearch.db").read_bytes() == before


# -------------------------------------------------------------------------------------------- not an index


def test_index_option_naming_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("hello")
    fails("search", "dog", "--index", target, code=errors.NotAnIndex.exit_code)
    assert target.read_text() == "hello"


def test_database_that_is_not_sqlite(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "clipsearch.db").write_text("hello")
    fails("info", "--index", tmp_path / "i", code=errors.NotAnIndex.exit_code)
    assert (tmp_path / "i" / "clipsearch.db").read_text() == "hello"


def test_someone_elses_sqlite_database(tmp_path, lib):
    (tmp_path / "i").mkdir()
    db = tmp_path / "i" / "clipsearch.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = db.read_bytes()
    fails("index", lib, "--index", tmp_path / "i", code=errors.NotAnIndex.exit_code)
    assert db.read_bytes() == before


def test_no_index_yet(tmp_path):
    fails("search", "dog", "--index", tmp_path / "nothing-here", code=errors.IndexMissing.exit_code)
    assert not (tmp_path / "nothing-here").exists()
