"""FAISS's compressed copies of the vectors room: the `pq-refine` engine for large collections (4-bit PQ fast-scan
shards with a near-exact re-ranking copy) and the 8-bit copy that speeds up a flat index's exact search, plus the
FAISS plumbing both share (streamed reads and writes, the thread pool that runs parts side by side).

Kept apart from `vectors` so that importing that room imports no FAISS: a new process that queries a flat index reads
its rows with numpy and never pays FAISS's import (70-200 ms on this machine).
"""
from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import faiss
import numpy as np

from .cores import usable_cores

if TYPE_CHECKING:
    from .vectors import Plan

_MIN_CANDIDATES = 100          # re-scoring 100 rows costs ~0.05 ms: a floor that keeps small collections near exact
_DEAD_FRACTION = 1 / 8         # removed rows are compacted out of the re-ranking copy past this fraction
_EXACT_SCAN_RATIO = 1 / 32     # a filter of at most N/32 ids (plus the candidates) is scored exactly, id by id:
#                                re-scoring one id costs about as much as scanning 32 codes (bench/million.py --filtered)
_BYTE_CHUNK = 4_096            # rows encoded per step into the 8-bit copy (three float32 temporaries of this many)
_CODE_CHUNK = 65_536           # rows of a mapped re-ranking copy copied per step when a change needs its own
_HUGE_PAGE = 2 << 20           # a transparent huge page over 4 KB base pages (x86-64, most arm64)
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # Linux's madvise advice values (MADV_COLLAPSE since 6.1)
_T = TypeVar("_T")
_REFINE_TYPES = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}


class ByteCopy:
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
    def of(cls, rows: np.ndarray, parts: int) -> "ByteCopy | None":
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
            on_huge_pages(int(index.codes.data()), index.ntotal * index.code_size)
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
    exactly (its signed 8-bit codec and kernel are what the bound in ByteCopy relies on)."""
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


class PQRefine:
    """PQ 4-bit fast-scan over every vector, then the best candidates re-scored from an fp16/SQ8 copy.

    The vectors are split into `plan.shards` parts searched in parallel threads (one per core), each scanning its own
    codes and re-scoring its own candidates, so both steps use every core; the parts' top k are merged."""

    def __init__(self, dim: int, plan: Plan, shards: list["_Shard"]) -> None:
        self.dim = dim
        self.plan = plan
        self.shards = shards

    @classmethod
    def trained(cls, dim: int, plan: Plan, sample: np.ndarray) -> "PQRefine":
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

    def warm(self) -> None:
        """Put the codes the scans read on huge pages (see on_huge_pages; at 1M, 128 MB in about 0.1 s, once per
        buffer). VectorIndex calls it from a process's second search on, so a one-query process never pays for it."""
        for shard in self.shards:
            shard.warm()

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
    def read(cls, handle: BinaryIO, dim: int, plan: Plan, ntotal: int, mapping: np.ndarray | None) -> "PQRefine":
        """The shards at the handle's position. With `mapping` (the whole file, mapped) their re-ranking copies stay
        in it (a search reads only its candidates' rows: at 1M x 512 a load reads 136 MB instead of 1.2 GB); without,
        as a writer that changes them wants, they are read into memory at once."""
        shards = [_Shard.read(handle, dim, mapping) for _ in range(plan.shards)]
        if sum(shard.ntotal for shard in shards) != ntotal:
            raise ValueError("header and body disagree")
        return cls(dim, plan, shards)


