"""The `vectors` room: the FAISS index, a derived cache of the vectors stored in SQLite.

FAISS ids are SQLite row ids. The file on disk carries a small header with the store generation it reflects, written
atomically (temp file + rename), so a reader can always tell whether it is current, stale, or damaged.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

MAGIC = b"CLIPSRCHFAISS\x00\x01\x00"
_HEADER_LEN = struct.Struct("<I")


class VectorFileError(Exception):
    """The FAISS file is missing, truncated or not ours; the caller rebuilds it from SQLite."""


class VectorSource(Protocol):
    """What a rebuild needs from the store (kept abstract: this room knows no SQL)."""

    def vectors_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]: ...


@dataclass
class SearchResult:
    ids: np.ndarray     # int64, best first
    scores: np.ndarray  # float32 inner products (cosine similarity for unit vectors)


class VectorIndex:
    """Exact inner-product search over unit vectors, addressable by SQLite id."""

    kind = "flat-ip"

    def __init__(self, dim: int, generation: int = 0, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.generation = generation
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vectors: np.ndarray, generation: int) -> "VectorIndex":
        built = cls(dim, generation)
        built.add(ids, vectors)
        return built

    @classmethod
    def from_source(cls, dim: int, source: VectorSource) -> "VectorIndex":
        generation, ids, vectors = source.vectors_snapshot()
        return cls.build(dim, ids, vectors, generation)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def reconstruct(self, image_id: int) -> np.ndarray:
        return self.index.reconstruct(int(image_id))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> SearchResult:
        """Top-k ids for one query vector; `allowed` restricts the search to those ids inside FAISS itself."""
        k = min(k, self.ntotal)
        if k <= 0:
            return SearchResult(np.empty(0, np.int64), np.empty(0, np.float32))
        params = None
        if allowed is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)))
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k, params=params)
        keep = ids[0] >= 0
        return SearchResult(ids[0][keep].astype(np.int64), scores[0][keep].astype(np.float32))

    # persistence -------------------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        path = Path(path)
        header = json.dumps({"generation": self.generation, "dim": self.dim, "kind": self.kind,
                             "ntotal": self.ntotal}).encode()
        body = faiss.serialize_index(self.index)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(MAGIC)
                out.write(_HEADER_LEN.pack(len(header)))
                out.write(header)
                out.write(body.tobytes())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise VectorFileError(f"{path} is missing") from exc
        if not data.startswith(MAGIC):
            raise VectorFileError(f"{path} is not a clipsearch FAISS file")
        try:
            (length,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
            start = len(MAGIC) + _HEADER_LEN.size
            header = json.loads(data[start:start + length])
            body = np.frombuffer(data, dtype=np.uint8, offset=start + length)
            index = faiss.deserialize_index(body)
        except (struct.error, ValueError, RuntimeError) as exc:
            raise VectorFileError(f"{path} is damaged ({str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from exc
        if index.ntotal != header.get("ntotal") or index.d != header.get("dim"):
            raise VectorFileError(f"{path} is damaged (header and body disagree)")
        return cls(int(header["dim"]), int(header["generation"]), index)
