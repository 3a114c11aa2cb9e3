"""Killed at any instant (issue 6, item 1): a seeded sample of bench/crash_harness.py's kill points, run in CI.

The full 20-kill run is `python bench/crash_harness.py` (minutes; see bench/README.md). Each trial here is what the
harness does: SIGKILL `clipsearch index` on ../shared/data/photos at one point, then `verify` and `search` must pass,
`index` again must finish, and the result must equal an uninterrupted run (same paths, vectors within 1e-4), keep every row
committed before the kill as it was, store no image twice, and leave no decode worker running.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, TINY_MODEL, shared

sys.path.insert(0, str(REPO / "bench"))
import crash_harness as harness  # noqa: E402

SEED = 6
PHOTOS = 146
SAMPLE_PHASES = ("decode", "embed", "write", "commit", "faiss-save")  # the instants the issue names


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> harness.Launcher:
    work = tmp_path_factory.mktemp("crash")
    return harness.Launcher(work / "logs", {"CLIPSEARCH_HOME": str(work / "home")})


def small_folder(folder: Path, count: int) -> Path:
    """Enough files for the indexer to start decode worker processes (more than 2 chunks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        Image.new("RGB", (96, 64), (n * 20 % 256, 90, 160)).save(folder / f"{n:02d}.png")
    return folder


def test_kill_points_are_seeded_and_spread_over_every_phase():
    points = harness.kill_points(SEED, 20, PHOTOS, 8)
    assert points == harness.kill_points(SEED, 20, PHOTOS, 8) != harness.kill_points(SEED + 1, 20, PHOTOS, 8)
    assert {p.phase for p in points} == set(harness.PHASES)
    assert {p.phase for p in points[:len(harness.PHASES)]} == set(harness.PHASES)
    for p in points:
        limit = {"embed": 19, "after-commit": 19, "commit": 19, "faiss-save": 3, "timer": PHOTOS * 2 // 3}
        assert 1 <= p.at <= limit.get(p.phase, PHOTOS), p


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sampled_kills_lose_nothing(tmp_path, launcher, tiny_checkpoint):
    photos = shared("photos")
    runs = harness.Harness(launcher, photos, tiny_checkpoint, tmp_path, batch_size=8, workers=1)
    assert len(runs.build_reference()) == PHOTOS
    points = harness.kill_points(SEED, 20, PHOTOS, 8)
    sample = [next(p for p in points if p.phase == phase) for phase in SAMPLE_PHASES]
    trials = [runs.trial(n, point) for n, point in enumerate(sample, 1)]
    assert [(str(t.point), t.problems) for t in trials if t.problems] == []
    assert any(0 < t.committed < PHOTOS for t in trials)  # some kills landed mid-run, with work left to finish
    assert all(t.committed + t.embedded_after <= PHOTOS for t in trials)


def test_a_killed_run_leaves_no_decode_worker_running(tmp_path, launcher, tiny_checkpoint):
    folder = small_folder(tmp_path / "lib", 24)
    tag = f"{os.getpid()}-orphans"
    proc, _out, err = launcher.start(["index", folder, "--index", tmp_path / "idx", "--model", TINY_MODEL,
                                      "--pretrained", tiny_checkpoint, "--workers", "2", "--batch-size", "4"],
                                     hook={"phase": "embed", "at": 2}, tag=tag)
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL, err.read_text()
    deadline = time.monotonic() + 15
    while harness.tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert harness.tagged_processes(tag) == []


def test_a_kill_during_the_faiss_save_leaves_no_temp_file_behind(tmp_path, launcher, tiny_checkpoint):
    folder = small_folder(tmp_path / "lib", 4)
    args = ["index", folder, "--index", tmp_path / "idx", "--workers", "0"]
    killed = launcher.start(args + ["--model", TINY_MODEL, "--pretrained", tiny_checkpoint],
                            hook={"phase": "faiss-save", "at": 2})[0]
    killed.join(300)
    assert killed.exitcode == -signal.SIGKILL
    assert launcher.run(args).code == 0
    assert sorted(p.name for p in (tmp_path / "idx").iterdir() if p.name.endswith(".tmp")) == []