class _Shard:
    """One part of a compressed index: a fast-scan IVF with a single list (IVF for its id storage, removal and id
    selectors, not for pruning) holding SQLite ids, and the re-ranking copy, an IndexScalarQuantizer whose rows are
    addressed through `row_ids`. A removed id leaves the scan at once; its row is compacted away in bulk later.

    A loaded shard's re-ranking copy may be the file's mapped pages (`mapping` holds them alive); FAISS cannot change
    a mapped copy (it aborts the process), so every change first takes its own (`_own_store`)."""

    def __init__(self, scan: faiss.Index, store: faiss.IndexScalarQuantizer, row_ids: np.ndarray,
                 mapping: np.ndarray | None = None) -> None:
        self.scan = scan
        self.store = store
        self._mapping = mapping  # the mapped file the store's codes are read from in place (None: owned)
        self.row_ids = row_ids
        self.alive = np.ones(len(row_ids), dtype=bool)
        self.ntotal = len(row_ids)
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (ids sorted, their rows), built on demand
        self._huge: tuple[int, int] | None = None  # the codes buffer (address, bytes) last put on huge pages

    def ids(self) -> np.ndarray:
        return self.row_ids[self.alive]

    def warm(self) -> None:
        """The scan's codes on huge pages, again whenever adding vectors has moved them."""
        lists = faiss.downcast_InvertedLists(self.scan.invlists)
        if not isinstance(lists, faiss.BlockInvertedLists):  # not where fast-scan keeps its codes: leave them be
            return
        span = (int(lists.get_codes(0)), -(-lists.list_size(0) // lists.n_per_block) * lists.block_size)
        if span != self._huge:
            on_huge_pages(*span)
            self._huge = span

    def _own_store(self) -> None:
        """Copy a mapped re-ranking copy into memory, in chunks (no serialized buffer of all of it on the way). The
        mapped pages it reads count towards the process's memory until the mapping is dropped, which is why a
        writer loads its index unmapped (`VectorIndex.load(mapped=False)`)."""
        if self._mapping is None:
            return
        mapped, size = self.store, self.store.code_size
        owned = faiss.IndexScalarQuantizer(mapped.d, mapped.sq.qtype, faiss.METRIC_INNER_PRODUCT)
        owned.sq = mapped.sq
        owned.is_trained = True
        codes = faiss.rev_swig_ptr(mapped.codes.data(), mapped.ntotal * size).reshape(-1, size)
        for start in range(0, len(codes), _CODE_CHUNK):
            owned.add_sa_codes(codes[start:start + _CODE_CHUNK])
        self.store, self._mapping = owned, None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._own_store()
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
        self._own_store()
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
        write_index(self.scan, out)
        write_index(self.store, out)
        out.write(self.row_ids.astype("<i8").tobytes())

    @classmethod
    def read(cls, handle: BinaryIO, dim: int, mapping: np.ndarray | None = None) -> "_Shard":
        """The shard at the handle's position; its re-ranking copy read in place from `mapping` (the whole file) when
        given."""
        scan = read_index(handle)
        if mapping is None:
            store = read_index(handle)
        else:
            reader = faiss.ZeroCopyIOReader(faiss.swig_ptr(mapping), mapping.size)
            reader.rp_ = handle.tell()
            try:
                store = faiss.read_index(reader, faiss.IO_FLAG_MMAP_IFC)
            finally:
                handle.seek(int(reader.rp_))
                del reader
        raw = handle.read(8 * store.ntotal)
        if len(raw) != 8 * store.ntotal or scan.ntotal != store.ntotal or scan.d != dim or store.d != dim or \
                not isinstance(store, faiss.IndexScalarQuantizer):
            raise ValueError("header and body disagree")
        return cls(scan, store, np.frombuffer(raw, dtype="<i8").astype(np.int64), mapping)


# helpers ----------------------------------------------------------------------------------------------------------
def write_index(index: faiss.Index, out: BinaryIO) -> None:
    """Stream an index into an open file (serialize_index would first copy all of it into memory)."""
    writer = faiss.PyCallbackIOWriter(out.write)
    faiss.write_index(index, writer)
    del writer


def read_index(handle: BinaryIO) -> faiss.Index:
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


def on_huge_pages(address: int, size: int) -> bool:
    """Move the 2 MB pages that lie wholly inside a buffer that searches scan onto huge pages, now; its contents stay
    as they are. A scan touches each 4 KB page once and misses the TLB on each, dearer in a virtual machine, where a
    miss walks two page tables: on the Zen 4, one thread scanned 500,000 4-bit codes (64 MB) in 2.62 ms against 3.25
    (p50, faster in 97% of interleaved queries), and the 8-bit copy of 100,000 rows in 1.68 against 1.88 ms (93%).
    Moving costs 0.3-1 ms per MB. False where it cannot be done (not Linux, Linux before 6.1, no huge pages)."""
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise()
    if madvise is None or end <= start:
        return False
    return madvise(start, end - start, _MADV_HUGEPAGE) == 0 and madvise(start, end - start, _MADV_COLLAPSE) == 0


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


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
