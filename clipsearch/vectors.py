"""The `vectors` room: the FAISS index, a derived cache of the vectors stored in SQLite.

FAISS ids are SQLite row ids. The file on disk carries a small header with the store generation it reflects and the
plan it was built with, written atomically (temp file + rename), so a reader can always tell whether it is current,
stale, or damaged.

Two kinds of index, chosen from N, the dimension and a memory budget by `choose_plan`:

- `flat-ip` (small collections): exact inner product over float32 copies.
- `pq-refine` (large ones): every vector is scanned as a 4-bit product-quantised code with FAISS fast-scan (SIMD
  lookups, one bit per dimension), the scan split into shards searched in parallel; the best candidates are then
  re-scored from a near-exact copy (fp16, or SQ8 when fp16 does not fit the budget). Graph (HNSW) and partition (IVF)
  indexes were measured and rejected: on unstructured 512-d data HNSW had to visit 82% of 100k vectors for 0.96
  recall@10 and IVF cannot prune (a neighbour's cell is nearly unrelated to the query's), and CLIP text queries sit
  apart from the image vectors they are compared with, where pruning indexes lose recall. An exhaustive compressed
  scan has no such cliff; see bench/million.py for what it costs at 1,000,000 vectors. RaBitQ (faiss 1.15
  IndexRaBitQFastScan) was measured as well: its 1-bit scan of 200k random 512-d vectors took more CPU than this PQ
  scan (4.3 vs 3.1 ms) for recall@10 0.87 in its best 1000, and its multi-bit search 25+ ms.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import faiss
import numpy as np

from .cores import usable_cores
from .errors import BadInput

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
_MIN_CANDIDATES = 100          # re-scoring 100 rows costs ~0.05 ms: a floor that keeps small collections near exact
TRAIN_SAMPLE = 16_384          # PQ k-means uses 4096 points per sub-quantizer; SQ8 ranges want a broader sample
_CHUNK = 65_536                # vectors encoded per step while building (bounds the float32 working set)
_DEAD_FRACTION = 1 / 8         # removed rows are compacted out of the re-ranking copy past this fraction
_EXACT_SCAN_RATIO = 1 / 32     # a filter of at most N/32 ids (plus the candidates) is scored exactly, id by id:
#                                re-scoring one id costs about as much as scanning 32 codes (bench/million.py --filtered)
_SPLIT_MIN = 32_768            # an exact scan is split between threads once each part has at least this many rows
_COPY_MIN = 32_768             # from this many rows, a process that searches twice scans an 8-bit copy (see _ByteCopy)
_COPY_EXTRA = 128              # candidates per part beyond 4k that the 8-bit scan hands to the exact re-scoring
_BYTE_CHUNK = 4_096            # rows encoded per step into the 8-bit copy (three float32 temporaries of this many)
_T = TypeVar("_T")
_REFINE_TYPES = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}


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

    def __init__(self, dim: int, generation: int = 0, engine: "_Flat | _PQRefine | None" = None,
                 trained_n: int = 0) -> None:
        self.dim = dim
        self.generation = generation
        self.engine = engine if engine is not None else _Flat(dim)
        self.trained_n = trained_n  # N when the compressed codes were trained (0 for flat)
        self._file: tuple[Path, int] | None = None  # (file, generation) the contents were last read from or written to

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
            engine: _Flat | _PQRefine = _Flat(dim)
        else:
            if sample is None or not len(sample):
                engine, n = _Flat(dim), 0  # nothing to train on means nothing to index: an empty exact index
            else:
                engine = _PQRefine.trained(dim, plan, np.ascontiguousarray(sample, dtype=np.float32))
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
        """Build now what a long-lived process's searches use (the flat index's 8-bit copy, otherwise built by its
        second search: 0.3 s at 100k), so a server's first queries cost what every query costs."""
        if isinstance(self.engine, _Flat):
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
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(MAGIC)
                out.write(_HEADER_LEN.pack(len(header)))
                out.write(header)
                self.engine.write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._file = (path, self.generation)

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
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
                if plan.kind == FLAT:
                    engine, end = _Flat.read_mapped(handle, dim)
                    trailing = b"" if end == os.fstat(handle.fileno()).st_size else b"+"
                else:
                    engine = _PQRefine.read(handle, dim, plan, ntotal)
                    trailing = handle.read(1)
            except (struct.error, ValueError, TypeError, KeyError, AttributeError, RuntimeError, MemoryError) as exc:
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise VectorFileError(f"{path} is damaged ({reason[:200]})") from exc
        if trailing or engine.ntotal != ntotal or engine.dim != dim:
            raise VectorFileError(f"{path} is damaged (header and body disagree)")
        loaded = cls(dim, generation, engine, trained_n)
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


