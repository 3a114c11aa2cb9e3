"""Damaged files (issue 6, item 4): a truncated or garbage FAISS file is rebuilt from SQLite with one line saying so; a
damaged SQLite file is reported with its own exit code and never written to (same bytes, same mtime)."""
from __future__ import annotations

import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import clipsearch
from clipsearch import errors
from clipsearch.cli import cli
from clipsearch.index import FAISS_NAME
from clipsearch.store import DB_NAME
from conftest import TINY_MODEL

PAGE = 4096


def clip(*args) -> tuple[int, list[str], str]:
    """(exit code, non-empty stderr lines, stdout) of one in-process CLI run; a traceback is always a failure."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert "Traceback" not in result.stderr
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()], result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("lib")
    for n in range(12):
        image = Image.new("RGB", (80, 60), (n * 21 % 256, 255 - n * 17 % 256, n * 40 % 256))
        image.paste((255, 255, 255), (n * 5, n * 4, n * 5 + 20, n * 4 + 15))
        image.save(folder / f"{n:02d}.png")
    idx = tmp_path_factory.mktemp("built") / "idx"
    with clipsearch.open(idx, model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as index:
        assert index.index([folder], workers=0).added == 12
    return idx


@pytest.fixture()
def idx(built, tmp_path) -> Path:
    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    return copy


def probe(idx: Path) -> str:
    """An indexed image: `similar` on it needs no model, so its stderr holds only what the index says."""
    with sqlite3.connect(idx / DB_NAME) as conn:
        return conn.execute("SELECT path FROM images ORDER BY path LIMIT 1").fetchone()[0]


# --------------------------------------------------------------------------------------------- FAISS


def _garble_header_key(data: bytes) -> bytes:
    return data.replace(b'"generation"', b'"generatiOn"', 1)


FAISS_DAMAGE = {
    "empty": lambda data: b"",
    "cut-in-magic": lambda data: data[:7],
    "cut-in-header": lambda data: data[:40],
    "cut-in-body": lambda data: data[: len(data) // 2],
    "last-byte-cut": lambda data: data[:-1],
    "trailing-garbage": lambda data: data + b"\0" * 16,
    "random-bytes": lambda data: random.Random(1).randbytes(len(data)),
    "magic-then-garbage": lambda data: data[:16] + random.Random(2).randbytes(len(data) - 16),
    "header-not-json": lambda data: data[:20] + b"{{{{" + data[24:],
    "header-key-garbled": _garble_header_key,
}


@pytest.mark.parametrize("damage", sorted(FAISS_DAMAGE))
def test_damaged_faiss_is_rebuilt_from_sqlite_with_one_line(idx, damage):
    image = probe(idx)
    code, lines, expected = clip("similar", image, "--index", idx, "--json")
    assert (code, lines) == (0, [])
    faiss_file = idx / FAISS_NAME
    faiss_file.write_bytes(FAISS_DAMAGE[damage](faiss_file.read_bytes()))

    code, lines, out = clip("similar", image, "--index", idx, "--json")
    assert code == 0 and out == expected
    assert len(lines) == 1 and lines[0].startswith("clipsearch: FAISS index rebuilt from SQLite ("), lines
    assert clip("similar", image, "--index", idx, "--json")[:2] == (0, [])  # the repaired file was saved
    code, lines, out = clip("verify", "--index", idx)
    assert (code, lines) == (0, []) and out.startswith("ok")


def test_damaged_faiss_found_by_verify_is_rebuilt_with_one_line(idx):
    faiss_file = idx / FAISS_NAME
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    code, lines, out = clip("verify", "--index", idx)
    assert code == 0 and out.startswith("ok") and len(lines) == 1 and "rebuilt from SQLite" in lines[0]


@pytest.mark.xfail(strict=True, reason="the FAISS file has no checksum: a flipped bit in its vectors loads silently "
                                       "(verify does catch it); fix: store a crc32/blake2b of the body in the header "
                                       "and check it in VectorIndex.load")
def test_a_flipped_bit_in_the_faiss_vectors_is_detected(idx):
    image = probe(idx)
    faiss_file = idx / FAISS_NAME
    data = bytearray(faiss_file.read_bytes())
    data[-200] ^= 0x40  # inside the last vectors of the flat index
    faiss_file.write_bytes(bytes(data))
    code, lines, _ = clip("similar", image, "--index", idx, "--json")
    assert code == 0 and len(lines) == 1 and "rebuilt from SQLite" in lines[0]


# --------------------------------------------------------------------------------------------- SQLite


def fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def rootpage(db: Path, name: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", [name]).fetchone()[0]


def overwrite_page(db: Path, page: int, seed: int = 0) -> None:
    data = bytearray(db.read_bytes())
    data[(page - 1) * PAGE: page * PAGE] = random.Random(seed).randbytes(PAGE)
    db.write_bytes(bytes(data))


UNREADABLE_DB = {
    "garbage": lambda data: random.Random(3).randbytes(len(data)),
    "header-zeroed": lambda data: b"\0" * 100 + data[100:],
    "cut-in-half": lambda data: data[: len(data) // 2],
}


@pytest.mark.parametrize("damage", sorted(UNREADABLE_DB))
@pytest.mark.parametrize("command", [["verify"], ["info"], ["search", "dog"], ["index"]])
def test_unreadable_database_is_refused_and_left_alone(idx, damage, command):
    db = idx / DB_NAME
    db.write_bytes(UNREADABLE_DB[damage](db.read_bytes()))
    os.utime(db, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = fingerprint(db)
    code, lines, _ = clip(*command, "--index", idx)
    assert code == errors.NotAnIndex.exit_code and len(lines) == 1 and lines[0].startswith("clipsearch: error: ")
    assert fingerprint(db) == before


@pytest.mark.parametrize("btree", ["idx_images_path", "images", "vectors"])
def test_index_refuses_to_write_into_a_damaged_database(idx, btree):
    """The file still opens (its header is fine) but a page inside is garbage: `index` must not add to it."""
    db = idx / DB_NAME
    overwrite_page(db, rootpage(db, btree))
    before = fingerprint(db)
    code, lines, _ = clip("index", "--index", idx, "--workers", "0")
    assert code == errors.NotAnIndex.exit_code and len(lines) == 1, lines
    assert "is damaged (SQLite integrity check" in lines[0] and "nothing was written" in lines[0]
    assert fingerprint(db) == before


def test_damage_quick_check_lists_is_reported_by_verify_as_a_failure(idx):
    db = idx / DB_NAME
    overwrite_page(db, rootpage(db, "idx_images_path"))
    before = fingerprint(db)
    code, lines, _ = clip("verify", "--index", idx)
    assert code == errors.VerifyFailed.exit_code and "SQLite integrity" in " ".join(lines)
    assert fingerprint(db) == before


def test_verify_reports_sqlite_damage_in_one_line(idx):
    db = idx / DB_NAME
    overwrite_page(db, rootpage(db, "idx_images_path"))
    code, lines, _ = clip("verify", "--index", idx)
    assert code == errors.VerifyFailed.exit_code and len(lines) == 1


@pytest.mark.parametrize("command, code", [(["verify"], errors.VerifyFailed.exit_code),
                                           (["search", "dog"], errors.NotAnIndex.exit_code)])
def test_damage_that_stops_quick_check_is_still_a_clear_error(idx, command, code):
    db = idx / DB_NAME
    overwrite_page(db, rootpage(db, "images"))
    before = fingerprint(db)
    got, lines, _ = clip(*command, "--index", idx)
    assert fingerprint(db) == before
    assert got == code and len(lines) == 1 and lines[0].startswith("clipsearch: error: ")
