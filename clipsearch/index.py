"""`Index`: the library's front door, tying store, vectors, model, indexer and query together for one index directory.

The model loads lazily (commands that never embed stay fast), the FAISS file is checked against the store generation on
first use and rebuilt from SQLite when missing, stale or damaged, and writers take an exclusive lock that the OS drops
when a process dies.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import BadInput, IndexBusy, IndexMissing, ModelError, ModelMismatch, NotAnIndex
from .home import resolve_index
from .indexer import Indexer, IndexReport, Progress, ProgressCallback, normalise_roots
from .model import DEFAULT_PRETRAINED, ClipModel, ModelSpec, pretrained_id, register_project_configs
from .query import Hit, check_k, image_vector, search_vector, text_vector
from .store import Store
from .vectors import VectorFileError, VectorIndex

FAISS_NAME = "images.faiss"
LOCK_NAME = "write.lock"


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    checked: int = 0


class Index:
    """One index directory. Use `clipsearch.open()` to get one; close it (or use `with`) when done."""

    def __init__(self, path: str | os.PathLike | None = None, *, model: str | None = None,
                 pretrained: str | None = None, device: str | None = None, create: bool = True) -> None:
        self.path = resolve_index(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotAnIndex(f"{self.path} is a file, not an index directory")
        nothing_there = not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        if not create and nothing_there:
            raise IndexMissing(f"no index at {self.path}: build one with `clipsearch index FOLDER`")
        self.store = Store(self.path, create=create)
        self.device = device
        self.notices: list[str] = []
        self._requested = (model, pretrained)
        self._model: ClipModel | None = None
        self._vectors: VectorIndex | None = None
        self._writing = False  # this process holds the write lock
        self._check_requested_model()

    # model --------------------------------------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        """The stored model when the index has one, else what was asked for, else the default."""
        stored = self.store.get_meta("model")
        model, pretrained = self._requested
        if stored:
            return ModelSpec(stored, pretrained or self.store.get_meta("pretrained") or DEFAULT_PRETRAINED)
        if model and not pretrained:
            register_project_configs()
            return ModelSpec.for_model(model)
        default = ModelSpec.default()
        return ModelSpec(model or default.name, pretrained or default.pretrained)

    def _check_requested_model(self) -> None:
        """Refuse another model up front, before minutes of loading: mixing two models' vectors is garbage."""
        stored_name = self.store.get_meta("model")
        model, pretrained = self._requested
        if not stored_name:
            return
        stored = f"{stored_name} / {self.store.get_meta('pretrained')}"
        if model and model != stored_name:
            raise ModelMismatch(f"{self.path} was built with {stored}; it cannot be searched or extended with {model} "
                                f"(use another --index)")
        if pretrained and pretrained_id(ModelSpec(stored_name, pretrained).resolved()) != self.store.get_meta("pretrained_id"):
            raise ModelMismatch(f"{self.path} was built with {stored}; '{pretrained}' are other weights "
                                f"(use another --index)")

    @property
    def model(self) -> ClipModel:
        if self._model is None:
            spec = self.model_spec
            stored_pretrained = self.store.get_meta("pretrained")
            if spec.pretrained == stored_pretrained and os.path.isabs(spec.pretrained) and \
                    not os.path.exists(spec.pretrained):
                raise ModelError(f"this index's checkpoint {spec.pretrained} is gone; if it moved, run "
                                 f"`clipsearch index --index {self.path} --pretrained NEW_LOCATION` once")
            loaded = ClipModel(spec, device=self.device)
            stored_identity = self.store.get_meta("identity")
            if stored_identity and stored_identity != loaded.identity:
                raise ModelMismatch(f"{self.path} was built with a different model or preprocessing than "
                                    f"{loaded.spec.name} / {loaded.spec.pretrained} provides")
            if stored_identity and loaded.spec.pretrained != stored_pretrained:  # same weights, new location
                with self.store.transaction():
                    self.store.set_meta({"pretrained": loaded.spec.pretrained})
            self._model = loaded
        return self._model

    def _record_model(self) -> None:
        model = self.model
        with self.store.transaction():
            self.store.set_meta({"model": model.spec.name, "pretrained": model.spec.pretrained,
                                 "pretrained_id": model.pretrained_id, "identity": model.identity,
                                 "dim": str(model.dim)})

    # vectors ------------------------------------------------------------------------------------------------------
    @property
    def faiss_path(self) -> Path:
        return self.path / FAISS_NAME

    def vectors(self) -> VectorIndex:
        """The FAISS index, current with the store; rebuilt from SQLite (and saved when nobody writes) if it is not."""
        if self._vectors is not None and self._vectors.generation == self.store.generation:
            return self._vectors
        dim = self.store.dim
        if dim is None:
            raise IndexMissing(f"{self.path} holds no images yet: add some with `clipsearch index FOLDER`")
        try:
            loaded = VectorIndex.load(self.faiss_path)
            if loaded.generation == self.store.generation and loaded.dim == dim:
                self._vectors = loaded
                return loaded
            reason = "out of date"
        except VectorFileError as exc:
            reason = str(exc)
        self._vectors = VectorIndex.from_source(dim, self.store)
        if self._vectors.ntotal or self.faiss_path.exists():  # a new, empty index has nothing to repair
            self.notices.append(f"FAISS index rebuilt from SQLite ({reason})")
        self._save_vectors_if_idle()
        return self._vectors

    def _save_vectors_if_idle(self) -> None:
        if self._writing:
            return  # our own run saves the FAISS file when it ends
        try:
            with self._write_lock():
                if self._vectors is not None and self._vectors.generation == self.store.generation:
                    self._vectors.save(self.faiss_path)
        except IndexBusy:
            pass  # a writer is running and will save its own, newer state
        except OSError:
            pass  # read-only location: keep the rebuilt index in memory

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / LOCK_NAME).open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise IndexBusy(f"index {self.path} is busy: another clipsearch process is writing to it") from exc
            self._writing = True
            try:
                yield
            finally:
                self._writing = False
                fcntl.flock(handle, fcntl.LOCK_UN)

    # writing ------------------------------------------------------------------------------------------------------
    def index(self, paths: Sequence[str | os.PathLike] | None = None, *, batch_size: int = 32,
              workers: int | None = None, progress: ProgressCallback | None = None) -> IndexReport:
        """Bring the index up to date with `paths` (folders or files); with none, with every root indexed before."""
        known = [row["path"] for row in self.store.roots()]
        roots = normalise_roots(paths) if paths else known
        if not roots:
            raise BadInput("nothing to index: give a folder")
        for root in roots:
            if not os.path.exists(root) and root not in known:
                raise BadInput(f"path not found: {root}")
        with self._write_lock():
            if progress and self._model is None:
                spec = self.model_spec
                progress(Progress("model", path=f"{spec.name} / {spec.pretrained}"))
            if self.store.dim is None:
                self._record_model()
            vectors = self.vectors()
            report = Indexer(self.store, vectors, self.model, batch_size=batch_size, workers=workers,
                             progress=progress).run(roots)
            vectors.save(self.faiss_path)
        return report

    def add_folder(self, folder: str | os.PathLike, **options) -> IndexReport:
        """Index one folder (incrementally); same options as `index`."""
        return self.index([folder], **options)

    # reading ------------------------------------------------------------------------------------------------------
    def search(self, text: str, k: int = 10) -> list[Hit]:
        """Images nearest to a text, best first."""
        check_k(k)
        vectors = self.vectors()
        return search_vector(self.store, vectors, text_vector(text, lambda: self.model), k)

    def similar(self, image: str | os.PathLike | int, k: int = 10) -> list[Hit]:
        """Images nearest to an image (a file path, or the id of an indexed image), the image itself left out."""
        check_k(k)
        vectors = self.vectors()
        query, own_id = image_vector(self.store, image if isinstance(image, int) else os.fspath(image),
                                     lambda: self.model)
        return search_vector(self.store, vectors, query, k, exclude=own_id)

    def errors(self) -> list[dict]:
        """Files that could not be indexed, with the reason."""
        return [{"path": r["path"], "error": r["error"]} for r in self.store.errors()]

    def info(self) -> dict:
        """What the index holds: counts, model, size on disk, roots, last run."""
        meta = self.store.meta()
        counts = self.store.counts()
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        last = self.store.last_run()
        return {
            "index": str(self.path),
            **counts,
            "model": meta.get("model"),
            "pretrained": meta.get("pretrained"),
            "dim": int(meta["dim"]) if meta.get("dim") else None,
            "generation": int(meta.get("generation", 0)),
            "size_bytes": size,
            "created": meta.get("created"),
            "roots": [{"path": r["path"], "status": r["last_status"], "last_scan": r["last_scan"]}
                      for r in self.store.roots()],
            "last_run": None if last is None else {k: last[k] for k in (
                "started", "finished", "status", "added", "updated", "moved", "copied", "removed", "errors",
                "unchanged", "seconds")},
        }

    def verify(self) -> VerifyReport:
        """Check that SQLite is sound and that FAISS holds exactly the stored vectors (rebuilding a stale FAISS first)."""
        report = VerifyReport(ok=True)
        report.problems += [f"SQLite integrity: {p}" for p in self.store.integrity_problems()]
        db = self.store.db
        orphans = db.execute("SELECT count(*) FROM vectors v LEFT JOIN images i ON i.id = v.image_id "
                             "WHERE i.id IS NULL OR i.status != 'ok'").fetchone()[0]
        missing = db.execute("SELECT count(*) FROM images i LEFT JOIN vectors v ON v.image_id = i.id "
                             "WHERE i.status = 'ok' AND v.image_id IS NULL").fetchone()[0]
        if orphans:
            report.problems.append(f"{orphans} vectors belong to no indexed image")
        if missing:
            report.problems.append(f"{missing} indexed images have no vector")
        if self.store.dim is not None:
            before = len(self.notices)
            vectors = self.vectors()
            report.notices += self.notices[before:]
            ids, stored = self.store.all_vectors()
            faiss_ids = vectors.ids()
            report.checked = len(ids)
            if len(faiss_ids) != len(ids) or not np.array_equal(np.sort(faiss_ids), ids):
                report.problems.append(f"FAISS holds {len(faiss_ids)} ids, SQLite {len(ids)} vectors: the id sets differ")
            elif len(ids):
                rebuilt = np.stack([vectors.reconstruct(i) for i in ids])
                worst = float(np.abs(rebuilt - stored).max())
                if worst > 1e-5:
                    report.problems.append(f"FAISS vectors differ from SQLite (max abs difference {worst:.3g})")
        report.ok = not report.problems
        return report

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike | None = None, *, model: str | None = None, pretrained: str | None = None,
         device: str | None = None, create: bool = True) -> Index:  # noqa: A001 - mirrors builtins.open on purpose
    """Open (or create) the index at `path`: a directory, or a bare name under the index home; default 'default'."""
    return Index(path, model=model, pretrained=pretrained, device=device, create=create)