# engines ----------------------------------------------------------------------------------------------------------
class _Flat:
    """Exact inner product over float32 copies (IndexIDMap2 keeps SQLite ids and can reconstruct by id).

    A loaded index maps the file's vectors instead of reading them (`read_mapped`): a new process answers its first query
    without copying 200 MB at 100k vectors. FAISS reads the mapping in place, so the engine keeps it alive and takes
    its own copy before the first change (the mapping is read-only; a writer replaces the file, never edits it)."""

    plan = Plan()
    tolerance = 0.0

    def __init__(self, dim: int, index: faiss.Index | None = None, mapping: object | None = None) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._mapping = mapping  # the buffer FAISS reads the vectors from, when they are mapped
        self._id_array: np.ndarray | None = None  # row -> id, cached for the split scan
        self._copy: _ByteCopy | None = None  # 8-bit copy of the rows, built on the second search
        self._copy_tried = False  # built, or found impossible (NaN rows, FAISS): not tried again until a change
        self._searches = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def _own(self) -> None:
        if self._mapping is not None:
            self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
            self._mapping = None
        self._id_array = None
        self._copy, self._copy_tried = None, False

    def _rows(self) -> np.ndarray:
        """The float32 rows FAISS holds (mapped or owned), as an array that reads them in place."""
        flat = faiss.downcast_index(self.index.index)
        return faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)

    def _row_ids(self) -> np.ndarray:
        if self._id_array is None:
            self._id_array = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return self._id_array

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._own()
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self._own()
        self.index.remove_ids(ids)

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for row, image_id in enumerate(ids.tolist()):
            try:
                out[row] = self.index.reconstruct(image_id)
            except RuntimeError as exc:
                raise KeyError(f"id {image_id} is not in the index") from exc
        return out

    def warm(self) -> None:
        if self.ntotal >= _COPY_MIN and not self._copy_tried:
            self._copy_tried = True
            self._copy = _ByteCopy.of(self._rows(), self._parts())

    def _parts(self) -> int:
        """Threads a scan of these rows is split between (1: not split)."""
        return max(1, min(usable_cores(), self.ntotal // _SPLIT_MIN))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if self.ntotal >= _COPY_MIN:
            self._searches += 1
            if self._searches >= 2:
                self.warm()
            wanted = 4 * k + _COPY_EXTRA  # candidates per part
            population = self.ntotal if allowed is None else len(allowed)
            if self._copy is not None and wanted <= population // 32:  # else re-scoring costs more than it saves
                mask = None if allowed is None else self._allowed_rows(allowed)
                found = self._certified_search(query, k, wanted, mask)
                if found is not None:
                    return found
        if allowed is None and self._parts() > 1:
            return self._split_search(query, k)
        params = None if allowed is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        with _single_threaded():  # one query: OpenMP threads cost more than they bring (4x slower on 2 busy cores)
            scores, ids = self.index.search(query, k, params=params)
        return scores[0], ids[0]

    def _split_search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The scan is bound by memory bandwidth, which one core does not saturate: split the rows between threads
        (FAISS releases the GIL), each scanning its part exactly, and merge their top k. 1.4x faster than one
        thread at 100k x 512 on 2 cores."""
        rows = self._rows()

        def scan(start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
            scores, positions = faiss.knn(query, rows[start:end], min(k, end - start), faiss.METRIC_INNER_PRODUCT)
            return scores[0], positions[0] + start

        results = _side_by_side(scan, _part_bounds(self.ntotal, self._parts()))
        scores = np.concatenate([s for s, _p in results])
        positions = np.concatenate([p for _s, p in results])
        best = np.argsort(-scores, kind="stable")[:k]
        return scores[best], self._row_ids()[positions[best]]

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
            best = np.argsort(-exact, kind="stable")[:k]
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
        _write_index(self.index, out)

    @classmethod
    def read_mapped(cls, handle: BinaryIO, dim: int) -> tuple["_Flat", int]:
        """The index at the handle's position, its vectors left in the mapped file; (engine, offset where it ends)."""
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        buffer = np.frombuffer(mapping, dtype=np.uint8)
        reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(buffer), buffer.size)
        reader.rp_ = handle.tell()
        try:
            index = faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC)
        finally:
            end = int(reader.rp_)
            del reader
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2):
            raise ValueError("header and body disagree")
        return cls(dim, index, buffer), end


