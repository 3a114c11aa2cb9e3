"""The `indexer` room: scan -> diff against the store -> decode in worker processes -> embed in batches -> commit.

Incremental by design: unchanged files (size + mtime) cost one stat; moved or copied files take their vector from the row
with the same content fingerprint; only new or changed pixels reach the model, in batches split over the model's
streams (model.EncodeStreams), one running while the next is queued. Each batch commits in one transaction, so a kill
loses at most those two. Progress goes to a callback; nothing here prints.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from . import media
from .cores import usable_cores
from .errors import BadInput, NotAnIndex
from .media import Decoded, PreprocessSpec
from .model import ClipModel, EncodeStreams
from .store import Store
from .vectors import VectorIndex

CHUNK = 4  # paths per worker task: amortises inter-process overhead without starving the batcher
STARVED_AFTER = 1.0  # seconds the model may wait idle for one chunk from lowered workers before they are replaced
STARVED_POLL = 0.1
FIRST_BATCH = 8
"""The first batch is this small, so the model starts after 8 decodes instead of a whole batch's (ViT-B-32 on 2 cores
embeds as many images/s at batch 8 as at 32); the rest use the batch size."""
READ_AHEAD_WHILE_LOADING = 48 << 20
"""Bytes of decoded pixels the workers may hold ready while the model loads (ViT-B-32: 80 chunks, 320 images). On 2
cores the load keeps one core busy for 2-3 s; the other decodes meanwhile, and the usual window (72 images) filled
within the first second."""
UNSTORABLE = "path is not valid UTF-8: rename the file or its folder to index it"
RETRIED = ("permission denied", "file not found", "out of memory")
"""Error reasons (media's) that say nothing about the file's content: such a file is tried again on every run, since
fixing them (chmod, freeing memory) leaves its size and mtime as they were."""


@dataclass
class Progress:
    """One progress report. `phase` is 'model' (loading it; `path` names it), 'scan', 'embed' or 'done'; counts are
    cumulative for the run."""

    phase: str
    done: int = 0
    total: int = 0
    path: str | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class IndexReport:
    """What a run did; also recorded in the `runs` table."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    copied: int = 0
    removed: int = 0
    unchanged: int = 0
    errors: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0  # of `seconds`, spent waiting for the model to load (see DeferredModel)
    embedded: int = 0
    captions: int = 0  # sidecar captions added
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        """The embedding rate, not counting the wait for the model."""
        busy = self.seconds - self.model_seconds
        return self.embedded / busy if busy > 0 else 0.0


@dataclass
class _Work:
    """A file that needs pixels: new, changed, or a previous error whose file changed."""

    path: str
    root: str
    size: int
    mtime_ns: int
    fingerprint: str

    def row(self, status: str = "ok", error: str | None = None, **facts) -> dict:
        """The images row for this file: what the scan knows plus what decoding (or a copied row) adds."""
        facts = {"width": None, "height": None, "taken": None, "format": None, **facts}
        return {"path": self.path, "root": self.root, "size": self.size, "mtime_ns": self.mtime_ns,
                "fingerprint": self.fingerprint or None, "status": status, "error": error, **facts}


@dataclass
class _Batch:
    """Images handed to the model (their vectors to come) and the failures committed with them."""

    images: list[tuple[_Work, Decoded]]
    failed: list[tuple[_Work, str]]
    vectors: Callable[[], np.ndarray] | None  # waits for them


class _DecodedForAnotherModel(Exception):
    """The pixels decoded so far do not suit the model that loaded meanwhile (see Indexer._embed)."""


@dataclass
class _Plan:
    work: list[_Work] = field(default_factory=list)
    gone: dict[str, int] = field(default_factory=dict)       # path -> id of rows whose file vanished from a live root
    orphans: dict[int, str] = field(default_factory=dict)    # id -> path of rows whose root is missing (move sources only)
    new_files: list[tuple[str, str, os.stat_result]] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    unstorable: set[str] = field(default_factory=set)      # paths stored escaped: recorded as errors, never decoded


class DeferredModel:
    """The model of an indexing run, loaded only once some file needs pixels, and then in a background thread while
    the first files decode.

    A run that finds nothing to embed never imports torch (ViT-B-32 here: a run over 146 unchanged photos took 20 s,
    15 of them loading the model); one that does overlaps the load with decoding. The preprocessing and dimension
    come from the index, so decoding need not wait. `begin` runs in the caller's thread when loading starts (checks,
    progress) and returns the loader, which runs in the thread and must not touch the store; `adopt` gets the loaded
    model back in the caller's thread (identity checks, records) and returns it. The thread is a daemon: an interrupted
    run does not wait for the load (Ctrl-C used to stop it mid-import at once, and still should).

    A new index has no preprocessing recorded yet: it starts from what the model's config implies
    (model.config_preprocess), and `preprocess` and `dim` are the loaded model's once it is adopted; the indexer
    decodes again if they differ."""

    def __init__(self, preprocess: PreprocessSpec, dim: int, begin: Callable[[], Callable[[], ClipModel]],
                 adopt: Callable[[ClipModel], ClipModel]) -> None:
        self._preprocess = preprocess
        self._dim = dim
        self._begin = begin
        self._adopt = adopt
        self._thread: threading.Thread | None = None
        self._loaded: ClipModel | None = None
        self._error: BaseException | None = None
        self._model: ClipModel | None = None
        self.waited = 0.0  # seconds get() spent waiting for the load

    @classmethod
    def ready(cls, model: ClipModel) -> "DeferredModel":
        """An already loaded model."""
        deferred = cls(model.preprocess, model.dim, lambda: lambda: model, lambda m: m)
        deferred._model = model
        return deferred

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._model.preprocess if self._model is not None else self._preprocess

    @property
    def dim(self) -> int:
        return self._model.dim if self._model is not None else self._dim

    @property
    def loading(self) -> bool:
        """Whether the load runs in the background now (decoding may then read further ahead: see Indexer._decoded)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def on_cpu(self) -> bool:
        """Whether the model is loaded and runs on the CPU (False while it loads)."""
        model = self._model or self._loaded
        return model is not None and model.on_cpu

    @property
    def started(self) -> bool:
        return self._model is not None or self._thread is not None

    def start(self) -> None:
        """Begin loading in the background (once)."""
        if self.started:
            return
        load = self._begin()

        def run() -> None:
            try:
                self._loaded = load()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by get()
                self._error = exc

        self._thread = threading.Thread(target=run, name="clipsearch-model-load", daemon=True)  # see Index.index
        self._thread.start()

    def get(self) -> ClipModel:
        """The model, waiting for the load if it runs; the loader's exception is raised here."""
        if self._model is None:
            self.start()
            assert self._thread is not None
            started = time.monotonic()
            self._thread.join()
            self.waited += time.monotonic() - started
            if self._error is not None:
                raise self._error
            assert self._loaded is not None
            self._model = self._adopt(self._loaded)
        return self._model

    def join(self) -> None:
        """Wait for a load in flight, adopting nothing: no thread outlives the run that started it."""
        if self._thread is not None:
            self._thread.join()


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Shut ``pool`` down and end its workers now, busy or not. ProcessPoolExecutor has no public way to (Python 3.14
    adds one), hence its private fields. A worker ended while it sends its result leaves the pool's reader waiting for
    the rest, and interpreter exit waiting on that reader, for as long as a write end of the result pipe is open
    anywhere: this process holds one, closed here, so the reader gets end-of-file and the pool gives up as broken."""
    workers = list(getattr(pool, "_processes", None) or {})
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for pid in workers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if writer is not None:
        writer.close()


class DecodeWorkers:
    """The decode processes of one indexing run. They start on first use, or earlier through `start`: each is a new
    interpreter importing `media` (0.17-0.22 s here), which can overlap the model's load instead of delaying the
    first batch. `close` ends them; it is safe to call more than once.

    Beside a model on the CPU, and beside a model's load, the workers lower themselves to the lowest priority
    (media.yield_cpu_to_the_model); `lowered` says some were told to. `stop_yielding` replaces them with new ones at
    the run's own priority, for good, when they starve. Workers lowered for the load of a model that then runs on a
    GPU stay lowered: on cores nothing else wants, nice 19 costs nothing, while replacing them would throw away what
    they were decoding."""

    def __init__(self, count: int | None = None) -> None:
        if count is not None and count < 0:
            raise BadInput("--workers must be 0 or more")
        self.count = default_workers() if count is None else count
        self._yielding = True
        self.lowered = False
        self._pool: ProcessPoolExecutor | None = None
        self._retired: list[ProcessPoolExecutor] = []

    def start(self) -> None:
        if self.count and self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=media.init_worker, initargs=(os.getpid(),))
            for _ in range(self.count):  # the executor starts a process per task submitted while none is idle
                self._pool.submit(os.getpid)

    @property
    def pool(self) -> ProcessPoolExecutor:
        self.start()
        assert self._pool is not None, "no decode workers (count 0)"
        return self._pool

    def decode(self, paths: list[str], spec: PreprocessSpec, beside_the_model: bool) -> Future:
        """Decode ``paths`` in a worker (media.decode_many), which first lowers itself when it runs beside a model on
        the CPU or beside a model's load, and the workers still yield."""
        lower = self._yielding and beside_the_model
        self.lowered = self.lowered or lower
        return self.pool.submit(media.decode_many, paths, spec, lower)

    def stop_yielding(self) -> None:
        """Decode at the run's own priority from now on. Lowered workers cannot come back up, so new ones take over,
        and the old ones are ended: what they were decoding, starved, is sent again to the new ones."""
        self._yielding = self.lowered = False
        if self._pool is not None:
            _end_workers(self._pool)
            self._retired.append(self._pool)
            self._pool = None

    def close(self) -> None:
        for pool in [*self._retired, *([self._pool] if self._pool is not None else [])]:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._retired = None, []


class Indexer:
    """Brings an index up to date with a set of root folders."""

    def __init__(self, store: Store, vectors: VectorIndex, model: DeferredModel, *, batch_size: int = 32,
                 workers: int | DecodeWorkers | None = None, progress: ProgressCallback | None = None) -> None:
        if batch_size < 1:
            raise BadInput("--batch-size must be at least 1")
        self.decoders = workers if isinstance(workers, DecodeWorkers) else DecodeWorkers(workers)
        self.store = store
        self.vectors = vectors
        self.model = model
        self.batch_size = batch_size
        self.progress = progress or (lambda _p: None)
        self.report = IndexReport()
        self._encode_streams: EncodeStreams | None = None
        self._committed = 0  # files of this run whose batch is committed (progress)

    # planning -----------------------------------------------------------------------------------------------------
    def _plan(self, roots: Sequence[str]) -> _Plan:
        plan = _Plan()
        scanned = 0
        retry = {row["path"] for row in self.store.errors() if str(row["error"] or "").startswith(RETRIED)}
        for root in roots:
            if not os.path.exists(root):
                self._warn(f"{root} is missing (unplugged drive?): nothing under it was deleted")
                self._orphans_under(root, plan)
                self.store.touch_root(root, "missing")
                continue
            known = self.store.states_under(root)
            found: dict[str, os.stat_result] = {}
            unreadable: list[str] = []       # folders (and, from iter_images, the odd entry) that could not be listed
            unstatable: set[str] = set()     # files listed but out of reach

            def cannot_read(path: str, why: str) -> None:
                unreadable.append(_storable(path))
                self._warn(f"cannot read folder {path}: {why} (nothing under it was deleted)")
            try:
                for path in media.iter_images(root, on_error=cannot_read):
                    st = media.stat_or_none(path)
                    key = _storable(path)
                    if key != path:
                        plan.unstorable.add(key)
                    if st is not None:
                        found[key] = st
                    elif why := _stat_problem(path):  # listed, out of reach: path over PATH_MAX, folder without x
                        unstatable.add(key)
                        self._warn(f"cannot read file {path}: {why} (its row, if any, was kept)")
                    scanned += 1
                    if scanned % 500 == 0:
                        self.progress(Progress("scan", scanned))
            except FileNotFoundError:
                found = {}  # unplugged mid-scan: treated below like an emptied root, so nothing is deleted
            if not found and not known:
                self._warn(f"no images found under {root}")
            if not found and known:
                self._warn(f"{root} holds no images now but the index has {len(known)} from it "
                           f"(drive not mounted?): nothing was deleted")
                self._orphans_under(root, plan)
                self.store.touch_root(root, "empty")
                continue
            self.store.touch_root(root, "ok")
            for path, st in found.items():
                state = known.get(path)
                if state is None:
                    plan.new_files.append((path, root, st))
                elif state.size != st.st_size or state.mtime_ns != st.st_mtime_ns or path in retry:
                    plan.changed.add(path)
                    plan.work.append(_Work(path, root, st.st_size, st.st_mtime_ns, ""))
                else:
                    self.report.unchanged += 1
            for path, state in known.items():
                if path not in found and path not in unstatable and not _under_any(path, unreadable):  # unlisted: kept
                    plan.gone[path] = state.id
        for known_root in self.store.roots():
            if known_root["path"] not in roots and not os.path.exists(known_root["path"]):
                self._orphans_under(known_root["path"], plan)
        self.progress(Progress("scan", scanned, scanned))
        return plan

    def _orphans_under(self, root: str, plan: _Plan) -> None:
        for path, state in self.store.states_under(root).items():
            if state.status == "ok":
                plan.orphans[state.id] = path

    def _warn(self, message: str) -> None:
        self.report.warnings.append(_storable(message))

    # moves and copies ---------------------------------------------------------------------------------------------
    def _reuse(self, plan: _Plan) -> None:
        """New files whose content is already embedded take that vector instead of going through the model."""
        if not self.store.has_vectors():  # a first run cannot reuse anything: skip reading every file's samples
            plan.work += [_Work(path, root, st.st_size, st.st_mtime_ns, "") for path, root, st in plan.new_files]
            return
        prints = {path: fp for path, _root, _st in plan.new_files
                  if path not in plan.unstorable and (fp := _fingerprint_or_empty(path))}
        candidates = self.store.rows_with_fingerprints(prints.values())
        gone_ids = set(plan.gone.values())
        moved_ids: set[int] = set()
        with self.store.transaction():
            for path, root, st in plan.new_files:
                fp = prints.get(path, "")
                rows = candidates.get(fp, [])
                source = next((r for r in rows if r["id"] not in moved_ids and
                               (r["id"] in gone_ids or r["id"] in plan.orphans)), None)
                if source is not None:
                    moved_ids.add(source["id"])
                    self.store.move_image(source["id"], path, root, st.st_size, st.st_mtime_ns)
                    plan.gone.pop(source["path"], None)
                    self.report.moved += 1
                    continue
                work = _Work(path, root, st.st_size, st.st_mtime_ns, fp)
                vector = self.store.vector(rows[0]["id"]) if rows else None
                if vector is not None:
                    facts = {k: rows[0][k] for k in ("width", "height", "taken", "format")}
                    self._added_vector_ids.append((self.store.put_image(work.row(**facts), vector), vector))
                    self.report.copied += 1
                    continue
                plan.work.append(work)
            if self._added_vector_ids:
                self.store.bump_generation()
        self._apply_to_faiss(removed=[])

    # embedding ----------------------------------------------------------------------------------------------------
    def _decoded(self, work: list[_Work], spec: PreprocessSpec) -> Iterator[tuple[_Work, Decoded | None, str | None]]:
        """Decoded files in order, from worker processes with a bounded read-ahead (memory stays flat)."""
        if self.decoders.count == 0 or len(work) <= 2 * CHUNK:  # starting processes would cost more than it saves
            for item in work:
                _path, decoded, error = media.decode(item.path, spec)
                yield item, decoded, error
            return
        chunks = [work[i:i + CHUNK] for i in range(0, len(work), CHUNK)]
        window = max(2, (2 * self.batch_size) // CHUNK + self.decoders.count)
        window_while_loading = max(window, READ_AHEAD_WHILE_LOADING // (CHUNK * 3 * spec.size[0] * spec.size[1]))
        pending: deque[tuple[list[_Work], Future]] = deque()
        next_chunk = 0

        def send(chunk: list[_Work]) -> Future:
            return self.decoders.decode([w.path for w in chunk], spec, self.model.on_cpu or self.model.loading)

        try:
            while pending or next_chunk < len(chunks):
                while next_chunk < len(chunks) and \
                        len(pending) < (window_while_loading if self.model.loading else window):
                    pending.append((chunks[next_chunk], send(chunks[next_chunk])))
                    next_chunk += 1
                if self.decoders.lowered and self._starved(pending[0][1]):
                    self.decoders.stop_yielding()  # cancels what the old workers had not started: send it again
                    pending = deque((chunk, send(chunk)) for chunk, _future in pending)
                chunk, future = pending.popleft()
                for item, (_path, decoded, error) in zip(chunk, future.result()):
                    yield item, decoded, error
        finally:
            for _chunk, future in pending:
                future.cancel()

    def _embed_all(self, plan: _Plan) -> None:
        try:
            self._embed(plan, self.model.preprocess)
        except _DecodedForAnotherModel:  # nothing was committed: the first batch waits for the model
            if self.vectors.dim != self.model.dim:
                self.vectors = VectorIndex(self.model.dim)
            self._embed(plan, self.model.preprocess)

    def _embed(self, plan: _Plan, spec: PreprocessSpec) -> None:
        """Decode with ``spec`` and embed. Decoding may begin before the model has loaded, with the preprocessing the
        index records or (a new index) the one its config implies; the first batch raises _DecodedForAnotherModel
        when the loaded model wants other pixels or another dimension."""
        total = len(plan.work)
        batch: list[tuple[_Work, Decoded]] = []
        failed = [(item, UNSTORABLE) for item in plan.work if item.path in plan.unstorable]
        decodable = [w for w in plan.work if w.path not in plan.unstorable]
        if decodable:
            self.model.start()  # loads while the first files decode
        self.progress(Progress("embed", 0, total))
        size = min(self.batch_size, FIRST_BATCH)
        running: deque[_Batch] = deque()  # submitted to the model, committed in this order
        for item, decoded, error in self._decoded(decodable, spec):
            if decoded is None:
                failed.append((item, error or "unreadable"))
            else:
                batch.append((item, decoded))
            if len(batch) >= size:
                while len(running) >= 2:  # one batch running, one queued behind it: commit the oldest first
                    self._commit(running.popleft(), plan, total)
                running.append(self._submit(batch, failed, spec))
                batch, failed, size = [], [], self.batch_size
        if batch or failed:
            running.append(self._submit(batch, failed, spec))
        while running:
            self._commit(running.popleft(), plan, total)

    def _starved(self, chunk: Future) -> bool:
        """Whether the model sat idle for STARVED_AFTER seconds waiting for ``chunk`` from lowered workers: other
        programs are keeping the cores busy, and beside them a worker at nice 19 gets almost nothing (beside two busy
        loops on 2 cores, indexing ran at 1.6-1.7 images/s against 16.2-16.8 at equal priority). While the model
        loads, waiting counts too: workers lowered for the load that get nothing are replaced before it ends."""
        idle_since: float | None = None
        while not wait([chunk], timeout=STARVED_POLL).done:
            if self._encode_streams is not None and self._encode_streams.busy:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= STARVED_AFTER:
                return True
        return False

    def _streams(self) -> EncodeStreams:
        """The model's encode streams, started with the first batch (after the model's load)."""
        if self._encode_streams is None:
            self._encode_streams = EncodeStreams(self.model.get())
        return self._encode_streams

    def _submit(self, batch: list[tuple[_Work, Decoded]], failed: list[tuple[_Work, str]],
                spec: PreprocessSpec) -> _Batch:
        vectors = None
        if batch:
            streams = self._streams()
            if self.model.preprocess != spec or self.model.dim != self.vectors.dim:
                raise _DecodedForAnotherModel
            pixels = np.stack([decoded.pixels for _item, decoded in batch])
            vectors = streams.submit(media.to_model_input(pixels, spec))
        return _Batch(batch, failed, vectors)

    def _commit(self, done: _Batch, plan: _Plan, total: int) -> None:
        """Store one batch's vectors and errors in one transaction, once its stream has them."""
        batch, failed = done.images, done.failed
        vectors = done.vectors() if done.vectors is not None else []  # a batch of failures only
        replaced: list[int] = []
        with self.store.transaction():
            for (item, decoded), vector in zip(batch, vectors):
                item.fingerprint = item.fingerprint or _fingerprint_or_empty(item.path)
                if not _as_scanned(item):  # rewritten while we read it: which content these pixels are is unknown
                    item.fingerprint = ""  # so no copy may take this vector; the stored stat makes the next run redo it
                image_id = self.store.put_image(item.row(width=decoded.width, height=decoded.height,
                                                         taken=decoded.taken, format=decoded.format), vector)
                if item.path in plan.changed:  # its old vector leaves FAISS in _apply_to_faiss
                    self.report.updated += 1
                else:
                    self.report.added += 1
                self._added_vector_ids.append((image_id, vector))
            for item, reason in failed:
                image_id = self.store.put_image(item.row("error", reason), None)
                replaced.append(image_id)  # a changed file that now fails loses its old vector
                self.report.errors += 1
            self.store.bump_generation()
        self.report.embedded += len(batch)
        self._apply_to_faiss(removed=replaced)
        self._committed += len(batch) + len(failed)
        last = batch[-1][0].path if batch else None
        self.progress(Progress("embed", self._committed, total, last))

    def _apply_to_faiss(self, removed: list[int]) -> None:
        """Mirror the committed change in the in-memory FAISS index (saved once at the end of the run)."""
        self.vectors.remove(np.asarray(removed, dtype=np.int64))
        if self._added_vector_ids:
            ids = np.asarray([i for i, _v in self._added_vector_ids], dtype=np.int64)
            self.vectors.remove(ids)
            self.vectors.add(ids, np.stack([v for _i, v in self._added_vector_ids]))
        self._added_vector_ids = []
        self.vectors.generation = self.store.generation

    def _remove_gone(self, plan: _Plan) -> None:
        ids = list(plan.gone.values())
        if not ids:
            return
        with self.store.transaction():
            self.store.delete_images(ids)
            self.store.bump_generation()
        self.vectors.remove(np.asarray(ids, dtype=np.int64))
        self.vectors.generation = self.store.generation
        self.report.removed += len(ids)

    # the run ------------------------------------------------------------------------------------------------------
    def _refuse_damaged_store(self) -> None:
        """Write nothing into a database that fails SQLite's own check: a damaged index is reported, never extended."""
        try:
            problems = self.store.integrity_problems()
        except sqlite3.DatabaseError as exc:  # quick_check itself gives up on some damage
            problems = [str(exc)]
        if problems:
            found = " ".join(" ".join(problems).split())
            raise NotAnIndex(f"{self.store.path} is damaged (SQLite integrity check: "
                             f"{found[:160] + '...' if len(found) > 160 else found}); nothing was written: restore it "
                             f"from a backup, or move the index away and index again")

    def run(self, roots: Sequence[str]) -> IndexReport:
        started = time.monotonic()
        self._added_vector_ids: list[tuple[int, np.ndarray]] = []
        self._refuse_damaged_store()
        run_id = self.store.start_run(roots)
        status = "failed"
        try:
            plan = self._plan(roots)
            self._reuse(plan)
            self._remove_gone(plan)
            self._embed_all(plan)
            status = "ok"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self.report.seconds = time.monotonic() - started
            self.report.model_seconds = min(self.model.waited, self.report.seconds)
            values = {k: getattr(self.report, k) for k in
                      ("added", "updated", "moved", "copied", "removed", "errors", "unchanged", "seconds")}
            self.store.finish_run(run_id, {**values, "status": status, "warnings": "\n".join(self.report.warnings)})
            self.decoders.close()  # idle workers would only hold memory through the save and the text export
            if self._encode_streams is not None:  # a failed run leaves a batch still running to finish alone
                self._encode_streams.close(wait=status == "ok")
        self.progress(Progress("done", self.report.embedded, self.report.embedded))
        return self.report


def _storable(text: str) -> str:
    """`text` as SQLite can store it (valid UTF-8): bytes of a file name that are not UTF-8 are backslash-escaped."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # the bytes on disk
    except UnicodeEncodeError:  # a surrogate that did not come from the file system
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _under_any(path: str, folders: Sequence[str]) -> bool:
    return any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in folders)


def _stat_problem(path: str) -> str | None:
    """Why a file the scan listed cannot be stat'ed, or None when it simply vanished (the next run sees it gone)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return media.os_reason(exc)
    return None


def _as_scanned(item: _Work) -> bool:
    """Whether the file still has the size and mtime the scan saw (asked once its pixels and fingerprint are read)."""
    try:
        st = os.stat(item.path)
    except OSError:
        return False
    return st.st_size == item.size and st.st_mtime_ns == item.mtime_ns


def _fingerprint_or_empty(path: str) -> str:
    """The content fingerprint, or "" when the file cannot be read (decoding then records why) or vanished since the
    scan (the next run sees it gone)."""
    try:
        return media.fingerprint(path)
    except OSError:
        return ""


def default_workers() -> int:
    """Decode processes: one per core. Beside a model on the CPU they run at the lowest priority while that does not
    starve the model (DecodeWorkers, Indexer._starved); beside a GPU model they are what limits the rate."""
    return max(1, min(8, usable_cores()))


def normalise_roots(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Absolute, user-expanded, without trailing slashes; symlinks are kept as the user named them.

    These are paths the user typed, so one whose name SQLite cannot store, or that exists but cannot be read, is bad
    input (a root indexed before and unreadable now only gets a warning from the scan, and loses nothing)."""
    result: list[str] = []
    for path in paths:
        root = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if _storable(root) != root:
            raise BadInput(f"cannot index {_storable(root)}: its name is not valid UTF-8 (rename it)")
        if os.path.exists(root) and not os.access(root, os.R_OK | (os.X_OK if os.path.isdir(root) else 0)):
            raise BadInput(f"cannot read {root}: permission denied")
        if root not in result:
            result.append(root)
    return result
