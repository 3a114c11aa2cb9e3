"""The DESIGN invariant: killing the indexer at any instant loses nothing committed, and running it again finishes."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import clipsearch
from conftest import TINY_MODEL, shared


def committed(db) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return 0


def stored(index_dir) -> dict[str, np.ndarray]:
    conn = sqlite3.connect(index_dir / "clipsearch.db")
    rows = conn.execute("SELECT i.path, v.vector FROM images i JOIN vectors v ON v.image_id = i.id").fetchall()
    assert len(rows) == len({path for path, _ in rows}), "an image is stored twice"
    return {path: np.frombuffer(blob, dtype=np.float32) for path, blob in rows}


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_checkpoint):
    photos = shared("photos")
    reference = tmp_path / "reference"
    with clipsearch.open(reference, model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=0)
    idx_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "clipsearch", "index", str(photos), "--index", str(idx_dir),
               "--model", TINY_MODEL, "--pretrained", str(tiny_checkpoint), "--batch-size", "8"]
    for kill_after in (8, 64):  # rows committed before the kill: early in the run, and past the middle
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while committed(idx_dir / "clipsearch.db") < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        check = subprocess.run([sys.executable, "-m", "clipsearch", "verify", "--index", str(idx_dir)],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stderr
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    want, got = stored(reference), stored(idx_dir)
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[p] - want[p]).max()) for p in want) < 1e-4
    with clipsearch.open(idx_dir, create=False) as idx:
        assert idx.verify().ok and len(idx.search("a dog", k=5)) == 5