class _ByteCopy:
    """8-bit integer copies of a flat index's rows, in parts scanned by parallel threads, and the bound on their
    scores' error.

    Dimension i is scaled by s_i (its largest magnitude maps to L, at most 127) and rounded: c = rint(s * x). A query
    becomes integers too, qq = rint(t * q / s) with t scaling its largest component to L, so FAISS scores every row
    with exact integer arithmetic (its 8-bit by 8-bit kernel, twice as fast as the fp16 scan, on half the bytes)
    and S / t approximates q.x. With A = t q / s and b = s * x, S - t q.x = qq.(c - b) + (qq - A).b, so by
    Cauchy-Schwarz |S/t - q.x| <= (|qq| R + |qq - A| B) / t, where R and B are the largest |c - b| and |b| over the
    rows, measured while building; the float32 re-score of the candidates adds at most 1.01 d 2^-24 |q| max|x|.
    L keeps every integer sum below 2^24, so even float32 accumulation is exact."""

    def __init__(self, parts: list[tuple[int, faiss.IndexScalarQuantizer]], scale: np.ndarray, limit: int,
                 residual: float, scaled_norm: float, max_norm: float) -> None:
        self.parts = parts  # (first row, 8-bit index of the rows from there)
        self.scale = scale  # s, float64 copies of the float32 factors the rows were multiplied by
        self.limit = limit  # L
        self.residual = residual  # R
        self.scaled_norm = scaled_norm  # B
        self.max_norm = max_norm  # max |x|

    @classmethod
    def of(cls, rows: np.ndarray, parts: int) -> "_ByteCopy | None":
        """Two passes over the rows (largest magnitudes, then codes), in parallel parts: about 0.3 s once at
        100k x 512. None when the rows hold NaN or infinity, or FAISS does not score integers exactly."""
        n, dim = rows.shape
        limit = min(127, math.isqrt((1 << 24) // dim))
        if not _scores_integers_exactly(dim, limit):
            return None
        bounds = _part_bounds(n, parts)

        def largest(start: int, end: int) -> np.ndarray:
            peak = np.zeros(dim, np.float32)
            for i in range(start, end, _BYTE_CHUNK):
                np.maximum(peak, np.abs(rows[i:min(i + _BYTE_CHUNK, end)]).max(axis=0, initial=0.0), out=peak)
            return peak

        with np.errstate(all="ignore"):
            peak = np.maximum.reduce(_side_by_side(largest, bounds))
            if not np.isfinite(peak).all():
                return None
            scale = np.where(peak > 0, np.float32(limit) / np.maximum(peak, np.float32(1e-30)), 1).astype(np.float32)
        if not np.isfinite(scale).all():
            return None

        def encode(start: int, end: int) -> tuple[faiss.IndexScalarQuantizer, float, float, float]:
            index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                               faiss.METRIC_INNER_PRODUCT)
            worst = [0.0, 0.0, 0.0]  # largest |c - b|^2, |b|^2, |x|^2 (float32 b = fl(s x): slack added below)
            buffers = np.empty((3, min(_BYTE_CHUNK, end - start), dim), np.float32)  # reused: no page faults per chunk
            for i in range(start, end, _BYTE_CHUNK):
                chunk = rows[i:min(i + _BYTE_CHUNK, end)]
                scaled, codes, residual = (buffer[:len(chunk)] for buffer in buffers)
                np.multiply(chunk, scale, out=scaled)
                np.clip(np.rint(scaled, out=codes), -limit, limit, out=codes)
                np.subtract(codes, scaled, out=residual)
                for j, part in enumerate((residual, scaled, chunk)):
                    worst[j] = max(worst[j], float(np.einsum("ij,ij->i", part, part).max(initial=0)))
                index.add(codes)
            return index, *worst

        built = _side_by_side(encode, bounds)
        slack = 1 + 1.01 * dim * 2.0 ** -24  # the float32 sums of squares above, and their square roots
        rounding = math.sqrt(dim) * (limit + 1) * 2.0 ** -24  # |fl(s x) - s x|, componentwise
        residual = math.sqrt(max(b[1] for b in built)) * slack + rounding
        scaled_norm = math.sqrt(max(b[2] for b in built)) * slack + rounding
        max_norm = math.sqrt(max(b[3] for b in built)) * slack
        return cls([(start, b[0]) for (start, _e), b in zip(bounds, built)], scale.astype(np.float64), limit,
                   residual, scaled_norm, max_norm)

    def quantize(self, query: np.ndarray) -> tuple[np.ndarray, float, float] | None:
        """(integer query, t, error bound on S/t - q.x plus the float32 re-score's), or None for a zero query."""
        divided = query[0].astype(np.float64) / self.scale
        top = float(np.abs(divided).max())
        if not top > 0 or not np.isfinite(top):
            return None
        t = self.limit / top
        exact = divided * t
        integers = np.rint(exact)
        rounding = np.linalg.norm(integers) * self.residual + np.linalg.norm(integers - exact) * self.scaled_norm
        length = float(np.linalg.norm(query[0].astype(np.float64)))
        rescore = 1.01 * len(self.scale) * 2.0 ** -24 * length * self.max_norm  # the float32 re-score of a candidate
        error = rounding * (1 + 1e-6) / t + rescore
        return integers.astype(np.float32)[None], t, float(error)

    def search(self, integers: np.ndarray, t: float, k: int,
               mask: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per part: (approximate scores S/t, row positions) of its best k rows (of those the mask allows), best
        first (fewer when the part has fewer)."""
        def scan(start: int, index: faiss.IndexScalarQuantizer) -> tuple[np.ndarray, np.ndarray]:
            with _only(mask, start, index.ntotal) as params:
                scores, positions = index.search(integers, min(k, index.ntotal), params=params)
            found = positions[0] >= 0
            return scores[0][found].astype(np.float64) / t, positions[0][found] + start

        return _side_by_side(scan, self.parts)

    def above(self, integers: np.ndarray, t: float, score: float, mask: np.ndarray | None = None) -> np.ndarray:
        """Positions of the rows (of those the mask allows) whose approximate score S/t is at least `score`."""
        radius = math.floor(score * t) - 0.5  # S is an integer; range search keeps S > radius

        def scan(start: int, index: faiss.IndexScalarQuantizer) -> tuple[np.ndarray, np.ndarray]:
            with _only(mask, start, index.ntotal) as params:
                _limits, scores, positions = index.range_search(integers, radius, params=params)
            return scores, positions + start

        return np.concatenate([p for _s, p in _side_by_side(scan, self.parts)]).astype(np.int64)


@contextmanager
def _only(mask: np.ndarray | None, start: int, count: int) -> Iterator[faiss.SearchParameters | None]:
    """FAISS search parameters admitting the rows of one part that `mask` (a bool per row) marks; the bitmap lives
    until the search returns."""
    if mask is None:
        yield None
        return
    bits = np.packbits(mask[start:start + count], bitorder="little")
    yield faiss.SearchParameters(sel=faiss.IDSelectorBitmap(count, faiss.swig_ptr(bits)))


def _scores_integers_exactly(dim: int, limit: int) -> bool:
    """Whether this FAISS build stores integers in -limit..limit as given and scores an integer query against them
    exactly (its signed 8-bit codec and kernel are what the bound in _ByteCopy relies on)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-limit, limit + 1, (64, dim)).astype(np.float32)
    codes[0], codes[1] = limit, -limit
    query = rng.integers(-limit, limit + 1, (1, dim)).astype(np.float32)
    probe = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT)
    probe.add(codes)
    scores, positions = probe.search(query, len(codes))
    expected = codes.astype(np.int64) @ query[0].astype(np.int64)
    return bool(np.array_equal(probe.reconstruct_n(0, len(codes)), codes)
                and np.array_equal(scores[0].astype(np.int64), expected[positions[0]]))


