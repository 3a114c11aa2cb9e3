"""Kill harness: SIGKILL `clipsearch index` at chosen instants and prove that nothing is lost (issue 6, item 1).

    python bench/crash_harness.py [--kills 20] [--seed 6] [--folder ../shared/data/photos] [--workers 1]

Each trial indexes the folder into a fresh index with the CLI, SIGKILLs it at one kill point, then runs `verify` and
`search` (both must pass), re-runs `index` (it must finish, embedding only what was not committed) and compares the result
with an uninterrupted run: same paths, vectors within 1e-4, every row committed before the kill kept as it was (same id,
same vector bytes), no image stored twice, and no decode worker left running. It prints one line per trial and exits 1 if
any trial found a problem. tests/test_crash.py runs a seeded sample of the same trials in CI.

A kill point is a phase and a count, drawn at random from a seed and spread over the phases:

- `scan`: at the k-th file stat of the folder scan
- `decode`: when the k-th decoded file reaches the parent while worker processes decode ahead
- `embed`: inside the k-th model call, its vectors computed but not yet stored
- `write`: before the k-th image row is written, mid-transaction (earlier rows of the batch are uncommitted)
- `commit`: a thread SIGKILLs the process racing the k-th COMMIT of a vector batch (a random 0-0.5 ms head start)
- `after-commit`: the k-th batch committed, the in-memory FAISS index not yet updated
- `faiss-save`: stage k of the final FAISS save: 1 half the body written, 2 file complete but not synced, 3 just renamed
- `timer`: from outside, at a random instant (0-0.2 s) after at least k images are committed

Every process (the killed run, verify, search, the re-run) is the real CLI, forked from a server process that imported
torch, open_clip and clipsearch once, so a trial costs its indexing work rather than a torch import (tens of seconds on a
busy machine). In-process hooks are installed only in the killed child; the code under test is not changed.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "clipsearch-tiny-ViT-32"
PHASES = ("scan", "decode", "embed", "write", "commit", "after-commit", "faiss-save", "timer")
MARKER = "CLIPSEARCH_HARNESS_TAG"  # set in every child's environment; decode workers inherit it
TOLERANCE = 1e-4
_PRELOAD = ["torch", "open_clip", "faiss", "clipsearch.cli", "clipsearch.index", "clipsearch.model", "crash_harness"]


# --------------------------------------------------------------------------------------------------- kill points


@dataclass(frozen=True)
class KillPoint:
    phase: str
    at: int
    delay: float = 0.0  # `timer`: seconds after `at` images are committed; `commit`: the killing thread's head start

    def __str__(self) -> str:
        return f"{self.phase}@{self.at}" + (f"+{self.delay * 1000:.1f}ms" if self.delay else "")


def kill_points(seed: int, count: int, images: int, batch_size: int) -> list[KillPoint]:
    """`count` points, phases taken in turn from a seeded shuffle (so any prefix spreads over the phases)."""
    rng = random.Random(seed)
    batches = math.ceil(images / batch_size)
    order = list(PHASES)
    rng.shuffle(order)
    points = []
    for n in range(count):
        phase = order[n % len(order)]
        if phase in ("scan", "decode", "write"):
            points.append(KillPoint(phase, rng.randint(1, images)))
        elif phase in ("embed", "after-commit"):
            points.append(KillPoint(phase, rng.randint(1, batches)))
        elif phase == "commit":
            points.append(KillPoint(phase, rng.randint(1, batches), round(rng.uniform(0, 0.0005), 6)))
        elif phase == "faiss-save":
            points.append(KillPoint(phase, rng.randint(1, 3)))
        else:  # timer: leave a third of the run so the kill lands before the run ends
            points.append(KillPoint(phase, rng.randint(1, images * 2 // 3), round(rng.uniform(0, 0.2), 3)))
    return points


# ------------------------------------------------------------------------------- hooks (run inside the child only)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def _pause(directory: str) -> None:
    """Tell the test we got here, then wait for its go-ahead (or for its SIGKILL)."""
    Path(directory, "paused").write_text(str(os.getpid()))
    while not Path(directory, "go").exists():
        time.sleep(0.01)


def _nth(k: int, act) -> Any:
    """A counter that runs `act` on its k-th call."""
    calls = [0]

    def tick() -> None:
        calls[0] += 1
        if calls[0] == k:
            act()
    return tick


def install_hook(phase: str, at: int, action: str = "kill", delay: float = 0.0, pause_dir: str = "") -> None:
    """Patch the point `phase`/`at` of this process so that reaching it SIGKILLs it (or pauses it, for the
    concurrency tests). Kill points are described in the module docstring."""
    from clipsearch import indexer, media, model, store, vectors  # noqa: F401 - patched below

    act = _die if action == "kill" else (lambda: _pause(pause_dir))
    tick = _nth(at, act)
    if phase == "scan":
        real_stat = media.stat_or_none
        media.stat_or_none = lambda path: (tick(), real_stat(path))[1]
    elif phase == "decode":
        real_decoded = indexer.Indexer._decoded

        def decoded(self, work, spec):
            for item in real_decoded(self, work, spec):
                tick()
                yield item
        indexer.Indexer._decoded = decoded
    elif phase == "embed":
        real_encode = model.ClipModel.encode_images

        def encode(self, *args, **kwargs):
            result = real_encode(self, *args, **kwargs)
            tick()
            return result
        model.ClipModel.encode_images = encode
    elif phase == "write":
        real_put = store.Store.put_image

        def put(self, *args, **kwargs):
            tick()
            return real_put(self, *args, **kwargs)
        store.Store.put_image = put
    elif phase == "commit":
        _hook_commit(at, delay, act if action != "kill" else None)
    elif phase == "after-commit":
        real_apply = indexer.Indexer._apply_to_faiss

        def apply(self, *args, **kwargs):
            tick()
            return real_apply(self, *args, **kwargs)
        indexer.Indexer._apply_to_faiss = apply
    elif phase == "faiss-save":
        _hook_faiss_save(at, act)
    else:
        raise ValueError(f"unknown phase {phase!r}")


def _hook_commit(at: int, delay: float, act) -> None:
    """The COMMIT that follows the at-th generation bump (every vector-changing transaction bumps it just before)."""
    from clipsearch import store

    armed = [0]
    real_bump = store.Store.bump_generation
    real_commit = store.Store._commit

    def bump(self, *args, **kwargs):
        armed[0] += 1
        return real_bump(self, *args, **kwargs)

    def commit(self):
        if armed[0] == at:
            armed[0] = -1
            if act is not None:
                act()
                return real_commit(self)
            threading.Thread(target=lambda: (time.sleep(delay), _die()), daemon=True).start()
            result = real_commit(self)
            time.sleep(30)  # the thread fires during or right after the COMMIT, before anything else happens
            return result
        return real_commit(self)
    store.Store.bump_generation = bump
    store.Store._commit = commit


def _hook_faiss_save(stage: int, act) -> None:
    """Stage 1: half of the FAISS body written to the temp file; 2: temp file complete, before fsync; 3: after rename."""
    def is_faiss(fd: int) -> bool:
        try:
            return ".faiss." in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return True  # no /proc: the only os.fdopen during an index run is the FAISS save

    if stage == 1:
        real_fdopen = os.fdopen

        class Torn:
            def __init__(self, handle):
                self.handle = handle

            def write(self, data):
                if len(data) > 1024:  # the body (magic, length and JSON header are small)
                    self.handle.write(data[: len(data) // 2])
                    self.handle.flush()
                    act()
                return self.handle.write(data)

            def __getattr__(self, name):
                return getattr(self.handle, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

        def fdopen(fd, *args, **kwargs):
            handle = real_fdopen(fd, *args, **kwargs)
            return Torn(handle) if is_faiss(fd) else handle
        os.fdopen = fdopen
    elif stage == 2:
        real_fsync = os.fsync

        def fsync(fd):
            if is_faiss(fd):
                act()
            return real_fsync(fd)
        os.fsync = fsync
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            result = real_replace(src, dst, *args, **kwargs)
            if str(dst).endswith(".faiss"):
                act()
            return result
        os.replace = replace


# ------------------------------------------------------------------------------------------------ child processes


def _cli_child(args: list[str], env: dict[str, str], hook: dict | None, out: str, err: str) -> None:
    """Target of a forked child: the real CLI, with stdout/stderr in files and an optional hook installed."""
    os.environ.update(env)
    for fd, name in ((1, out), (2, err)):
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    if hook:
        install_hook(**hook)
    from clipsearch.cli import cli

    cli.main(args=args, prog_name="clipsearch")


def _reader_child(index_dir: str, env: dict[str, str], until: str, out: str, text: str, k: int) -> None:
    """Target of a forked child: search from another process again and again until the file `until` exists.

    One Index stays open (a long-lived reader holding FAISS in memory), and every fifth search uses a fresh one. After
    each search the hits are checked against one SQLite read snapshot: an id whose row is missing there is a failure
    unless the store's generation moved since the search began (the row was deleted after it). When the generation did
    not move, the hits must be exactly the top of the committed vectors: the reader sees the last committed state."""
    os.environ.update(env)
    import numpy as np

    import clipsearch

    stats: dict[str, Any] = {"searches": 0, "failures": [], "dangling": [], "stale": 0, "checked_exact": 0,
                             "generations": set(), "fewer_than_k": 0}
    db_path = Path(index_dir) / "clipsearch.db"
    check = sqlite3.connect(db_path, timeout=30, isolation_level=None)

    def generation() -> int:
        return int(check.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    held = clipsearch.open(index_dir, create=False)
    query = held.encode_texts([text])[0]
    progress = Path(out + ".count")  # searches done so far, for a test that waits on them
    try:
        while not Path(until).exists():
            stats["searches"] += 1
            progress.write_text(str(stats["searches"] - 1))
            fresh = stats["searches"] % 5 == 0
            idx = clipsearch.open(index_dir, create=False) if fresh else held
            before = generation()
            try:
                hits = idx.search(text, k=k)
            except Exception as exc:  # noqa: BLE001 - any failure is what this reader exists to catch
                stats["failures"].append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                if fresh:
                    idx.close()
            check.execute("BEGIN")
            try:
                after = generation()
                rows = {r[0]: r[1] for r in check.execute(
                    "SELECT i.id, i.path FROM images i JOIN vectors v ON v.image_id = i.id WHERE i.status = 'ok'")}
                stored = None
                if after == before:
                    stored = [(r[0], np.frombuffer(r[1], dtype=np.float32)) for r in check.execute(
                        "SELECT image_id, vector FROM vectors")]
            finally:
                check.execute("COMMIT")
            stats["generations"].add(after)
            gone = [h.id for h in hits if rows.get(h.id) != h.path]
            if gone and after == before:
                stats["dangling"].append({"generation": after, "ids": gone})
            elif gone:
                stats["stale"] += 1
            if len(hits) < min(k, len(rows)):
                stats["fewer_than_k"] += 1
            if stored is not None and not gone:
                scores = sorted((float(v @ query) for _i, v in stored), reverse=True)[:k]
                if len(hits) != len(scores) or any(abs(h.score - s) > 1e-4 for h, s in zip(hits, scores)):
                    stats["failures"].append(f"generation {after}: hits are not the top {k} of the committed vectors")
                stats["checked_exact"] += 1
    finally:
        held.close()
        stats["generations"] = sorted(stats["generations"])
        Path(out).write_text(json.dumps(stats))


class Launcher:
    """Starts children forked from one server process that has imported torch, open_clip and clipsearch.

    The server never runs a torch operation, so forking it is safe (no thread pools exist yet)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {"HF_HUB_OFFLINE": "1", **env}
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(_PRELOAD)
        self._count = 0

    def _logs(self, name: str) -> tuple[Path, Path]:
        self._count += 1
        stem = self.workdir / f"{self._count:03d}-{name}"
        return stem.with_suffix(".out"), stem.with_suffix(".err")

    def start(self, args: list[str], *, hook: dict | None = None, tag: str = "",
              name: str = "cli") -> tuple[multiprocessing.Process, Path, Path]:
        out, err = self._logs(name)
        env = {**self.env, MARKER: tag or f"{os.getpid()}-{self._count}"}
        proc = self.context.Process(target=_cli_child, args=([str(a) for a in args], env, hook, str(out), str(err)))
        proc.start()
        return proc, out, err

    def run(self, args: list[str], *, timeout: float = 300, **kwargs) -> "Result":
        proc, out, err = self.start(args, **kwargs)
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise TimeoutError(f"clipsearch {' '.join(map(str, args))} did not finish in {timeout} s")
        return Result(proc.exitcode, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def start_reader(self, index_dir: Path, until: Path, text: str = "a photo", k: int = 20):
        """A `_reader_child`; returns the process and the JSON file its stats land in (`.count` beside it: progress)."""
        out, _err = self._logs("reader")
        proc = self.context.Process(target=_reader_child, args=(str(index_dir), self.env, str(until), str(out), text, k),
                                    daemon=True)
        proc.start()
        return proc, out

    @staticmethod
    def searches_done(out: Path) -> int:
        try:
            return int(Path(str(out) + ".count").read_text() or 0)
        except (OSError, ValueError):
            return 0


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """stderr lines that are ours (open_clip logs a 'randomly initialised' warning for a state_dict checkpoint)."""
        return [line for line in self.stderr.splitlines() if line.strip() and not line.startswith("WARNING:root:")]


def tagged_processes(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment carries MARKER=tag: a killed run's orphaned decode workers."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


# ------------------------------------------------------------------------------------------------------- checking


def stored_rows(index_dir: Path) -> dict[str, tuple[int, bytes]]:
    """path -> (id, vector bytes) of every embedded image; also checks no image is stored twice."""
    with sqlite3.connect(index_dir / "clipsearch.db", timeout=30) as conn:
        rows = conn.execute("SELECT i.path, i.id, v.vector FROM images i JOIN vectors v ON v.image_id = i.id "
                            "WHERE i.status = 'ok'").fetchall()
        images, vectors = conn.execute(
            "SELECT (SELECT count(*) FROM images WHERE status = 'ok'), (SELECT count(*) FROM vectors)").fetchone()
    paths = {path for path, _i, _v in rows}
    if len(paths) != len(rows) or images != len(rows) or vectors != len(rows):
        raise AssertionError(f"{index_dir}: {len(rows)} vector rows for {len(paths)} paths, {images} images, "
                             f"{vectors} vectors: an image is stored twice or a vector has no image")
    conn.close()
    return {path: (image_id, blob) for path, image_id, blob in rows}


@dataclass
class Trial:
    point: KillPoint
    committed: int = 0          # embedded images committed when the run died
    embedded_after: int = 0     # images the re-run embedded
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # temp files the kill left in the index directory
    problems: list[str] = field(default_factory=list)


class Harness:
    """Runs kill trials on one folder against one uninterrupted reference run."""

    def __init__(self, launcher: Launcher, folder: Path, checkpoint: Path, workdir: Path, *, batch_size: int = 8,
                 workers: int = 1) -> None:
        self.launcher = launcher
        self.folder = Path(folder)
        self.checkpoint = Path(checkpoint)
        self.workdir = Path(workdir)
        self.batch_size = batch_size
        self.workers = workers
        self.reference: dict[str, tuple[int, bytes]] = {}

    def index_args(self, index_dir: Path, first: bool = True) -> list[str]:
        args = ["index", self.folder, "--index", index_dir, "--batch-size", self.batch_size, "--workers", self.workers]
        return args + (["--model", TINY_MODEL, "--pretrained", self.checkpoint] if first else [])

    def build_reference(self) -> dict[str, tuple[int, bytes]]:
        index_dir = self.workdir / "reference"
        result = self.launcher.run(self.index_args(index_dir))
        if result.code != 0:
            raise RuntimeError(f"the uninterrupted run failed ({result.code}): {result.stderr[-2000:]}")
        self.reference = stored_rows(index_dir)
        return self.reference

    def trial(self, number: int, point: KillPoint) -> Trial:
        import numpy as np

        trial = Trial(point)
        started = time.monotonic()
        index_dir = self.workdir / f"trial-{number:02d}"
        tag = f"{os.getpid()}-trial-{number}"
        problems = trial.problems
        hook = None if point.phase == "timer" else {"phase": point.phase, "at": point.at, "delay": point.delay}
        proc, _out, err = self.launcher.start(self.index_args(index_dir), hook=hook, tag=tag, name=f"kill-{number}")
        if point.phase == "timer":
            self._kill_after_commits(proc, index_dir / "clipsearch.db", point)
        proc.join(300)
        if proc.exitcode != -signal.SIGKILL:
            problems.append(f"the run was not killed at {point} (exit {proc.exitcode}): {err.read_text()[-300:]}")
            return trial
        deadline = time.monotonic() + 20
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        if tagged_processes(tag):
            problems.append(f"processes of the killed run still running 20 s later: {tagged_processes(tag)}")
        trial.leftovers = sorted(p.name for p in index_dir.iterdir() if p.name.endswith(".tmp"))
        before = stored_rows(index_dir)
        trial.committed = len(before)

        verify = self.launcher.run(["verify", "--index", index_dir])
        if verify.code != 0 or not verify.stdout.startswith("ok"):
            problems.append(f"verify after the kill: exit {verify.code}: {verify.lines()}")
        trial.notices = verify.lines()
        if any("\n" in n for n in trial.notices) or len(trial.notices) > 1:
            problems.append(f"verify said more than one line: {trial.notices}")
        search = self.launcher.run(["search", "a photo", "--index", index_dir, "-k", "5", "--json"])
        if search.code != 0:
            problems.append(f"search after the kill: exit {search.code}: {search.lines()}")
        else:
            hits = json.loads(search.stdout)
            if len(hits) != min(5, trial.committed):
                problems.append(f"search after the kill gave {len(hits)} hits for {trial.committed} committed images")
            if any(before.get(h["path"], (None,))[0] != h["id"] for h in hits):
                problems.append("search after the kill returned an id that is not a committed row")

        rerun = self.launcher.run(self.index_args(index_dir, first=False))
        if rerun.code != 0:
            problems.append(f"the re-run failed: exit {rerun.code}: {rerun.lines()[-3:]}")
            return trial
        trial.embedded_after = int(rerun.stdout.split(" embedded", 1)[0].strip() or -1)
        after = stored_rows(index_dir)
        if sorted(after) != sorted(self.reference):
            problems.append(f"the final index holds {len(after)} images, the uninterrupted run {len(self.reference)}")
        else:
            worst = max(float(np.abs(np.frombuffer(after[p][1], np.float32)
                                     - np.frombuffer(self.reference[p][1], np.float32)).max()) for p in after)
            if worst > TOLERANCE:
                problems.append(f"vectors differ from the uninterrupted run by up to {worst:.3g}")
        changed = [p for p, row in before.items() if after.get(p) != row]
        if changed:
            problems.append(f"{len(changed)} images committed before the kill were changed or re-embedded")
        if trial.embedded_after + trial.committed != len(self.reference):
            copies = len(self.reference) - trial.committed - trial.embedded_after
            if copies < 0 or f"{copies} copied" not in rerun.stdout:
                problems.append(f"the re-run embedded {trial.embedded_after} images; {trial.committed} of "
                                f"{len(self.reference)} were already committed ({rerun.stdout.strip()})")
        final = self.launcher.run(["verify", "--index", index_dir])
        if final.code != 0 or final.lines():
            problems.append(f"verify after the re-run: exit {final.code}: {final.lines()}")
        trial.seconds = time.monotonic() - started
        return trial

    def _kill_after_commits(self, proc: multiprocessing.Process, db: Path, point: KillPoint) -> None:
        deadline = time.monotonic() + 300
        while proc.is_alive() and time.monotonic() < deadline:
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                    if conn.execute("SELECT count(*) FROM vectors").fetchone()[0] >= point.at:
                        break
            except sqlite3.Error:
                pass  # not created yet
            time.sleep(0.01)
        time.sleep(point.delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)


def count_images(folder: Path) -> int:
    from clipsearch import media

    return sum(1 for _ in media.iter_images(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--folder", type=Path, default=REPO.parent / "shared" / "data" / "photos")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp one)")
    options = parser.parse_args(argv)

    import tempfile

    import torch

    from clipsearch import model as model_room

    with tempfile.TemporaryDirectory(prefix="crash-harness-") as tmp:
        work = options.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_room.register_project_configs()
        import open_clip

        torch.manual_seed(0)
        checkpoint = work / "tiny.pt"
        torch.save(open_clip.create_model(TINY_MODEL, pretrained=None).state_dict(), checkpoint)
        launcher = Launcher(work / "logs", {"CLIPSEARCH_HOME": str(work / "home")})
        harness = Harness(launcher, options.folder, checkpoint, work, batch_size=options.batch_size,
                          workers=options.workers)
        started = time.monotonic()
        reference = harness.build_reference()
        print(f"uninterrupted run: {len(reference)} images in {time.monotonic() - started:.1f} s", flush=True)
        points = kill_points(options.seed, options.kills, len(reference), options.batch_size)
        failed = 0
        for number, point in enumerate(points, 1):
            trial = harness.trial(number, point)
            failed += bool(trial.problems)
            print(f"{number:2d} {str(point):24} committed {trial.committed:3d}  re-run embedded "
                  f"{trial.embedded_after:3d}  {trial.seconds:5.1f} s  "
                  f"{'; '.join(trial.notices) or '-'}  leftovers {trial.leftovers or '-'}  "
                  f"{'PROBLEMS: ' + ' | '.join(trial.problems) if trial.problems else 'ok'}", flush=True)
        print(f"{len(points) - failed} of {len(points)} kills survived in {time.monotonic() - started:.0f} s")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import crash_harness  # the children must find this code under its module name, not as __main__

    sys.exit(crash_harness.main())
