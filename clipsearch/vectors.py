"""The `vectors` room: the FAISS index, a derived cache of the vectors stored in SQLite.

FAISS ids are SQLite row ids. The file on disk carries a small header with the store generation it reflects and the
plan it was built with, written atomically (temp file + rename), so a reader can always tell whether it is current,
stale, or damaged.

Two kinds of index, chosen from N, the dimension and a memory budget by `choose_plan`:

- `flat-ip` (small collections): exact inner product over float32 copies, scored with numpy. On disk they are FAISS's
  IndexIDMap2(IndexFlatIP), rows aligned; a loaded index reads them in place and imports no FAISS until it changes.
- `pq-refine` (large ones, built by `compressed`): every vector is scanned as a 4-bit product-quantised code with FAISS
  fast-scan (SIMD lookups, two bits per dimension), the scan split into shards searched in parallel; the best candidates
  are then re-scored from a near-exact copy (fp16, or SQ8 when fp16 does not fit the budget). Graph (HNSW) and partition
  (IVF) indexes were measured and rejected: on unstructured 512-d data HNSW had to visit 82% of 100k vectors for 0.96
  recall@10 and IVF cannot prune (a neighbour's cell is nearly unrelated to the query's), and CLIP text queries sit
  apart from the image vectors they are compared with, where pruning indexes lose recall. An exhaustive compressed scan
  has no such cliff; see bench/million.py for what it costs at 1,000,000 vectors. RaBitQ (faiss 1.15
  IndexRaBitQFastScan) was measured as well: its 1-bit scan of 200k random 512-d vectors took more CPU than this PQ scan
  (4.3 vs 3.1 ms) for recall@10 0.87 in its best 1000, and its multi-bit search 25+ ms.
"""
from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import numpy as np

from .cores import usable_cores
from .errors import BadInput

if TYPE_CHECKING:  # FAISS is imported where it is used: see `compressed`
    import faiss

    from .compressed import ByteCopy, PQRefine

MAGIC = b"CLIPSRCHFAISS\x00\x01\x00"
_HEADER_LEN = struct.Struct("<I")

FLAT = "flat-ip"
PQ_REFINE = "pq-refine"

MEMORY_BUDGET = 1_250_000_000  # bytes the index may hold: 1M x 512-d fits as pq-refine/fp16 (~1.16 GB), leaving the
#                                interpreter and query buffers room under the 1.5 GB the issue allows the process
FLAT_MAX = 100_000             # above this, exact search costs tens of ms a query (1M x 512-d: ~140 ms on 2 cores)
RETRAIN_GROWTH = 4             # codebooks trained at N are retrained once the collection grows past 4 N
CANDIDATES_PER_SQRT_N = 0.5    # re-scored candidates = sqrt(N) / 2 (500 at 1M): with 2-bit-per-dimension codes this
#                                gave recall@10 0.993 on 1M random unit vectors (the worst case: no structure) for 17%
#                                less CPU than sqrt(N) candidates (0.999); bench/million.py --sweep
TRAIN_SAMPLE = 16_384          # PQ k-means uses 4096 points per sub-quantizer; SQ8 ranges want a broader sample
_CHUNK = 65_536                # vectors encoded per step while building (bounds the float32 working set)
_SPLIT_MIN = 32_768            # the 8-bit copy is split between threads once each part has at least this many rows
_COPY_MIN = 32_768             # from this many rows, a process that searches twice scans an 8-bit copy
#                                (compressed.ByteCopy)
_COPY_EXTRA = 128              # candidates per part beyond 4k that the 8-bit scan hands to the exact re-scoring
_GATHER_FRACTION = 1 / 8       # a filter allowing at most N/8 rows of a flat index gathers and scores just those; more
#                                scores every row (100k x 512: gathering N/8 took 7.4 ms, N/4 26 ms, a full scan 11-13)
_ROWS_ALIGN = 64               # a saved flat index's rows start at a multiple of this in the file (numpy's BLAS needs
#                                aligned floats: an unaligned scan took 60 ms against 13 ms at 100k x 512)


