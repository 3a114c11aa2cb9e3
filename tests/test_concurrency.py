"""Readers while writing, and two writers (issue 6, items 2 and 3), with real processes.

Processes come from bench/crash_harness.py's launcher (the real CLI, forked from a server that imported torch once). A
writer is held still at a chosen point with a pause hook (it writes `paused` and waits for `go`), so every overlap below
happens for certain instead of by luck of timing.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import clipsearch
from clipsearch.index import FAISS_NAME
from conftest import REPO, TINY_MODEL

sys.path.insert(0, str(REPO / "bench"))
import crash_harness as harness  # noqa: E402

WAIT = 300  # seconds: generous, the machine is shared; every wait ends as soon as its condition holds


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> harness.Launcher:
    work = tmp_path_factory.mktemp("concurrency")
    return harness.Launcher(work / "logs", {"CLIPSEARCH_HOME": str(work / "home")})


def picture(path: Path, n: int) -> Path:
    image = Image.new("RGB", (96, 64), (n * 37 % 256, n * 59 % 256, n * 83 % 256))
    image.paste((255 - n * 37 % 256, 128, n * 11 % 256), (n % 60, n % 40, n % 60 + 30, n % 40 + 20))
    image.save(path)
    return path


def build(folder: Path, idx: Path, checkpoint: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        picture(folder / f"a{n:03d}.png", n)
    with clipsearch.open(idx, model=TINY_MODEL, pretrained=str(checkpoint)) as index:
        index.index([folder], workers=0)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def runs(idx: Path) -> int:
    with sqlite3.connect(idx / "clipsearch.db") as conn:
        return conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def paused_writer(launcher, folder: Path, idx: Path, tmp_path: Path, phase: str, at: int):
    """Start `index` and return (process, control folder) once it sits at the pause point."""
    control = tmp_path / f"control-{phase}-{at}"
    control.mkdir()
    proc, _out, err = launcher.start(["index", folder, "--index", idx, "--workers", "0", "--batch-size", "4"],
                                     hook={"phase": phase, "at": at, "action": "pause", "pause_dir": str(control)})
    wait_for(lambda: (control / "paused").exists() or proc.exitcode is not None, "the writer to reach its pause point")
    assert proc.exitcode is None, err.read_text()
    return proc, control


@pytest.mark.slow
def test_searches_from_another_process_while_index_runs(tmp_path, launcher, tiny_checkpoint):
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    build(lib, idx, tiny_checkpoint, 40)
    for n in range(10):                       # deleted: their rows leave while the reader holds their ids
        (lib / f"a{n:03d}.png").unlink()
    for n in range(10, 15):                   # changed: same id, new vector
        picture(lib / f"a{n:03d}.png", n + 500)
    for n in range(40):                       # new: ten more batches to commit
        picture(lib / f"b{n:03d}.png", n + 1000)

    until = tmp_path / "stop-reading"
    reader, stats_file = launcher.start_reader(idx, until, text="a colourful picture", k=25)
    wait_for(lambda: launcher.searches_done(stats_file) >= 3, "the reader's first searches")
    writer, control = paused_writer(launcher, lib, idx, tmp_path, "write", 6)  # mid-transaction, deletions committed
    seen = launcher.searches_done(stats_file)
    wait_for(lambda: launcher.searches_done(stats_file) >= seen + 3, "searches during the open write transaction")
    (control / "go").touch()
    writer.join(WAIT)
    assert writer.exitcode == 0
    seen = launcher.searches_done(stats_file)
    wait_for(lambda: launcher.searches_done(stats_file) >= seen + 2, "searches after the run")
    until.touch()
    reader.join(WAIT)
    assert reader.exitcode == 0
    stats = json.loads(stats_file.read_text())

    assert stats["failures"] == [] and stats["dangling"] == []
    assert stats["searches"] >= 8 and stats["checked_exact"] >= 2
    assert len(stats["generations"]) >= 3  # before the run, with the deletions, after the run
    with clipsearch.open(idx, create=False) as index:
        assert index.verify().ok and index.info()["images"] == 70


def test_a_reader_holding_faiss_from_before_a_deletion_never_returns_the_deleted_rows(tmp_path, tiny_checkpoint,
                                                                                       monkeypatch):
    """The race the generation check cannot close: a search that read the generation just before a writer's commit
    searches the old FAISS; its ids whose rows are gone must be dropped, not handed out."""
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    build(lib, idx, tiny_checkpoint, 12)
    reader = clipsearch.open(idx, create=False)
    stale = reader.vectors()
    everything = {h.path for h in reader.search("a picture", k=12)}
    assert len(everything) == 12
    for n in range(6):
        (lib / f"a{n:03d}.png").unlink()
    with clipsearch.open(idx) as writer:
        assert writer.index([lib], workers=0).removed == 6
    monkeypatch.setattr(reader, "vectors", lambda: stale)  # as if the generation was read before the commit
    hits = reader.search("a picture", k=12)
    assert {h.path for h in hits} == {str(lib / f"a{n:03d}.png") for n in range(6, 12)}
    with sqlite3.connect(idx / "clipsearch.db") as conn:
        alive = {row[0] for row in conn.execute("SELECT id FROM images")}
    assert {h.id for h in hits} <= alive
    reader.close()


def test_a_second_writer_is_refused_at_once_and_changes_nothing(tmp_path, launcher, tiny_checkpoint):
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    build(lib, idx, tiny_checkpoint, 6)
    for n in range(6, 12):
        picture(lib / f"a{n:03d}.png", n)
    first, control = paused_writer(launcher, lib, idx, tmp_path, "embed", 1)
    before = runs(idx)
    started = time.monotonic()
    second = launcher.run(["index", lib, "--index", idx, "--workers", "0"])
    took = time.monotonic() - started
    assert second.code == clipsearch.IndexBusy.exit_code
    assert len(second.lines()) == 1 and "is busy" in second.lines()[0]
    assert first.exitcode is None and took < 60  # it did not wait for the first writer
    assert runs(idx) == before                  # the refused writer recorded nothing
    (control / "go").touch()
    first.join(WAIT)
    assert first.exitcode == 0
    with clipsearch.open(idx, create=False) as index:
        assert index.verify().ok and index.info()["images"] == 12


def test_a_killed_writer_does_not_leave_the_index_locked(tmp_path, launcher, tiny_checkpoint):
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    build(lib, idx, tiny_checkpoint, 6)
    for n in range(6, 14):
        picture(lib / f"a{n:03d}.png", n)
    first, _control = paused_writer(launcher, lib, idx, tmp_path, "write", 2)  # holding the lock, mid-transaction
    os.kill(first.pid, signal.SIGKILL)
    first.join(WAIT)
    assert first.exitcode == -signal.SIGKILL
    second = launcher.run(["index", lib, "--index", idx, "--workers", "0"])
    assert second.code == 0, second.stderr
    assert second.stdout.startswith("8 embedded")  # the killed batch was rolled back, nothing else was lost
    with clipsearch.open(idx, create=False) as index:
        assert index.verify().ok and index.info()["images"] == 14


def test_a_search_that_saves_faiss_does_not_make_index_busy(tmp_path, launcher, tiny_checkpoint):
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    build(lib, idx, tiny_checkpoint, 6)
    picture(lib / "a100.png", 100)
    (idx / FAISS_NAME).unlink()  # the next search rebuilds it and saves it
    saving, scanning = tmp_path / "saving", tmp_path / "scanning"
    saving.mkdir()
    scanning.mkdir()
    search, _out, _err = launcher.start(["search", "a picture", "--index", idx],
                                        hook={"phase": "faiss-save", "at": 2, "action": "pause",
                                              "pause_dir": str(saving)})
    wait_for(lambda: (saving / "paused").exists() or search.exitcode is not None, "the search to save FAISS")
    writer = None
    try:
        writer, _out, err = launcher.start(["index", lib, "--index", idx, "--workers", "0"],
                                           hook={"phase": "scan", "at": 1, "action": "pause",
                                                 "pause_dir": str(scanning)})
        wait_for(lambda: (scanning / "paused").exists() or writer.exitcode is not None, "the writer to start")
        assert writer.exitcode is None, err.read_text()  # it got the write lock while the search was saving
    finally:
        (saving / "go").touch()
        (scanning / "go").touch()
        search.join(WAIT)
        if writer is not None:
            writer.join(WAIT)
    assert search.exitcode == 0 and writer.exitcode == 0
    with clipsearch.open(idx, create=False) as index:
        assert index.verify().ok and index.info()["images"] == 7
