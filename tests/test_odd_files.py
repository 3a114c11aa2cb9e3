"""Broken and odd files (issue 6, item 6): whatever sits in a folder, `index` finishes, records each file it cannot embed
with a reason that `clipsearch errors` lists, loses nothing else, and the next run puts right what has been put right.

The 89 files of ../shared/data/broken are tests/test_cli.py::test_broken_files_are_recorded_and_do_not_stop_the_run
(every one listed by `clipsearch errors` with its reason); each reason's wording is tests/test_media.py's. Here: 0-byte
files, folders named like images, unreadable files and folders, names that are not UTF-8, very long names and paths,
decompression bombs (with the indexing process's peak memory measured) and files rewritten while they are being read.
"""
from __future__ import annotations

import io
import json
import os
import resource
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import clipsearch
from clipsearch import media
from clipsearch.cli import cli
from clipsearch.indexer import UNSTORABLE
from clipsearch.store import DB_NAME
from conftest import TINY_MODEL

NAME_MAX = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
AS_ROOT = "running as root: chmod cannot deny root a read (the simulated test beside this one covers the same path)"


def picture(path: Path, n: int, size: tuple[int, int] = (96, 64)) -> Path:
    """A small image unlike the others (colour and a box depend on n)."""
    image = Image.new("RGB", size, (n * 37 % 256, n * 59 % 256, n * 83 % 256))
    image.paste((255 - n * 37 % 256, 128, n * 11 % 256), (n % 50, n % 30, n % 50 + 30, n % 30 + 20))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def png_bytes(n: int, size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (n * 37 % 256, 200, n * 83 % 256)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def run(tiny_checkpoint, tmp_path):
    """run(folder, **options) -> IndexReport: one `index` through the library into tmp_path/idx (decoding in-process,
    so a test can stand in for the file system)."""
    idx = tmp_path / "idx"

    def index(*folders: Path, **options):
        model = {} if idx.exists() else {"model": TINY_MODEL, "pretrained": str(tiny_checkpoint)}
        with clipsearch.open(idx, **model) as opened:
            return opened.index(list(folders), workers=0, **options)
    index.idx = idx
    return index


def rows(idx: Path) -> dict[str, tuple[str, str | None, bool]]:
    """path -> (status, error, has a vector) of every images row."""
    with sqlite3.connect(idx / DB_NAME) as conn:
        found = {path: (status, error, bool(has)) for path, status, error, has in conn.execute(
            "SELECT i.path, i.status, i.error, v.image_id IS NOT NULL FROM images i "
            "LEFT JOIN vectors v ON v.image_id = i.id")}
    conn.close()
    return found


def vectors(idx: Path) -> dict[str, np.ndarray]:
    with sqlite3.connect(idx / DB_NAME) as conn:
        found = {path: np.frombuffer(blob, np.float32) for path, blob in conn.execute(
            "SELECT i.path, v.vector FROM images i JOIN vectors v ON v.image_id = i.id")}
    conn.close()
    return found


def fingerprint_of(idx: Path, path: Path) -> str | None:
    with sqlite3.connect(idx / DB_NAME) as conn:
        found = conn.execute("SELECT fingerprint FROM images WHERE path = ?", [str(path)]).fetchone()[0]
    conn.close()
    return found


def listed_errors(idx: Path) -> dict[str, str]:
    """`clipsearch errors --json`, and the plain listing must say the same, one line per file."""
    runner = CliRunner()
    as_json = runner.invoke(cli, ["errors", "--index", str(idx), "--json"], catch_exceptions=False)
    plain = runner.invoke(cli, ["errors", "--index", str(idx)], catch_exceptions=False)
    assert as_json.exit_code == plain.exit_code == 0, (as_json.stderr, plain.stderr)
    found = {row["path"]: row["error"] for row in json.loads(as_json.stdout)}
    assert plain.stdout.splitlines() == [f"{path}: {why}" for path, why in sorted(found.items())]
    return found


def verified(idx: Path) -> bool:
    with clipsearch.open(idx, create=False) as opened:
        return opened.verify().ok


# ----------------------------------------------------------------------------------------------------- empty files


def test_a_zero_byte_file_is_an_error_until_it_gets_content(run, tmp_path):
    lib = tmp_path / "lib"
    picture(lib / "a.png", 1)
    (lib / "empty.jpg").write_bytes(b"")
    report = run(lib)
    assert (report.added, report.errors) == (1, 1)
    assert listed_errors(run.idx) == {str(lib / "empty.jpg"): "0-byte file"}
    assert run(lib).embedded == 0 and listed_errors(run.idx) == {str(lib / "empty.jpg"): "0-byte file"}

    (lib / "empty.jpg").write_bytes(png_bytes(2))  # the download finished
    report = run(lib)
    assert (report.embedded, report.updated, report.errors) == (1, 1, 0)
    assert listed_errors(run.idx) == {} and set(vectors(run.idx)) == {str(lib / "a.png"), str(lib / "empty.jpg")}


# ----------------------------------------------------------------------------------------- folders named like images


def test_folders_named_like_images_are_folders(run, tmp_path):
    lib = tmp_path / "lib"
    inside = [picture(lib / "x.jpg" / "inner.png", 1), picture(lib / "y.jpeg" / "z.gif" / "deep.png", 2)]
    (lib / "empty.png").mkdir()
    picture(lib / "plain.png", 3)
    report = run(lib)
    assert (report.added, report.errors) == (3, 0) and report.warnings == []
    assert set(rows(run.idx)) == {str(p) for p in inside} | {str(lib / "plain.png")}
    assert listed_errors(run.idx) == {}
    assert run(lib / "x.jpg").embedded == 0  # given as the folder to index, it is one too
    assert run(lib).embedded == 0 and verified(run.idx)


# ------------------------------------------------------------------------------------------- unreadable permissions


@pytest.mark.skipif(IS_ROOT, reason=AS_ROOT)
def test_an_unreadable_file_is_an_error_and_is_retried_once_readable(run, tmp_path):
    lib = tmp_path / "lib"
    picture(lib / "a.png", 1)
    locked = picture(lib / "locked.png", 2)
    locked.chmod(0)
    try:
        assert run(lib).errors == 1
        assert listed_errors(run.idx) == {str(locked): "permission denied"}
    finally:
        locked.chmod(0o644)
    assert run(lib).updated == 1 and listed_errors(run.idx) == {}  # chmod left size and mtime as they were


def test_an_unreadable_file_simulated_is_an_error_and_is_retried_once_readable(run, tmp_path, monkeypatch):
    """The test above with the refusal made in-process, so that it runs as root too."""
    lib = tmp_path / "lib"
    picture(lib / "a.png", 1)
    locked = picture(lib / "locked.png", 2)
    real_open = open

    def refuse(file, *args, **kwargs):
        if os.fspath(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(media, "open", refuse, raising=False)  # shadows the builtin inside media only
    report = run(lib)
    assert (report.added, report.errors) == (1, 1)
    assert listed_errors(run.idx) == {str(locked): "permission denied"}
    assert run(lib).errors == 1  # still refused: tried again, recorded again, nothing else changes

    monkeypatch.undo()  # permissions fixed: the file's size and mtime did not change, yet it is read now
    report = run(lib)
    assert (report.updated, report.errors) == (1, 0) and listed_errors(run.idx) == {}
    assert set(vectors(run.idx)) == {str(lib / "a.png"), str(locked)}


@pytest.mark.skipif(IS_ROOT, reason=AS_ROOT)
def test_an_unreadable_folder_is_a_warning_and_loses_nothing(run, tmp_path):
    lib = tmp_path / "lib"
    picture(lib / "a.png", 1)
    picture(lib / "private" / "b.png", 2)
    assert run(lib).added == 2
    (lib / "private").chmod(0)
    try:
        report = run(lib)
    finally:
        (lib / "private").chmod(0o755)
    assert report.removed == 0 and len(vectors(run.idx)) == 2
    assert any("cannot read folder" in w and "permission denied" in w for w in report.warnings), report.warnings


def test_an_unreadable_folder_simulated_is_a_warning_and_loses_nothing(run, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    picture(lib / "a.png", 1)
    private = [picture(lib / "private" / "b.png", 2), picture(lib / "private" / "deeper" / "c.png", 3)]
    assert run(lib).added == 3
    picture(lib / "new.png", 4)
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(lib / "private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    report = run(lib)
    assert (report.added, report.removed) == (1, 0)
    assert report.warnings == [f"cannot read folder {lib / 'private'}: permission denied (nothing under it was "
                               f"deleted)"]
    assert {str(p) for p in private} < set(vectors(run.idx)) and verified(run.idx)


def test_a_listed_file_that_cannot_be_stated_keeps_its_row(run, tmp_path, monkeypatch):
    """A folder with read but no search permission lists its names but refuses stat(): a warning, no deletion."""
    lib = tmp_path / "lib"
    kept = picture(lib / "a.png", 1)
    picture(lib / "b.png", 2)
    assert run(lib).added == 2
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if os.fspath(path) == str(kept) and not kwargs.get("dir_fd"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", stat)
    report = run(lib)
    assert report.removed == 0 and set(vectors(run.idx)) == {str(kept), str(lib / "b.png")}
    assert report.warnings == [f"cannot read file {kept}: permission denied (its row, if any, was kept)"]


# ----------------------------------------------------------------------------------------------- names not UTF-8


def test_names_that_are_not_utf8_are_errors_with_a_reason_and_never_a_crash(run, tmp_path):
    lib = tmp_path / "lib"
    picture(lib / "good.png", 1)
    raw = os.fsencode(lib)
    odd_file = os.fsdecode(raw + b"/caf\xe9.png")          # Latin-1 bytes from an old camera or a Windows share
    odd_folder = os.fsdecode(raw + b"/\xff\xfe holiday")
    Path(odd_file).write_bytes(png_bytes(2))
    Path(odd_folder).mkdir()
    (Path(odd_folder) / "beach.png").write_bytes(png_bytes(3))
    report = run(lib)
    assert (report.added, report.errors) == (1, 2)
    expected = {f"{lib}/caf\\xe9.png": UNSTORABLE, f"{lib}/\\xff\\xfe holiday/beach.png": UNSTORABLE}
    assert listed_errors(run.idx) == expected
    assert run(lib).embedded == 0 and len(rows(run.idx)) == 3  # the escaped paths are found again, not added twice

    os.rename(odd_file, lib / "café.png")                  # renamed to UTF-8: indexed, its error row goes
    report = run(lib)
    assert (report.added, report.removed) == (1, 1)
    assert listed_errors(run.idx) == {f"{lib}/\\xff\\xfe holiday/beach.png": UNSTORABLE}
    assert set(vectors(run.idx)) == {str(lib / "good.png"), str(lib / "café.png")} and verified(run.idx)


# --------------------------------------------------------------------------------------------------- long paths


def _make_deep(top: Path, length: int) -> tuple[int, bytes]:
    """Nested folders (names of up to 200 bytes) under top, the deepest one's path exactly `length` bytes long, made
    through directory file descriptors so that paths longer than PATH_MAX can exist. Returns (its fd, its path)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    path = os.fsencode(top)
    while len(path) < length:
        left = length - len(path) - 1  # bytes for the next name, after its "/"
        size = left if left <= 200 else (200 if left >= 202 else 199)  # never leave room for "/" alone
        name = b"d" * size
        os.mkdir(name, dir_fd=fd)
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, path = inner, path + b"/" + name
    return fd, path


def _write_at(fd: int, name: bytes, data: bytes) -> None:
    handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
    try:
        os.write(handle, data)
    finally:
        os.close(handle)


def test_longest_names_and_paths_are_indexed(run, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    longest_name = lib / ("é" * ((NAME_MAX - 4) // 2) + "x" * ((NAME_MAX - 4) % 2) + ".png")
    assert len(os.fsencode(longest_name.name)) == NAME_MAX
    longest_name.write_bytes(png_bytes(1))
    name = b"p" * 96 + b".png"
    fd, deep = _make_deep(lib, PATH_MAX - 2 - len(name))  # the file's path: PATH_MAX - 1 bytes, PATH_MAX with its NUL
    try:
        _write_at(fd, name, png_bytes(2))
    finally:
        os.close(fd)
    longest_path = os.fsdecode(deep + b"/" + name)
    assert len(os.fsencode(longest_path)) == PATH_MAX - 1
    report = run(lib)
    assert (report.added, report.errors, report.warnings) == (2, 0, [])
    assert set(vectors(run.idx)) == {str(longest_name), longest_path}
    with clipsearch.open(run.idx, create=False) as opened:
        assert {h.path for h in opened.search("a picture", k=5)} == {str(longest_name), longest_path}
    assert run(lib).embedded == 0 and verified(run.idx)


def test_paths_longer_than_path_max_are_warnings_and_lose_nothing(run, tmp_path):
    """The kernel refuses such paths (ENAMETOOLONG) to every call that takes one: they cannot be read, so each is one
    warning, and everything else is indexed as usual."""
    lib = tmp_path / "lib"
    picture(lib / "a.png", 1)
    fd, deep = _make_deep(lib, PATH_MAX - 50)
    try:
        _write_at(fd, b"f" * 100 + b".png", png_bytes(2))     # its path is over PATH_MAX, its folder's is not
        os.mkdir(b"e" * 200, dir_fd=fd)                       # a folder over PATH_MAX, with an image inside
        inner = os.open(b"e" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        _write_at(inner, b"g.png", png_bytes(3))
        os.close(inner)
        _write_at(fd, b"ok.png", png_bytes(4))                # under PATH_MAX: indexed
    finally:
        os.close(fd)
    report = run(lib)
    too_long = os.strerror(36)  # ENAMETOOLONG: "File name too long"
    assert (report.added, report.errors) == (2, 0)
    assert sorted(w.split(": ")[-1] for w in report.warnings) == [
        f"{too_long} (its row, if any, was kept)", f"{too_long} (nothing under it was deleted)"]
    assert any(w.startswith("cannot read file ") and w.endswith(".png: " + too_long + " (its row, if any, was kept)")
               for w in report.warnings)
    assert set(vectors(run.idx)) == {str(lib / "a.png"), os.fsdecode(deep + b"/ok.png")}
    report = run(lib)
    assert (report.embedded, report.removed, len(report.warnings)) == (0, 0, 2) and verified(run.idx)


# ---------------------------------------------------------------------------------------------- decompression bombs


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB, with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) claims width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def gif_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)                      # logical screen
    frame = data.index(b",")
    data[frame + 5: frame + 9] = struct.pack("<HH", width, height)      # the frame
    return bytes(data)


BOMBS = {
    "bomb.png": png_header_only(50_000, 50_000),   # 7.5 GB of RGB if decoded
    "bomb.jpg": jpeg_claiming(65_535, 65_535),     # the largest JPEG there is
    "bomb.bmp": bmp_claiming(50_000, 50_000),
    "bomb.gif": gif_claiming(65_535, 65_535),
}
HEADROOM = 2 * 1024 ** 3  # address space allowed on top of the current one while bombs are indexed


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def peak_growth(action) -> float:
    """MiB by which this process's peak resident memory (VmHWM) rose above its size before `action()`, measured after
    resetting the peak; meanwhile the address space is capped, so an allocation a bomb slipped past the checks fails
    with MemoryError (recorded as a different reason) instead of taking the machine's memory."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pytest.skip("cannot reset the peak RSS here (no writable /proc/self/clear_refs)")
    before = _proc_kib("VmRSS")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _proc_kib("VmSize") * 1024 + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        action()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return (_proc_kib("VmHWM") - before) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read the peak RSS")
def test_decompression_bombs_are_errors_and_memory_stays_flat(run, tmp_path):
    """Indexed in this process (decoding in-process, as a decode worker would): the run with the bombs must peak no
    higher than the same run on ordinary images."""
    first, plain, bombs = tmp_path / "first", tmp_path / "plain", tmp_path / "bombs"
    for offset, folder in enumerate((first, plain, bombs)):
        for n in range(3):
            picture(folder / f"{n}.png", 10 * offset + n)
    for name, data in BOMBS.items():
        (bombs / name).write_bytes(data)
    run(first)  # the model is loaded and the index made: what is measured next is one run over a folder
    reports = []
    plain_growth = peak_growth(lambda: reports.append(run(plain)))
    bomb_growth = peak_growth(lambda: reports.append(run(bombs)))
    assert [(r.added, r.errors) for r in reports] == [(3, 0), (3, len(BOMBS))]
    found = listed_errors(run.idx)
    assert set(found) == {str(bombs / name) for name in BOMBS}
    assert found[str(bombs / "bomb.png")] == "too large: 2500000000 pixels"
    assert found[str(bombs / "bomb.bmp")] == "too large: 2500000000 pixels"
    assert found[str(bombs / "bomb.gif")] == "too large: 4294836225 pixels"
    assert found[str(bombs / "bomb.jpg")].startswith(("too large", "corrupt JPEG", "truncated JPEG"))
    print(f"peak RSS growth: {plain_growth:.1f} MiB for 3 images, {bomb_growth:.1f} MiB for 3 images and the bombs")
    # The smallest bomb would need 7 GiB. The JPEG one may be draft-decoded at 1/8 scale (8192x8192, under
    # media.MAX_PIXELS) before it proves truncated: up to ~200 MiB, depending on how much of that buffer gets touched.
    assert bomb_growth < plain_growth + 400, (plain_growth, bomb_growth)


# --------------------------------------------------------------------------------- files rewritten while being read


def _while_decoding(monkeypatch, target: Path, before=None, after=None) -> list[int]:
    """Make media.decode do `before()` just before it reads `target` and `after()` right after (once each)."""
    real_decode = media.decode
    calls = []

    def decode(path, spec):
        mine = path == str(target) and not calls
        if mine:
            calls.append(1)
            if before:
                before()
        result = real_decode(path, spec)
        if mine and after:
            after()
        return result
    monkeypatch.setattr(media, "decode", decode)
    return calls


def _reference(folder: Path, tmp_path: Path, checkpoint: Path) -> dict[str, np.ndarray]:
    """Vectors of an uninterrupted index of a copy of `folder`, keyed by path relative to it."""
    copy = tmp_path / "reference-copy"
    shutil.copytree(folder, copy)
    with clipsearch.open(tmp_path / "reference", model=TINY_MODEL, pretrained=str(checkpoint)) as opened:
        opened.index([copy], workers=0)
    return {os.path.relpath(p, copy): v for p, v in vectors(tmp_path / "reference").items()}


def _matches(idx: Path, folder: Path, reference: dict[str, np.ndarray]) -> bool:
    got = {os.path.relpath(p, folder): v for p, v in vectors(idx).items()}
    return set(got) == set(reference) and all(np.allclose(got[k], reference[k], atol=1e-5) for k in got)


def test_a_file_rewritten_between_scan_and_decode_is_redone_by_the_next_run(run, tmp_path, monkeypatch,
                                                                             tiny_checkpoint):
    lib = tmp_path / "lib"
    for n in range(4):
        picture(lib / f"{n}.png", n)
    target = lib / "2.png"
    calls = _while_decoding(monkeypatch, target, before=lambda: picture(target, 50, size=(120, 90)))
    report = run(lib)
    assert calls == [1] and (report.added, report.errors) == (4, 0) and verified(run.idx)
    assert fingerprint_of(run.idx, target) is None  # which content those pixels were is not known

    monkeypatch.undo()
    report = run(lib)
    assert (report.embedded, report.updated) == (1, 1)
    assert _matches(run.idx, lib, _reference(lib, tmp_path, tiny_checkpoint))
    assert run(lib).embedded == 0 and fingerprint_of(run.idx, target) is not None and verified(run.idx)


def test_a_file_caught_half_written_is_an_error_until_the_writer_finishes(run, tmp_path, monkeypatch,
                                                                          tiny_checkpoint):
    lib = tmp_path / "lib"
    for n in range(3):
        picture(lib / f"{n}.png", n)
    target = lib / "1.png"
    final = png_bytes(60, size=(200, 150))
    _while_decoding(monkeypatch, target, before=lambda: target.write_bytes(final[: len(final) // 2]))
    report = run(lib)
    assert (report.added, report.errors) == (2, 1)
    assert listed_errors(run.idx)[str(target)].startswith("truncated PNG")

    monkeypatch.undo()
    target.write_bytes(final)  # the writer finishes
    report = run(lib)
    assert (report.embedded, report.updated, report.errors) == (1, 1, 0) and listed_errors(run.idx) == {}
    assert _matches(run.idx, lib, _reference(lib, tmp_path, tiny_checkpoint)) and verified(run.idx)


def test_a_file_deleted_between_scan_and_decode_leaves_no_trace_after_the_next_run(run, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    for n in range(3):
        picture(lib / f"{n}.png", n)
    target = lib / "0.png"
    _while_decoding(monkeypatch, target, before=target.unlink)
    report = run(lib)
    assert (report.added, report.errors) == (2, 1) and listed_errors(run.idx) == {str(target): "file not found"}
    monkeypatch.undo()
    report = run(lib)
    assert (report.embedded, report.removed) == (0, 1) and listed_errors(run.idx) == {}
    assert set(rows(run.idx)) == {str(lib / "1.png"), str(lib / "2.png")} and verified(run.idx)


def test_a_file_rewritten_after_decode_lends_no_wrong_vector_to_its_copies(run, tmp_path, monkeypatch,
                                                                            tiny_checkpoint):
    """Rewritten after its pixels were read but before its fingerprint was: the row must not claim the new content,
    or a copy of the new file would take the old picture's vector and keep it for good."""
    lib = tmp_path / "lib"
    for n in range(3):
        picture(lib / f"{n}.png", n)
    target = lib / "1.png"
    _while_decoding(monkeypatch, target, after=lambda: picture(target, 70, size=(120, 90)))
    assert run(lib).added == 3
    monkeypatch.undo()
    shutil.copy2(target, lib / "copy-of-1.png")
    report = run(lib)
    assert (report.embedded, report.updated, report.copied) == (2, 1, 0)
    assert _matches(run.idx, lib, _reference(lib, tmp_path, tiny_checkpoint)) and verified(run.idx)