class VectorFileError(Exception):
    """The FAISS file is missing, truncated or not ours; the caller rebuilds it from SQLite."""


class VectorSource(Protocol):
    """What a rebuild needs from the store (kept abstract: this room knows no SQL)."""

    def vectors_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]: ...


@dataclass
class SearchResult:
    ids: np.ndarray     # int64, best first
    scores: np.ndarray  # float32 inner products (cosine similarity for unit vectors)


# the policy -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How the vectors are indexed; chosen by `choose_plan` and recorded in the file header."""

    kind: str = FLAT
    pq_m: int = 0         # sub-quantizers of the 4-bit fast-scan codes (dim / 2: two bits per dimension)
    refine: str = ""      # the copy candidates are re-scored from: "fp16" (near exact) or "sq8"
    shards: int = 1       # the scan is split into this many parts, searched in parallel (one per core)
    candidates: float = 0.0  # re-scored candidates per query = candidates * sqrt(N) (for k <= 10)

    def bytes_per_vector(self, dim: int) -> float:
        """Resident bytes per indexed vector, FAISS structures and this room's id arrays included."""
        if self.kind == FLAT:
            return 4 * dim + 8 + 32  # float32 row, id, IndexIDMap2's reverse hash map entry
        refine = 2 * dim if self.refine == "fp16" else dim
        return self.pq_m / 2 + 8 + refine + 8 + 1  # code, scan id, re-ranking row, row id, alive flag

    def memory(self, n: int, dim: int) -> int:
        return int(n * self.bytes_per_vector(dim))


def choose_plan(n: int, dim: int, memory_budget: int | None = None, flat_max: int | None = None,
                shards: int | None = None) -> Plan:
    """Exact while small (and while float32 copies fit the budget); beyond, PQ fast-scan with an fp16 re-ranking
    copy, or an SQ8 one when fp16 does not fit. Past what SQ8 fits, SQ8 is still chosen: it is the smallest this
    room builds, and an index over budget beats none. Unset limits are the module's MEMORY_BUDGET and FLAT_MAX,
    read at call time."""
    memory_budget = MEMORY_BUDGET if memory_budget is None else memory_budget
    flat_max = FLAT_MAX if flat_max is None else flat_max
    flat = Plan()
    if n <= flat_max and flat.memory(n, dim) <= memory_budget:
        return flat
    shards = shards or max(1, min(4, os.cpu_count() or 1))
    for refine in ("fp16", "sq8"):
        plan = Plan(PQ_REFINE, _pq_subquantizers(dim), refine, shards, CANDIDATES_PER_SQRT_N)
        if plan.memory(n, dim) <= memory_budget:
            return plan
    return plan


