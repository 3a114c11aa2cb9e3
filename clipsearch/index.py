"""`Index`: the library's front door, tying store, vectors, model, indexer and query together for one index directory.

The model loads lazily (commands that never embed stay fast), the FAISS file is checked against the store generation on
first use and rebuilt from SQLite when missing, stale or damaged, and writers take an exclusive lock that the OS drops
when a process dies.

Text queries never need torch: whenever the model is loaded anyway (indexing, importing captions) its text tower is
exported to ONNX inside the index directory (`text.onnx`, once per model identity), and text is then encoded with
onnxruntime and a torch-free tokenizer (clipsearch.text_onnx). Only when no such file is usable does a text query load
the torch model. The indexer, captions and model modules are imported on first use, so a search imports none of them.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import OrderedDict
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .errors import BadInput, IndexBusy, IndexMissing, ModelError, ModelMismatch, NotAnIndex, first_line
from .home import resolve_index
from .query import Filters, Hit, check_k, check_threshold, query_vector, search_captions, search_images
from .query_syntax import Query
from .store import Store
from .vectors import VectorFileError, VectorIndex, read_header

if TYPE_CHECKING:  # pragma: no cover - the search path imports none of these
    from .captions import CaptionHit, CaptionReport
    from .indexer import DeferredModel, IndexReport, ProgressCallback
    from .model import ClipModel, ModelSpec
    from .text_onnx import OnnxTextEncoder

FAISS_NAME = "images.faiss"
CAPTIONS_FAISS_NAME = "captions.faiss"
LOCK_NAME = "write.lock"
SAVE_LOCK_NAME = "save.lock"  # held while a FAISS file is written, by a writer or by a reader that repaired one
TEXT_ENCODER_NAME = "text.onnx"
# "torch" makes text queries use the torch model even where an ONNX text tower exists (comparisons, debugging).
TEXT_ENCODER_ENV = "CLIPSEARCH_TEXT_ENCODER"
TEXT_VECTORS_KEPT = 256
"""Query texts whose vectors an open index keeps (2 KB each at 512-d), the least recently asked dropped first: paging
through results, changing a filter or asking again encodes nothing (a warm text query spends most of its time there)."""


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    checked: int = 0


class Index:
    """One index directory. Use `clipsearch.open()` to get one; close it (or use `with`) when done."""

    def __init__(self, path: str | os.PathLike | None = None, *, model: str | None = None,
                 pretrained: str | None = None, device: str | None = None, precision: str = "auto",
                 create: bool = True, one_shot: bool = False) -> None:
        """`precision` is the image tower's (see clipsearch.model.resolve_precision); `one_shot` says the process
        answers one query and exits (the CLI), so the text encoder loads fast rather than runs fast."""
        self.path = resolve_index(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotAnIndex(f"{self.path} is a file, not an index directory")
        nothing_there = not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        if not create and nothing_there:
            raise IndexMissing(f"no index at {self.path}: build one with `clipsearch index FOLDER`")
        self.store = Store(self.path, create=create)
        self.device = device
        self.precision = precision
        self.one_shot = one_shot
        self.notices: list[str] = []
        self._requested = (model, pretrained)
        self._model: ClipModel | None = None
        self._text_encoder: OnnxTextEncoder | None = None
        self._text_encoder_failed = False
        self._text_vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> vector, see TEXT_VECTORS_KEPT
        self._text_vectors_from: object = None  # the encoder that computed them
        self._vectors: VectorIndex | None = None
        self._caption_vectors: VectorIndex | None = None
        self._writing = False  # this process holds the write lock
        self._check_requested_model()

    # model --------------------------------------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        """The stored model when the index has one, else what was asked for, else the default."""
        from .model import DEFAULT_PRETRAINED, ModelSpec, register_project_configs

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
        if pretrained and _pretrained_id(stored_name, pretrained) != self.store.get_meta("pretrained_id"):
            raise ModelMismatch(f"{self.path} was built with {stored}; '{pretrained}' are other weights "
                                f"(use another --index)")

    @property
    def model(self) -> ClipModel:
        if self._model is None:
            self._adopt_model(self._construct_model(self._spec_to_load()))
        assert self._model is not None
        return self._model

    def _spec_to_load(self) -> ModelSpec:
        """The model to load, refused up front when its checkpoint is gone (reads the store)."""
        spec = self.model_spec
        stored_pretrained = self.store.get_meta("pretrained")
        if spec.pretrained == stored_pretrained and os.path.isabs(spec.pretrained) and \
                not os.path.exists(spec.pretrained):
            raise ModelError(f"this index's checkpoint {spec.pretrained} is gone; if it moved, run "
                             f"`clipsearch index --index {self.path} --pretrained NEW_LOCATION` once")
        return spec

    def _construct_model(self, spec: ModelSpec) -> ClipModel:
        """Load the weights; touches no store, so it may run in a background thread (see indexer.DeferredModel)."""
        from .model import ClipModel

        return ClipModel(spec, device=self.device, precision=self.precision)

    def _adopt_model(self, loaded: ClipModel) -> ClipModel:
        """Check a loaded model against the index and keep it (records a checkpoint's new location)."""
        stored_identity = self.store.get_meta("identity")
        if stored_identity and stored_identity != loaded.identity:
            raise ModelMismatch(f"{self.path} was built with a different model or preprocessing than "
                                f"{loaded.spec.name} / {loaded.spec.pretrained} provides")
        if stored_identity and loaded.spec.pretrained != self.store.get_meta("pretrained"):  # same weights, moved
            with self.store.transaction():
                self.store.set_meta({"pretrained": loaded.spec.pretrained})
        from .model import precision_warning

        if warning := precision_warning(loaded.precision, loaded.device):
            self.notices.append(warning)
        self._model = loaded
        return loaded

    def _record_model(self) -> None:
        model = self.model
        with self.store.transaction():
            self.store.set_meta({"model": model.spec.name, "pretrained": model.spec.pretrained,
                                 "pretrained_id": model.pretrained_id, "identity": model.identity,
                                 "dim": str(model.dim)})

    def _prepare_model(self, progress: ProgressCallback | None) -> None:
        """For a writer holding the lock: say the model is loading (it takes seconds) and, in a new index, record it."""
        if progress and self._model is None:
            self._announce_model(progress, self.model_spec)
        if self.store.dim is None:
            self._record_model()

    @staticmethod
    def _announce_model(progress: ProgressCallback, spec: ModelSpec) -> None:
        from .indexer import Progress

        progress(Progress("model", path=f"{spec.name} / {spec.pretrained}"))

    def _indexing_model(self, progress: ProgressCallback | None,
                        before_loading: Callable[[], None] = lambda: None) -> DeferredModel:
        """The model for an indexing run. An index with a model recorded defers it until some file needs pixels, and
        decodes meanwhile with the preprocessing its model identity records. A new index does the same with the
        preprocessing the model's config implies (checked once it has loaded), and starts the decode workers at once
        (`before_loading`): it will need them. A model loaded already, one whose config cannot be read here, or a
        checkpoint's new location to record, is loaded now."""
        from .indexer import DeferredModel
        from .model import config_preprocess, identity_preprocess

        recorded = identity_preprocess(self.store.get_meta("identity") or "")  # None: no model recorded yet
        new = recorded is None and self.store.dim is None
        relocated = not new and self._requested[1] is not None and \
            self.model_spec.resolved().pretrained != self.store.get_meta("pretrained")
        implied = config_preprocess(self.model_spec) if new and self._model is None else None
        known = implied is not None or (recorded is not None and self.store.dim is not None)
        if self._model is not None or not known or relocated:
            if self._model is None:
                before_loading()
            self._prepare_model(progress)
            return DeferredModel.ready(self.model)

        def begin() -> Callable[[], ClipModel]:
            spec = self._spec_to_load()
            if progress:
                self._announce_model(progress, spec)
            return lambda: self._construct_model(spec)

        if implied is None:
            return DeferredModel(recorded, self.store.dim, begin, self._adopt_model)

        def adopt_and_record(loaded: ClipModel) -> ClipModel:
            self._adopt_model(loaded)
            self._record_model()
            return loaded

        before_loading()
        return DeferredModel(*implied, begin, adopt_and_record)

    # text encoder -------------------------------------------------------------------------------------------------
    @property
    def text_encoder_path(self) -> Path:
        return self.path / TEXT_ENCODER_NAME

    def _ensure_text_encoder(self, progress: ProgressCallback | None = None) -> str | None:
        """Called by a writer holding the lock: export the ONNX text tower unless a valid one for this model is there
        already (or an export was already tried for this model and could not be done). The model is loaded only to
        export. Returns a warning for the caller's report, or None; never raises: an index without the file still
        works, its text queries just load the torch model."""
        from . import __version__
        from .text_onnx import OnnxTextEncoder, export_text_tower
        from .tokenizer import UnsupportedTokenizer

        def attempt_for(identity: str) -> str:
            return json.dumps({"identity": identity, "clipsearch": __version__}, sort_keys=True)

        meta = self.store.meta()
        identity = self._model.identity if self._model is not None else meta.get("identity", "")
        attempt = attempt_for(identity)
        if meta.get("text_encoder") == "torch" and meta.get("text_encoder_for") == attempt:
            return None  # tried for this very model and version: the reason was reported then
        upgrade = False  # a working file from before int8 twins: try once for faster queries, never lose it
        if meta.get("text_encoder") == "onnx" and self.text_encoder_path.is_file():
            try:
                existing = OnnxTextEncoder(self.text_encoder_path, identity=identity)
                if meta.get("text_encoder_identity") == identity:
                    if "weights" in existing.metadata or meta.get("text_encoder_upgrade_for") == attempt:
                        return None
                    upgrade = True
            except (ModelError, ModelMismatch):  # missing weights, damaged, another model's: export again
                pass
        try:
            model = self.model
        except (ModelError, ModelMismatch) as exc:  # e.g. the checkpoint is gone: this run embedded nothing
            if upgrade:
                return self._upgrade_tried(attempt)
            return f"could not export the text encoder: {exc}"
        attempt = attempt_for(model.identity)  # the stored one, or (an index from before identities) the model's
        warning = None
        if progress:
            from .indexer import Progress

            progress(Progress("text-encoder", path=str(self.text_encoder_path)))
        try:
            model.release_image_weights()  # the export's peak would otherwise sit on top of the image tower
            export_text_tower(model, self.text_encoder_path)
            values = {"text_encoder": "onnx", "text_encoder_identity": model.identity, "text_encoder_note": ""}
        except UnsupportedTokenizer as exc:
            values = {"text_encoder": "torch", "text_encoder_note": str(exc)}
            warning = f"text queries will load the torch model: {exc}"
        except Exception as exc:  # noqa: BLE001 - any exporter failure only costs query speed, never the run
            first = first_line(exc)
            values = {"text_encoder": "torch", "text_encoder_note": f"export failed: {first}"}
            warning = f"could not export the text encoder to ONNX ({first}); text queries will load the torch model"
        if upgrade and values["text_encoder"] == "torch":  # the export left the working file as it was: keep it
            return self._upgrade_tried(attempt)
        if values["text_encoder"] == "torch":
            values["text_encoder_identity"] = ""
            self.text_encoder_path.unlink(missing_ok=True)  # a file of an older model must not linger
        values["text_encoder_for"] = attempt
        with self.store.transaction():
            self.store.set_meta(values)
        self._text_encoder = None  # a new file: reload on next use
        return warning

    def _upgrade_tried(self, attempt: str) -> None:
        """Remember that re-exporting a working pre-int8 text encoder failed for this model and version, so later
        runs neither load the model nor warn for it again; the file stays as it was."""
        with self.store.transaction():
            self.store.set_meta({"text_encoder_upgrade_for": attempt})

    def text_encoder(self) -> OnnxTextEncoder | None:
        """The ONNX text encoder when the index has a valid one for its model, else None (text goes through torch).

        Only the identity recorded in the index decides: a file of another model is refused (with a notice) and the
        torch path taken, whose result is the same (cosine >= 0.999)."""
        if self._text_encoder is not None:
            return self._text_encoder
        identity = self._onnx_identity()
        return None if identity is None else self._load_text_encoder(identity)

    def _onnx_identity(self) -> str | None:
        """The model identity an ONNX text encoder must carry, when the index has one to try (meta and file)."""
        if self._text_encoder_failed or os.environ.get(TEXT_ENCODER_ENV, "").lower() == "torch":
            return None
        identity = self.store.get_meta("identity")
        if not identity or self.store.get_meta("text_encoder") != "onnx" or not self.text_encoder_path.is_file():
            return None
        return identity

    def _load_text_encoder(self, identity: str) -> OnnxTextEncoder | None:
        """Load the ONNX file (no store access: may run beside a thread that loads FAISS); None, with a notice, when it
        cannot be used."""
        from .text_onnx import OnnxTextEncoder

        try:
            self._text_encoder = OnnxTextEncoder(self.text_encoder_path, identity=identity,
                                                 long_lived=not self.one_shot)
        except (ModelError, ModelMismatch) as exc:
            self._text_encoder_failed = True
            self.notices.append(f"text encoder not usable ({exc}); using the torch model (slower to load); "
                                f"`clipsearch index` exports it again")
            return None
        return self._text_encoder

    @property
    def query_encoder(self) -> str:
        """Which text encoder text queries use: 'onnx' (no torch) or 'torch'."""
        return "onnx" if self.text_encoder() is not None else "torch"

    # vectors ------------------------------------------------------------------------------------------------------
    @property
    def faiss_path(self) -> Path:
        return self.path / FAISS_NAME

    @property
    def captions_faiss_path(self) -> Path:
        return self.path / CAPTIONS_FAISS_NAME

    def vectors(self) -> VectorIndex:
        """The images' FAISS index, current with the store; rebuilt from SQLite (and saved when nobody writes) if not."""
        if self.store.dim is None:
            raise IndexMissing(f"{self.path} holds no images yet: add some with `clipsearch index FOLDER`")
        self._vectors = self._current(self._vectors, self.faiss_path, "generation", self.store.vectors_snapshot,
                                      "FAISS index")
        return self._vectors

    def caption_vectors(self) -> VectorIndex:
        """The captions' FAISS index, kept like the images' one."""
        if self.store.dim is None or not self.store.caption_count():
            raise IndexMissing(f"{self.path} holds no captions yet: add some with `clipsearch captions add FILE`")
        self._caption_vectors = self._current(self._caption_vectors, self.captions_faiss_path, "caption_generation",
                                              self.store.caption_vectors_snapshot, "caption FAISS index")
        return self._caption_vectors

    def _current(self, held: VectorIndex | None, path: Path, generation_key: str, snapshot, what: str) -> VectorIndex:
        """`held` if current, else the saved file if current, else a rebuild from one SQLite snapshot. Current means
        the store's generation and a plan that still suits the number of vectors (`VectorIndex.needs_rebuild`): an
        index whose collection crossed a threshold is rebuilt with the plan chosen for its new size."""
        self.store.follow_changes()
        generation = int(self.store.get_meta(generation_key, "0"))
        if held is not None and held.generation == generation and not held.needs_rebuild():
            return held
        dim = self.store.dim
        current = held if held is not None and held.generation == generation else None
        if current is None:
            try:
                current = VectorIndex.load(path, mapped=not self._writing)
                if current.generation != generation or current.dim != dim:
                    current, reason = None, "out of date"
                elif not current.needs_rebuild():
                    return current
            except VectorFileError as exc:
                current, reason = None, str(exc)
        if current is not None:  # current in content, but N crossed a threshold of the plan
            reason = f"{current.ntotal:,} vectors call for another index type than {current.kind}"
        rebuilt = self._built_from_store(snapshot)
        if rebuilt.ntotal or path.exists():  # a new, empty index has nothing to repair
            self.notices.append(f"{what} rebuilt from SQLite ({reason})")
        self._save_if_idle(rebuilt, path, generation_key)
        return rebuilt

    def _built_from_store(self, snapshot: Callable[[], tuple[int, np.ndarray, np.ndarray]]) -> VectorIndex:
        """A FAISS index built from one SQLite snapshot, planned for its size."""
        return VectorIndex.from_source(self.store.dim, SimpleNamespace(vectors_snapshot=snapshot))

    def _save_if_idle(self, vectors: VectorIndex, path: Path, generation_key: str) -> None:
        """Save a rebuilt index unless a writer is at work: this process's own run saves when it ends, another
        process's run saves its newer state. An index this process cannot write keeps it in memory."""
        if self._writing or self.store.read_only:
            return
        try:
            with self._save_lock(blocking=False):  # never the writers' lock: an `index` starting now must not be busy
                if vectors.generation == int(self.store.get_meta(generation_key, "0")):
                    vectors.save(path)
        except IndexBusy:
            pass  # another process is saving one right now
        except OSError:
            pass  # the location refused the write after all (a full disk, permissions misread): keep it in memory

    @contextmanager
    def _save_lock(self, blocking: bool) -> Iterator[None]:
        """Serialises FAISS saves, so a reader's repaired file never lands half-way through a writer's save (and the
        writer's newer one, saved after it, wins)."""
        with (self.path / SAVE_LOCK_NAME).open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise IndexBusy(f"a FAISS file of {self.path} is being saved") from exc
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        self.store.check_writable()
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
        """Bring the index up to date with `paths` (folders or files); with none, with every root indexed before.
        The first run with a model also exports its text tower (see the module doc)."""
        from . import captions as caption_room
        from .indexer import DecodeWorkers, Indexer, normalise_roots

        known = [row["path"] for row in self.store.roots()]
        roots = normalise_roots(paths) if paths else known
        if not roots:
            raise BadInput("nothing to index: give a folder")
        for root in roots:
            if not os.path.exists(root) and root not in known:
                raise BadInput(f"path not found: {root}")
        with self._write_lock(), closing(DecodeWorkers(workers)) as decoders:
            model = self._indexing_model(progress, before_loading=decoders.start)
            interrupted = False
            try:
                # a new index whose model is deferred has no dimension stored yet: the one its config gives
                vectors = VectorIndex(model.dim) if self.store.dim is None else self.vectors()
                indexer = Indexer(self.store, vectors, model, batch_size=batch_size, workers=decoders,
                                  progress=progress)
                report = indexer.run(roots)
                vectors = self._vectors = indexer.vectors  # another one when the loaded model had another dimension
                if self.store.dim is None:  # no file needed the model: adopting it records it all the same
                    model.get()
            except KeyboardInterrupt:
                interrupted = True  # a person waits: leave a load in flight to its daemon thread (it writes nothing)
                raise
            finally:
                if not interrupted:
                    model.join()
            if vectors.needs_rebuild():  # this run took N across a threshold: save the index type its size calls for
                vectors = self._vectors = self._built_from_store(self.store.vectors_snapshot)
            with self._save_lock(blocking=True):  # also the moment to drop temp files of a save that was killed
                for stale in [*self.path.glob(f"{FAISS_NAME}.*.tmp"), *self.path.glob(f"{CAPTIONS_FAISS_NAME}.*.tmp")]:
                    stale.unlink(missing_ok=True)
                if not vectors.saved_at(self.faiss_path):
                    vectors.save(self.faiss_path)
            sidecars = caption_room.sync_sidecars(self.store, model.get, self.store.ok_paths_under(roots))
            if sidecars.added or sidecars.removed:
                self._save_caption_vectors()
            if report.embedded:
                with self.store.transaction():
                    self.store.set_meta({"precision": model.get().precision})  # of the vectors this run embedded
            export_warning = self._ensure_text_encoder(progress)
        report.captions = sidecars.added
        if export_warning:
            report.warnings.append(export_warning)
        report.warnings += [f"sidecar {problem}" for problem in sidecars.problems]
        if sidecars.truncated:
            report.warnings.append(f"{sidecars.truncated} sidecar captions are longer than the model's context and "
                                   f"were truncated for embedding (stored in full)")
        return report

    def _save_caption_vectors(self) -> None:
        """Called by a writer holding the lock after changing captions: rebuild captions.faiss from SQLite (no notice:
        nothing was wrong, the writer just changed it)."""
        if self.store.caption_count():
            self._caption_vectors = self._built_from_store(self.store.caption_vectors_snapshot)
            with self._save_lock(blocking=True):
                self._caption_vectors.save(self.captions_faiss_path)
        else:
            self.captions_faiss_path.unlink(missing_ok=True)
            self._caption_vectors = None

    def add_captions(self, file: str | os.PathLike, *, collection: str | None = None, column: str | None = None,
                     field: str | None = None, progress: ProgressCallback | None = None) -> CaptionReport:
        """Import a caption file into a collection (default: the file's name); importing it again changes nothing."""
        from . import captions as caption_room
        from .caption_files import read_captions

        parsed = read_captions(file, column=column, field=field)
        source = os.path.abspath(os.path.expanduser(os.fspath(file)))
        name = caption_room.check_collection(collection) if collection is not None else \
            caption_room.default_collection(Path(source))
        if not parsed.rows:
            raise BadInput(f"no usable captions in {file}" +
                           (f" ({len(parsed.problems)} rows skipped, first: {parsed.problems[0]})"
                            if parsed.problems else ""))
        with self._write_lock():
            self._prepare_model(progress)
            report = caption_room.import_captions(self.store, lambda: self.model, parsed, name, source, progress)
            self._save_caption_vectors()
            # only when the import loaded the model: an unchanged file embeds nothing and should stay instant
            export_warning = self._ensure_text_encoder(progress) if self._model is not None else None
        if export_warning:
            self.notices.append(f"warning: {export_warning}")
        return report

    def collections(self) -> list[dict]:
        """Caption collections: name, number of captions, how many are linked to an indexed image, source files."""
        return self.store.collections()

    def remove_captions(self, collection: str) -> int:
        """Delete a whole caption collection; returns how many captions went."""
        ids = self.store.caption_ids(collection)
        if not ids:
            known = ", ".join(c["collection"] for c in self.store.collections()) or "none"
            raise BadInput(f"no caption collection named {collection!r} (collections: {known})")
        with self._write_lock():
            with self.store.transaction():
                self.store.delete_captions(ids)
                self.store.bump_caption_generation()
            self._save_caption_vectors()
        return len(ids)

    def captions_of(self, image: str | os.PathLike | int) -> list[dict]:
        """The captions linked to an indexed image (by path or id)."""
        if isinstance(image, int) and not isinstance(image, bool):
            row = self.store.rows([image]).get(image)
            if row is None:
                raise BadInput(f"no indexed image has id {image}")
            path = row["path"]
        else:
            path = os.path.abspath(os.path.expanduser(os.fspath(image)))
        return [{"id": r["id"], "text": r["text"], "collection": r["collection"]} for r in self.store.captions_of_image(path)]

    def add_folder(self, folder: str | os.PathLike, **options) -> IndexReport:
        """Index one folder (incrementally); same options as `index`."""
        return self.index([folder], **options)

    # reading ------------------------------------------------------------------------------------------------------
    def search(self, query: str | Query = "", k: int = 10, *, image: str | int | Sequence[str | int] | None = None,
               not_: str | Sequence[str] | None = None, under: str | Sequence[str] | None = None,
               after: str | None = None, before: str | None = None, types: str | Sequence[str] | None = None,
               threshold: float | None = None) -> list[Hit]:
        """Images nearest to a query, best first: a text or the query language (`2*dog + beach.jpg - cat`), plus
        `image` parts and `not_` parts; filtered to folders (`under`), a date range (`after`/`before`, inclusive;
        EXIF date taken, else file time) and `types` ('jpg,png') inside the vector search; `threshold` drops hits
        scoring below it. Images named in the query are left out of the results."""
        check_k(k)
        threshold = check_threshold(threshold)
        filters = Filters.build(under, after, before, types)
        parsed = _query(query, image, not_)
        vector, own, vectors = self._vector_and_index(parsed, self._vectors, self.vectors)
        return search_images(self.store, vectors, vector, k, filters=filters, threshold=threshold, exclude=own)

    def similar(self, image: str | os.PathLike | int, k: int = 10, **filters) -> list[Hit]:
        """Images nearest to an image (a file path, or the id of an indexed image), the image itself left out.
        Takes the filters of `search`."""
        return self.search("", k, image=image if isinstance(image, int) else os.fspath(image), **filters)

    def search_captions(self, query: str | Query = "", k: int = 10, *,
                        image: str | int | Sequence[str | int] | None = None, not_: str | Sequence[str] | None = None,
                        collection: str | Sequence[str] | None = None,
                        threshold: float | None = None) -> list[CaptionHit]:
        """Captions nearest to a query (same language and parts as `search`), optionally from some collections."""
        check_k(k)
        threshold = check_threshold(threshold)
        parsed = _query(query, image, not_)
        collections = [collection] if isinstance(collection, str) else list(collection or [])
        known = {c["collection"] for c in self.store.collections()}
        for name in collections:
            if name not in known:
                raise BadInput(f"no caption collection named {name!r} (collections: {', '.join(sorted(known)) or 'none'})")
        vector, _, vectors = self._vector_and_index(parsed, self._caption_vectors, self.caption_vectors)
        return search_captions(self.store, vectors, vector, k, collections=collections, threshold=threshold)

    def _vector_and_index(self, parsed: Query, held: VectorIndex | None,
                          load: Callable[[], VectorIndex]) -> tuple[np.ndarray, set[int], VectorIndex]:
        """The query vector, the ids of indexed images in the query, and the FAISS index to search (from `load`).

        A text-only query on the ONNX path, with the index not loaded yet (a new process), loads it in a thread
        while onnxruntime loads and runs. A flat index is mapped in a few ms and needs no FAISS; a compressed one
        imports and reads FAISS there, beside the encoder, rather than before it. The encoder touches no SQLite
        meanwhile; if it cannot be used, the thread is waited for before the torch path starts reading the store."""
        identity = None
        if held is None and parsed.parts and all(part.kind == "text" for part in parsed.parts) and \
                self._text_encoder is None:
            identity = self._onnx_identity()
        if identity is None:
            vectors = load()
            vector, own = query_vector(parsed, self.store, self.encode_texts, lambda: self.model)
            return vector, own, vectors
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="clipsearch-faiss-load") as pool:
            pending = pool.submit(load)
            if self._load_text_encoder(identity) is None:
                pending.result()  # the torch path reads the store: not beside the loading thread
            vector, own = query_vector(parsed, self.store, self.encode_texts, lambda: self.model)
            return vector, own, pending.result()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit vectors with this index's model: through its ONNX text tower when the index has a valid one
        (no torch), else through the torch model. The last TEXT_VECTORS_KEPT texts' vectors are kept, as long as the
        same encoder would compute them."""
        encoder = self.text_encoder()
        source = encoder if encoder is not None else self.model
        if not texts:
            return source.encode_texts(texts)
        kept = self._text_vectors
        if source is not self._text_vectors_from:
            kept.clear()
            self._text_vectors_from = source
        missing = [text for text in dict.fromkeys(texts) if text not in kept]
        if missing:
            kept.update(zip(missing, source.encode_texts(missing)))
        for text in texts:
            kept.move_to_end(text)
        vectors = np.stack([kept[text] for text in texts])
        while len(kept) > TEXT_VECTORS_KEPT:
            kept.popitem(last=False)
        return vectors

    def errors(self) -> list[dict]:
        """Files that could not be indexed, with the reason."""
        return [{"path": r["path"], "error": r["error"]} for r in self.store.errors()]

    def info(self) -> dict:
        """What the index holds: counts, model, size on disk, roots, last run."""
        meta = self.store.meta()
        counts = self.store.counts()
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        last = self.store.last_run()
        encoder = self.text_encoder()
        return {
            "index": str(self.path),
            **counts,
            "model": meta.get("model"),
            "pretrained": meta.get("pretrained"),
            "dim": int(meta["dim"]) if meta.get("dim") else None,
            "precision": meta.get("precision"),
            "query_encoder": self.query_encoder if meta.get("identity") else None,
            "query_encoder_note": meta.get("text_encoder_note") or None,
            "query_weights": encoder.weights if encoder is not None else None,
            "query_weights_note": (encoder.int8_note or None) if encoder is not None else None,
            "vector_index": _vector_index(self.faiss_path),
            "generation": int(meta.get("generation", 0)),
            "captions": self.store.caption_count(),
            "collections": self.store.collections(),
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
        if report.problems:  # nothing past this point can be trusted, or even read
            report.ok = False
            return report
        db = self.store.conn
        orphans = db.execute("SELECT count(*) FROM vectors v LEFT JOIN images i ON i.id = v.image_id "
                             "WHERE i.id IS NULL OR i.status != 'ok'").fetchone()[0]
        missing = db.execute("SELECT count(*) FROM images i LEFT JOIN vectors v ON v.image_id = i.id "
                             "WHERE i.status = 'ok' AND v.image_id IS NULL").fetchone()[0]
        if orphans:
            report.problems.append(f"{orphans} vectors belong to no indexed image")
        if missing:
            report.problems.append(f"{missing} indexed images have no vector")
        unlinked = db.execute("SELECT count(*) FROM caption_vectors v LEFT JOIN captions c ON c.id = v.caption_id "
                              "WHERE c.id IS NULL").fetchone()[0]
        if unlinked:
            report.problems.append(f"{unlinked} caption vectors belong to no caption")
        if self.store.dim is not None:
            self._compare(report, "images", self.vectors, self.store.all_vectors)
        if self.store.dim is not None and self.store.caption_count():
            self._compare(report, "captions", self.caption_vectors, self.store.all_caption_vectors)
        report.ok = not report.problems
        return report

    def _compare(self, report: VerifyReport, what: str, derived, stored_vectors) -> None:
        """FAISS must hold exactly SQLite's ids, and their vectors: equal for an exact index, within the index's
        `tolerance` for a compressed one (whose copies are fp16 or 8-bit, by design)."""
        before = len(self.notices)
        vectors = derived()
        report.notices += self.notices[before:]
        ids, stored = stored_vectors()
        faiss_ids = np.sort(vectors.ids())
        report.checked += len(ids)
        if len(faiss_ids) != len(ids) or not np.array_equal(faiss_ids, ids):
            report.problems.append(f"{what}: FAISS holds {len(faiss_ids)} ids, SQLite {len(ids)} vectors: the id sets "
                                   f"differ")
            return
        tolerance = max(1e-5, vectors.tolerance)
        worst = 0.0
        chunk = 65_536  # vectors compared at a time: a bounded working set at a million vectors
        for start in range(0, len(ids), chunk):
            rebuilt = vectors.reconstruct_batch(ids[start:start + chunk])
            worst = max(worst, float(np.abs(rebuilt - stored[start:start + chunk]).max()))
        if worst > tolerance:
            report.problems.append(f"{what}: FAISS vectors differ from SQLite (max abs difference {worst:.3g}, "
                                   f"{vectors.kind} allows {tolerance:.3g})")

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike | None = None, *, model: str | None = None, pretrained: str | None = None,
         device: str | None = None, precision: str = "auto", create: bool = True,
         one_shot: bool = False) -> Index:  # noqa: A001 - mirrors builtins.open on purpose
    """Open (or create) the index at `path`: a directory, or a bare name under the index home; default 'default'.
    See `Index` for `precision` and `one_shot`."""
    return Index(path, model=model, pretrained=pretrained, device=device, precision=precision, create=create,
                 one_shot=one_shot)


def _pretrained_id(model: str, pretrained: str) -> str:
    from .model import ModelSpec, pretrained_id

    return pretrained_id(ModelSpec(model, pretrained).resolved())


def _query(query: str | Query, image, not_) -> Query:
    return Query.build(query or "", _listed(image), _listed(not_))


def _listed(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, os.PathLike)):
        return [os.fspath(value) if isinstance(value, os.PathLike) else value]
    return list(value)


def _vector_index(path: Path) -> dict | None:
    """The saved image FAISS file's type and size, from its header alone (None before the first save)."""
    header = read_header(path)
    return None if header is None else {"kind": header.get("kind"), "vectors": header.get("ntotal"),
                                        "generation": header.get("generation")}