class _PQRefine:
    """PQ 4-bit fast-scan over every vector, then the best candidates re-scored from an fp16/SQ8 copy.

    The vectors are split into `plan.shards` parts searched in parallel threads (one per core), each scanning its own
    codes and re-scoring its own candidates, so both steps use every core; the parts' top k are merged."""

    def __init__(self, dim: int, plan: Plan, shards: list["_Shard"]) -> None:
        self.dim = dim
        self.plan = plan
        self.shards = shards

    @classmethod
    def trained(cls, dim: int, plan: Plan, sample: np.ndarray) -> "_PQRefine":
        with _single_threaded():  # k-means over 4-d sub-spaces: OpenMP start-up costs more than it saves (10x on 2 busy cores)
            scan = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, 1, plan.pq_m, 4, faiss.METRIC_INNER_PRODUCT)
            scan.by_residual = False
            scan.cp.min_points_per_centroid = 1     # small samples are fine for a single list and 16-centroid
            scan.pq.cp.min_points_per_centroid = 1  # codebooks, and FAISS would otherwise warn on stderr
            if len(sample) < 16:  # k-means needs a point per centroid: repeat a tiny sample (duplicate codewords)
                sample = np.tile(sample, (-(-16 // len(sample)), 1))
            scan.train(sample)
            store = faiss.IndexScalarQuantizer(dim, _REFINE_TYPES[plan.refine], faiss.METRIC_INNER_PRODUCT)
            store.sq.rangestat_arg = 0.1  # SQ8: widen each dimension's range so later vectors rarely clip
            store.train(sample)
        return cls(dim, plan, [_Shard(faiss.clone_index(scan), faiss.clone_index(store), np.empty(0, np.int64))
                               for _ in range(plan.shards)])

    @property
    def ntotal(self) -> int:
        return sum(shard.ntotal for shard in self.shards)

    @property
    def tolerance(self) -> float:
        if self.plan.refine == "fp16":
            return 2.0 ** -11  # half a unit in the last place for components below 1, with margin
        vdiff = faiss.vector_to_array(self.shards[0].store.sq.trained)[self.dim:]
        return float(vdiff.max()) / 255  # one quantisation step of the widest dimension

    def ids(self) -> np.ndarray:
        return np.concatenate([shard.ids() for shard in self.shards])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(ids)  # adding an id it holds replaces its vector, as a re-embedded file needs
        if len(ids) >= 32 * len(self.shards):
            for shard, part_ids, part in zip(self.shards, np.array_split(ids, len(self.shards)),
                                             np.array_split(vectors, len(self.shards))):
                shard.add(part_ids, part)
        else:  # small batches go to the smallest shard: the shards stay even over many batches
            min(self.shards, key=lambda shard: shard.ntotal).add(ids, vectors)

    def remove(self, ids: np.ndarray) -> None:
        for shard in self.shards:
            shard.remove(ids)

    def compact(self) -> None:
        for shard in self.shards:
            shard.compact()

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        for shard in self.shards:
            rows, where = shard.rows(ids, positions=True)
            if len(rows):
                out[where] = shard.store.reconstruct_batch(rows)
                found[where] = True
        if not found.all():
            raise KeyError(f"id {int(ids[~found][0])} is not in the index")
        return out

    def candidates(self, k: int, population: int) -> int:
        """How many scan results are re-scored: grows like sqrt(N) (the scan's error is fixed while the gaps between
        the top scores shrink) and like sqrt(k) past 10."""
        wanted = self.plan.candidates * math.sqrt(population) * math.sqrt(max(k, 10) / 10)
        return int(min(population, max(k, _MIN_CANDIDATES, math.ceil(wanted))))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        rows = [None if allowed is None else shard.rows(allowed) for shard in self.shards]
        sizes = [shard.ntotal if part is None else len(part) for shard, part in zip(self.shards, rows)]
        population = sum(sizes)
        if not population:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        wanted = self.candidates(k, population)
        jobs = [(shard, part, math.ceil(wanted * size / population))
                for shard, part, size in zip(self.shards, rows, sizes) if size]
        results = _side_by_side(lambda shard, part, budget: shard.search(query, k, budget, part), jobs)
        scores = np.concatenate([scores for scores, _ids in results])
        ids = np.concatenate([ids for _scores, ids in results])
        best = np.argsort(-scores, kind="stable")[:k]
        return scores[best], ids[best]

    def write(self, out: BinaryIO) -> None:
        for shard in self.shards:
            shard.write(out)

    @classmethod
    def read(cls, handle: BinaryIO, dim: int, plan: Plan, ntotal: int) -> "_PQRefine":
        shards = [_Shard.read(handle, dim) for _ in range(plan.shards)]
        if sum(shard.ntotal for shard in shards) != ntotal:
            raise ValueError("header and body disagree")
        return cls(dim, plan, shards)


class _Shard:
    """One part of a compressed index: a fast-scan IVF with a single list (IVF for its id storage, removal and id
    selectors, not for pruning) holding SQLite ids, and the re-ranking copy, an IndexScalarQuantizer whose rows are
    addressed through `row_ids`. A removed id leaves the scan at once; its row is compacted away in bulk later."""

    def __init__(self, scan: faiss.Index, store: faiss.IndexScalarQuantizer, row_ids: np.ndarray) -> None:
        self.scan = scan
        self.store = store
        self.row_ids = row_ids
        self.alive = np.ones(len(row_ids), dtype=bool)
        self.ntotal = len(row_ids)
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (ids sorted, their rows), built on demand

    def ids(self) -> np.ndarray:
        return self.row_ids[self.alive]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        first_row = len(self.row_ids)
        self.scan.add_with_ids(vectors, ids)
        self.store.add(vectors)
        self.row_ids = np.concatenate([self.row_ids, ids])
        self.alive = np.concatenate([self.alive, np.ones(len(ids), dtype=bool)])
        self.ntotal += len(ids)
        if self._lookup is not None and np.all(np.diff(ids) > 0) and \
                (not len(self._lookup[0]) or ids[0] > self._lookup[0][-1]):
            # new ids above every held one (SQLite hands them out in order) extend the lookup without a new sort
            keys, rows = self._lookup
            self._lookup = (np.concatenate([keys, ids]), np.concatenate([rows, first_row + np.arange(len(ids))]))
        else:
            self._lookup = None

    def remove(self, ids: np.ndarray) -> None:
        rows = self.rows(ids)
        if not len(rows):
            return
        self.scan.remove_ids(faiss.IDSelectorBatch(self.row_ids[rows]))
        _clear_packed_tail(self.scan)
        self.alive[rows] = False
        self.ntotal -= len(rows)
        self._lookup = None
        if len(self.alive) - self.ntotal > _DEAD_FRACTION * len(self.alive):
            self.compact()

    def compact(self) -> None:
        """Drop removed rows from the re-ranking copy, in place (no second copy of it in memory)."""
        if self.ntotal == len(self.alive):
            return
        self.store.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(~self.alive)))
        self.row_ids = self.row_ids[self.alive]
        self.alive = np.ones(len(self.row_ids), dtype=bool)
        self._lookup = None

    def rows(self, ids: np.ndarray, positions: bool = False):
        """Rows holding these ids (ids this shard does not hold are skipped); with `positions`, also where in `ids`
        each row's id sits."""
        if self._lookup is None:
            live = np.flatnonzero(self.alive)
            order = np.argsort(self.row_ids[live], kind="stable")
            self._lookup = (self.row_ids[live][order], live[order])
        keys, rows = self._lookup
        if not len(keys) or not len(ids):
            empty = np.empty(0, dtype=np.int64)
            return (empty, empty) if positions else empty
        at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
        hit = keys[at] == ids
        return (rows[at[hit]], np.flatnonzero(hit)) if positions else rows[at[hit]]

    def search(self, query: np.ndarray, k: int, budget: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top k of this shard: the allowed `rows` scored one by one when they are few, else the `budget` best of the
        scan (restricted to `rows` when given) re-scored."""
        if rows is not None and len(rows) <= self.ntotal * _EXACT_SCAN_RATIO + budget:
            return self.rescore(query, rows, k)
        selector = None if rows is None else faiss.IDSelectorBatch(self.row_ids[rows])
        _, found = self.scan.search(query, budget, params=faiss.SearchParametersIVF(nprobe=1, sel=selector))
        found = np.sort(found[0][found[0] >= 0])  # sorted: the lookup below walks its table in order
        return self.rescore(query, self.rows(found), k)

    def rescore(self, query: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores of these rows from the re-ranking copy, best k first: their codes go into a scratch index of the same
        quantizer, so the scoring runs in FAISS's SIMD code."""
        if not len(rows):
            return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)
        rows = np.sort(rows)  # reading the copy in order is kinder to the memory system
        codes = faiss.rev_swig_ptr(self.store.codes.data(), self.store.ntotal * self.store.code_size)
        scratch = faiss.IndexScalarQuantizer(self.store.d, self.store.sq.qtype, faiss.METRIC_INNER_PRODUCT)
        scratch.sq = self.store.sq
        scratch.is_trained = True
        scratch.add_sa_codes(codes.reshape(-1, self.store.code_size)[rows])
        scores, found = scratch.search(query, min(k, len(rows)))
        keep = found[0] >= 0
        return scores[0][keep], self.row_ids[rows][found[0][keep]]

    def write(self, out: BinaryIO) -> None:
        self.compact()
        _write_index(self.scan, out)
        _write_index(self.store, out)
        out.write(self.row_ids.astype("<i8").tobytes())

    @classmethod
    def read(cls, handle: BinaryIO, dim: int) -> "_Shard":
        scan, store = _read_index(handle), _read_index(handle)
        raw = handle.read(8 * store.ntotal)
        if len(raw) != 8 * store.ntotal or scan.ntotal != store.ntotal or scan.d != dim or store.d != dim:
            raise ValueError("header and body disagree")
        return cls(scan, store, np.frombuffer(raw, dtype="<i8").astype(np.int64))


# helpers ----------------------------------------------------------------------------------------------------------
def _write_index(index: faiss.Index, out: BinaryIO) -> None:
    """Stream an index into an open file (serialize_index would first copy all of it into memory)."""
    writer = faiss.PyCallbackIOWriter(out.write)
    faiss.write_index(index, writer)
    del writer


def _read_index(handle: BinaryIO) -> faiss.Index:
    """Read one index from an open file; the reader stops exactly at its end, where the next part begins."""
    def read(size: int) -> bytes:
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("file ends early")
        return data

    reader = faiss.PyCallbackIOReader(read)
    try:
        return faiss.read_index(reader)
    finally:
        del reader


def _clear_packed_tail(scan: faiss.Index) -> None:
    """Zero the unused slots of the scan list's last 32-code block. FAISS's fast-scan `remove_ids` leaves the codes
    of the removed entries there, and its `add` ORs new codes into the slots rather than overwriting them, so vectors
    added after a removal would be scanned with garbled codes (faiss 1.15; covered by
    tests/test_vectors.py::test_compressed_add_remove_and_replace)."""
    lists = scan.invlists
    size = lists.list_size(0)
    packer = scan.get_CodePacker()
    end = -(-size // packer.nvec) * packer.nvec
    if end == size:
        return
    blocks = faiss.rev_swig_ptr(lists.get_codes(0), end // packer.nvec * packer.block_size)
    blocks = blocks.reshape(-1, packer.block_size)
    zero = np.zeros(packer.code_size, dtype=np.uint8)
    for slot in range(size, end):
        packer.pack_1(zero, slot, blocks)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads that search the other shards of a compressed index; FAISS releases the GIL while they work."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, usable_cores() - 1), thread_name_prefix="clipsearch-faiss",
                                   initializer=faiss.omp_set_num_threads, initargs=(1,))
    return _POOL


def _part_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, end) of `parts` near-equal consecutive parts of n rows."""
    edges = np.linspace(0, n, parts + 1).astype(int).tolist()
    return list(zip(edges, edges[1:]))


def _side_by_side(work: Callable[..., _T], calls: Sequence[tuple]) -> list[_T]:
    """`work(*args)` for every args at the same time: the first in the calling thread, the rest in the pool (FAISS
    releases the GIL, so they use every core); results in order. Each call runs one OpenMP thread: a single query's
    scan gains nothing from more, and they would only compete for the cores."""
    futures = [_pool().submit(work, *args) for args in calls[1:]]
    with _single_threaded():
        first = work(*calls[0])
    return [first] + [future.result() for future in futures]


@contextmanager
def _single_threaded() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