def _pq_subquantizers(dim: int) -> int:
    """The largest divisor of dim that is at most dim / 2 (PQ needs equal sub-vectors): 512 -> 256. Two bits per
    dimension, not one: on 1M random 512-d vectors, dim / 4 (64-byte codes) needed 7000 candidates for recall@10 0.95,
    and fetching them from the 1 GB fp16 copy (random reads) cost more than scanning 128-byte codes saves."""
    target = max(1, dim // 2)
    return max(m for m in range(1, target + 1) if dim % m == 0)


# the index --------------------------------------------------------------------------------------------------------
class VectorIndex:
    """Inner-product search over unit vectors, addressable by SQLite id; exact or compressed as its plan says."""

    def __init__(self, dim: int, generation: int = 0, engine: "_Flat | PQRefine | None" = None,
                 trained_n: int = 0) -> None:
        self.dim = dim
        self.generation = generation
        self.engine = engine if engine is not None else _Flat(dim)
        self.trained_n = trained_n  # N when the compressed codes were trained (0 for flat)
        self._file: tuple[Path, int] | None = None  # (file, generation) the contents were last read from or written to
        self._searches = 0

    @property
    def plan(self) -> Plan:
        return self.engine.plan

    @property
    def kind(self) -> str:
        return self.plan.kind

    @property
    def lossy(self) -> bool:
        """True when `reconstruct` returns a compressed copy rather than the exact vector."""
        return self.kind != FLAT

    @property
    def tolerance(self) -> float:
        """Largest absolute difference `reconstruct` may show against the exact vector, per component."""
        return self.engine.tolerance

    # building -----------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, generation: int, plan: Plan | None = None, *,
              memory_budget: int | None = None, flat_max: int | None = None) -> "VectorIndex":
        """An index over `vectors` (rows of float32, ids aligned), planned for their number unless `plan` is given."""
        ids = np.asarray(ids, dtype=np.int64)
        plan = plan or choose_plan(len(ids), dim, memory_budget, flat_max)
        sample = None
        if plan.kind != FLAT and len(ids):
            rows = np.random.default_rng(0).choice(len(ids), min(len(ids), TRAIN_SAMPLE), replace=False)
            sample = np.asarray(vectors[np.sort(rows)], dtype=np.float32)
        chunks = ((ids[i:i + _CHUNK], vectors[i:i + _CHUNK]) for i in range(0, len(ids), _CHUNK))
        return cls.build_streaming(dim, chunks, generation, plan, sample=sample, n=len(ids))

    @classmethod
    def build_streaming(cls, dim: int, chunks: Iterable[tuple[np.ndarray, np.ndarray]], generation: int, plan: Plan,
                        *, sample: np.ndarray | None = None, n: int = 0) -> "VectorIndex":
        """Build from (ids, vectors) chunks, so a million vectors never sit in memory as float32 all at once.
        A compressed plan trains on `sample` (a few thousand rows spread over the whole collection)."""
        if plan.kind == FLAT:
            engine: _Flat | PQRefine = _Flat(dim)
        else:
            if sample is None or not len(sample):
                engine, n = _Flat(dim), 0  # nothing to train on means nothing to index: an empty exact index
            else:
                from .compressed import PQRefine

                engine = PQRefine.trained(dim, plan, np.ascontiguousarray(sample, dtype=np.float32))
        built = cls(dim, generation, engine, trained_n=n if engine.plan.kind != FLAT else 0)
        for ids, vectors in chunks:
            built.add(ids, vectors)
        if built.lossy:
            built.trained_n = max(built.trained_n, built.ntotal)
        return built

    @classmethod
    def from_source(cls, dim: int, source: VectorSource, plan: Plan | None = None, *,
                    memory_budget: int | None = None, flat_max: int | None = None) -> "VectorIndex":
        generation, ids, vectors = source.vectors_snapshot()
        return cls.build(dim, ids, vectors, generation, plan, memory_budget=memory_budget, flat_max=flat_max)

    def needs_rebuild(self, n: int | None = None, *, memory_budget: int | None = None,
                      flat_max: int | None = None) -> bool:
        """True when an index of `n` vectors (default: what it holds) should be rebuilt with `from_source`: N crossed
        the flat threshold (upwards; downwards only below half of it, so an index near the line does not flip back and
        forth), the budget now calls for another re-ranking copy, or the collection outgrew what its codes were
        trained on."""
        n = self.ntotal if n is None else n
        flat_max = FLAT_MAX if flat_max is None else flat_max
        target = choose_plan(n, self.dim, memory_budget, flat_max, self.plan.shards)
        if self.kind == FLAT:
            return target.kind != FLAT
        if target.kind == FLAT:
            return n < flat_max // 2
        return target.refine != self.plan.refine or n > RETRAIN_GROWTH * max(self.trained_n, 1)

    def saved_at(self, path: Path) -> bool:
        """Whether `path` holds exactly these contents: loaded from or saved to it, unchanged since. A writer whose
        run changed nothing skips rewriting the file (1M vectors: over a GB)."""
        return self._file == (Path(path), self.generation) and Path(path).exists()

    # contents -----------------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return self.engine.ntotal

    def ids(self) -> np.ndarray:
        """Every id the index holds (int64, no particular order)."""
        return self.engine.ids()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
            self._file = None
            self.engine.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> None:
        """Drop these ids; ids the index does not hold are ignored."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self._file = None
            self.engine.remove(ids)

    def reconstruct(self, image_id: int) -> np.ndarray:
        """The stored vector of one id (exact for flat; within `tolerance` otherwise). KeyError if absent."""
        return self.engine.reconstruct_batch(np.asarray([image_id], dtype=np.int64))[0]

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of many ids at once (rows aligned with `ids`), for comparing the index with SQLite."""
        return self.engine.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def warm(self) -> None:
        """Prepare now what a long-lived process's searches use, otherwise done by its second search (the flat
        index's 8-bit copy: 0.3 s at 100k; the compressed index's codes moved onto huge pages: 0.1 s at 1M), so a
        server's first queries cost what every query costs."""
        self.engine.warm()

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        """Top-k ids for one query vector. `allowed` restricts the search to those ids: never an id outside it, and
        when it is small the allowed vectors are scored one by one rather than through the approximate scan."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise BadInput(f"query has {query.shape[1]} dimensions, the index {self.dim}")
        k = min(k, self.ntotal)
        if k <= 0:
            return SearchResult(np.empty(0, np.int64), np.empty(0, np.float32))
        if allowed is not None:  # sorted, without repeats (np.unique hashes: 15 ms for 50k ids, this 1 ms)
            allowed = np.sort(np.asarray(allowed, dtype=np.int64).ravel())
            allowed = allowed[np.concatenate(([True], allowed[1:] != allowed[:-1]))]
        self._searches += 1
        if self._searches >= 2:  # a long-lived process (a one-query CLI never pays for warm(); cheap once done)
            self.engine.warm()
        scores, ids = self.engine.search(query, k, allowed)
        keep = ids >= 0
        return SearchResult(ids[keep].astype(np.int64), scores[keep].astype(np.float32))

    # persistence --------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        path = Path(path)
        self.engine.compact()
        header = json.dumps({"generation": self.generation, "dim": self.dim, "kind": self.kind,
                             "ntotal": self.ntotal, "plan": asdict(self.plan), "trained_n": self.trained_n}).encode()
        if isinstance(self.engine, _Flat):  # JSON ignores trailing spaces: they put the rows on an aligned offset
            header += b" " * (-(len(MAGIC) + _HEADER_LEN.size + len(header) + _FLAT_ROWS_AT) % _ROWS_ALIGN)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as out:  # the umask's mode, like the database: tempfile's 0600 kept other users out
                out.write(MAGIC)
                out.write(_HEADER_LEN.pack(len(header)))
                out.write(header)
                self.engine.write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._file = (path, self.generation)

    @classmethod
    def load(cls, path: Path, *, mapped: bool = True) -> "VectorIndex":
        """The saved index. Its bulk stays in the mapped file (a flat index's rows; a compressed one's re-ranking
        copies), read as searches need it; `mapped=False` reads a compressed index's copies into memory, as a writer
        that will change them wants (taking them from a mapping later would hold both at once)."""
        try:
            handle = Path(path).open("rb")
        except FileNotFoundError as exc:
            raise VectorFileError(f"{path} is missing") from exc
        with handle:
            if handle.read(len(MAGIC)) != MAGIC:
                raise VectorFileError(f"{path} is not a clipsearch FAISS file")
            try:
                (length,) = _HEADER_LEN.unpack(handle.read(_HEADER_LEN.size))
                header = json.loads(handle.read(length))
                dim, ntotal = int(header["dim"]), int(header["ntotal"])
                generation, trained_n = int(header["generation"]), int(header.get("trained_n", 0))
                plan = Plan(**header.get("plan", {"kind": header["kind"]}))
                # One mapping of the whole file, read in place by the engine (a flat index always maps its rows)
                mapping = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), np.uint8) \
                    if mapped or plan.kind == FLAT else None
                if plan.kind == FLAT:
                    engine: _Flat | PQRefine = _Flat.read(handle, dim, mapping)
                else:
                    from .compressed import PQRefine

                    engine = PQRefine.read(handle, dim, plan, ntotal, mapping)
                trailing = handle.read(1)  # each reader leaves the handle where its part ends
            except (struct.error, ValueError, TypeError, KeyError, AttributeError, RuntimeError, MemoryError) as exc:
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise VectorFileError(f"{path} is damaged ({reason[:200]})") from exc
        if trailing or engine.ntotal != ntotal or engine.dim != dim:
            raise VectorFileError(f"{path} is damaged (header and body disagree)")
        loaded = cls(dim, generation, engine, trained_n)
        if not (isinstance(engine, _Flat) and engine.unaligned):  # else the next writer's save puts the rows in line
            loaded._file = (Path(path), generation)
        return loaded


def read_header(path: Path) -> dict | None:
    """The header of a saved index (generation, dim, kind, ntotal, plan, trained_n) without reading its body, for
    `clipsearch info`; None when the file is missing or not readable as ours."""
    try:
        with Path(path).open("rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                return None
            (length,) = _HEADER_LEN.unpack(handle.read(_HEADER_LEN.size))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError):
        return None
    return header if isinstance(header, dict) else None


# the exact engine -------------------------------------------------------------------------------------------------
_INDEX_HEADER = struct.Struct("<4siqqqBi")  # FAISS's index header: fourcc, d, ntotal, 2 unused, is_trained, metric
_LENGTH = struct.Struct("<Q")
_FLAT_ROWS_AT = 2 * _INDEX_HEADER.size + _LENGTH.size  # where the rows start in FAISS's IndexIDMap2(IndexFlatIP) bytes


@dataclass
class _MappedRows:
    """A saved flat index's rows and ids, read in place from the mapped file (FAISS's IndexIDMap2(IndexFlatIP)
    layout: "IxM2" header, "IxFI" header, the rows' float count and floats, the ids' count and int64s)."""

    buffer: np.ndarray  # the whole mapped file, as bytes
    start: int          # where the FAISS bytes begin
    end: int            # and end
    rows: np.ndarray    # float32 (n, dim), a view into `buffer`
    ids: np.ndarray     # int64 (n,), copied (small, and aligned)

    @classmethod
    def parse(cls, buffer: np.ndarray, start: int, dim: int) -> "_MappedRows | None":
        """None when the bytes are not that layout as this reader knows it (FAISS then reads them itself)."""
        try:
            counts = []
            for at, fourcc in ((start, b"IxM2"), (start + _INDEX_HEADER.size, b"IxFI")):
                tag, d, n, _unused, _unused2, _trained, metric = _INDEX_HEADER.unpack_from(buffer, at)
                if tag != fourcc or d != dim or metric != 0 or n < 0:  # metric 0: inner product
                    return None
                counts.append(n)
            n = counts[0]
            at = start + _FLAT_ROWS_AT
            if counts[1] != n or _LENGTH.unpack_from(buffer, at - _LENGTH.size)[0] != n * dim:
                return None
            rows = np.frombuffer(buffer, np.float32, n * dim, at).reshape(n, dim)
            at += rows.nbytes + _LENGTH.size
            if _LENGTH.unpack_from(buffer, at - _LENGTH.size)[0] != n:
                return None
            ids = np.frombuffer(buffer, "<i8", n, at).astype(np.int64)
        except (struct.error, ValueError):
            return None
        return cls(buffer, start, at + ids.nbytes, rows, ids)


class _Flat:
    """Exact inner product over float32 rows, scored by numpy (its BLAS scans 100k x 512 in 11-13 ms on 2 cores,
    as fast as FAISS's flat scan).

    A loaded index reads the rows in place from the mapped file (`_MappedRows`) and needs no FAISS: a new process
    answers its first query without copying 200 MB at 100k vectors, or importing FAISS (70-200 ms here). Once the
    rows change, FAISS's IndexIDMap2 holds its own copy (the mapping is read-only; a writer replaces the file, never
    edits it); that is also what it writes."""

    plan = Plan()
    tolerance = 0.0

    def __init__(self, dim: int, index: faiss.IndexIDMap2 | None = None, mapped: _MappedRows | None = None) -> None:
        self.dim = dim
        self._index = index    # FAISS's copy, once the rows are ours (None: empty, or still mapped)
        self._mapped = mapped  # the rows read in place, until the first change
        self._id_array: np.ndarray | None = None  # row -> id, cached
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (ids sorted, their rows), built on demand
        self._copy: ByteCopy | None = None  # 8-bit copy of the rows, built on the second search
        self._copy_tried = False  # built, or found impossible (NaN rows, FAISS): not tried again until a change

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal) if self._index is not None else len(self._row_ids())

    @property
    def unaligned(self) -> bool:
        """Whether the rows are read in place from a file written before they were aligned (slower to scan)."""
        return self._mapped is not None and self._mapped.rows.ctypes.data % _ROWS_ALIGN != 0

    def ids(self) -> np.ndarray:
        return self._row_ids().copy()

    def _owned(self) -> faiss.IndexIDMap2:
        """FAISS's copy of the rows, made (from the mapped file) on the first change; cached views are dropped."""
        import faiss

        if self._index is None:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            if self._mapped is not None:
                self._index.add_with_ids(self._mapped.rows, self._mapped.ids)
                self._mapped = None
        self._id_array = self._lookup = None
        self._copy, self._copy_tried = None, False
        return self._index

    def _rows(self) -> np.ndarray:
        """The float32 rows (mapped or FAISS's), as an array that reads them in place."""
        if self._mapped is not None:
            return self._mapped.rows
        if self._index is None:
            return np.empty((0, self.dim), np.float32)
        import faiss

        flat = faiss.downcast_index(self._index.index)
        return faiss.rev_swig_ptr(flat.get_xb(), self._index.ntotal * self.dim).reshape(-1, self.dim)

    def _row_ids(self) -> np.ndarray:
        if self._mapped is not None:
            return self._mapped.ids
        if self._id_array is None:
            if self._index is None:
                return np.empty(0, np.int64)
            import faiss

            self._id_array = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return self._id_array

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._owned().add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self._owned().remove_ids(ids)

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        if self._lookup is None:
            order = np.argsort(self._row_ids(), kind="stable")
            self._lookup = (self._row_ids()[order], order)
        keys, positions = self._lookup
        at = np.minimum(np.searchsorted(keys, ids), max(len(keys) - 1, 0))
        missing = ~(keys[at] == ids) if len(keys) else np.ones(len(ids), bool)
        if missing.any():
            raise KeyError(f"id {int(ids[missing][0])} is not in the index")
        return self._rows()[positions[at]]  # indexing by an array copies: the rows are the caller's

    def warm(self) -> None:
        if self.ntotal >= _COPY_MIN and not self._copy_tried:
            from .compressed import ByteCopy

            self._copy_tried = True
            self._copy = ByteCopy.of(self._rows(), self._parts())

    def _parts(self) -> int:
        """Threads the 8-bit copy is split between (1: not split)."""
        return max(1, min(usable_cores(), self.ntotal // _SPLIT_MIN))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        mask = None if allowed is None else self._allowed_rows(allowed)
        if self.ntotal >= _COPY_MIN:
            wanted = 4 * k + _COPY_EXTRA  # candidates per part
            population = self.ntotal if allowed is None else len(allowed)
            if self._copy is not None and wanted <= population // 32:  # else re-scoring costs more than it saves
                found = self._certified_search(query, k, wanted, mask)
                if found is not None:
                    return found
        rows = self._rows()
        with np.errstate(all="ignore"):  # rows holding inf or NaN score as such, without a warning
            if mask is None:
                scores, positions = rows @ query[0], None
            else:
                positions = np.flatnonzero(mask)
                gather = len(positions) <= _GATHER_FRACTION * len(rows)
                scores = rows[positions] @ query[0] if gather else (rows @ query[0])[positions]
        best = _top(scores, k)
        return scores[best], self._row_ids()[best if positions is None else positions[best]]

    def _allowed_rows(self, allowed: np.ndarray) -> np.ndarray:
        """Which rows hold an allowed id, as a bool per row: a lookup table when ids are dense enough (SQLite row
        ids usually are: 0.6 ms at 100k), else a sorted membership test."""
        row_ids = self._row_ids()
        largest = max(int(row_ids.max(initial=0)), int(allowed.max(initial=0)))
        if allowed.size and int(allowed.min()) >= 0 and largest < 8 * (len(row_ids) + len(allowed)) + 1_000_000:
            table = np.zeros(largest + 1, bool)
            table[allowed] = True
            return table[row_ids]
        return np.isin(row_ids, allowed)

    def _certified_search(self, query: np.ndarray, k: int, wanted: int,
                          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact top k from the 8-bit scan: its best candidates are re-scored from the float32 rows, and the answer
        is returned only when no row left out can beat the k-th, given the 8-bit scores' error bound; otherwise every
        row the bound cannot rule out is re-scored as well. A quarter of the bytes of the float32 scan, which memory
        bandwidth bounds, in integer arithmetic: 100k x 512 on 2 cores, 5.2 ms a query against 12.0 for the float32
        scan and 8.5 for the fp16 copy this replaced (one process, random vectors, busy machine). `mask` (a bool per
        row, True where the filter allows it) restricts both scans: with half the rows allowed a query takes about as
        long, where FAISS's id selector over the float32 rows took 8x longer than an unfiltered search. None for a
        zero query."""
        copy = self._copy
        assert copy is not None
        quantized = copy.quantize(query)
        if quantized is None:
            return None
        integers, t, error = quantized
        rows = self._rows()

        def best_of(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            exact = rows[positions] @ query[0]
            best = _top(exact, k)
            return exact[best], positions[best], exact[best[-1]]

        found = copy.search(integers, t, wanted, mask)
        candidates = np.concatenate([p for _s, p in found])
        if not len(candidates):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        scores, positions, kth = best_of(candidates)
        unseen = max((float(s[-1]) for s, p in found if len(p) == wanted), default=-np.inf)  # best score left out
        if unseen + error >= kth:  # a row outside the candidates might reach the k-th: take all that could
            scores, positions, _kth = best_of(np.union1d(candidates, copy.above(integers, t, float(kth) - error, mask)))
        return scores, self._row_ids()[positions]

    def compact(self) -> None:
        pass  # removal is immediate

    def write(self, out: BinaryIO) -> None:
        if self._mapped is not None:  # unchanged since loaded: the file's own FAISS bytes
            out.write(self._mapped.buffer[self._mapped.start:self._mapped.end])
            return
        from .compressed import write_index

        write_index(self._owned() if self._index is None else self._index, out)

    @classmethod
    def read(cls, handle: BinaryIO, dim: int, mapping: np.ndarray) -> "_Flat":
        """The index at the handle's position, its rows left in `mapping` (the whole file, mapped); the handle is left
        where the index ends."""
        mapped = _MappedRows.parse(mapping, handle.tell(), dim)
        if mapped is not None:
            handle.seek(mapped.end)
            return cls(dim, mapped=mapped)
        import faiss  # a layout the parser does not know (another FAISS version's): FAISS reads it into memory

        from .compressed import read_index

        index = read_index(handle)
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            raise ValueError("header and body disagree")
        return cls(dim, index)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, best first (equal scores: lower position first; NaN last)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, np.int64)
    order = -scores
    best = np.argpartition(order, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return best[np.lexsort((best, order[best]))]
