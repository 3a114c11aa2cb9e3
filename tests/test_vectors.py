"""The vectors room: exact search by SQLite id, atomic persistence, damage detection."""
from __future__ import annotations

import numpy as np
import pytest

from clipsearch.vectors import VectorFileError, VectorIndex


def unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_matches_brute_force_with_sqlite_ids():
    vecs = unit(300)
    ids = np.arange(1000, 1300, dtype=np.int64) * 3
    index = VectorIndex.build(16, ids, vecs, generation=5)
    query = unit(1, seed=9)[0]
    result = index.search(query, 10)
    expected = np.argsort(-(vecs @ query))[:10]
    assert result.ids.tolist() == ids[expected].tolist()
    assert np.allclose(result.scores, (vecs @ query)[expected], atol=1e-5)


def test_k_larger_than_index_returns_everything_once():
    index = VectorIndex.build(16, np.array([1, 2, 3]), unit(3), generation=1)
    result = index.search(unit(1, seed=3)[0], 50)
    assert sorted(result.ids.tolist()) == [1, 2, 3]


def test_remove_and_filtered_search():
    vecs = unit(50)
    index = VectorIndex.build(16, np.arange(1, 51), vecs, generation=1)
    index.remove(np.array([1, 2, 3]))
    assert index.ntotal == 47 and not {1, 2, 3} & set(index.ids().tolist())
    allowed = np.array([10, 20, 30])
    result = index.search(unit(1, seed=4)[0], 10, allowed=allowed)
    assert sorted(result.ids.tolist()) == [10, 20, 30]


def test_save_load_roundtrip_is_atomic(tmp_path):
    index = VectorIndex.build(16, np.array([7, 8]), unit(2), generation=42)
    path = tmp_path / "images.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["images.faiss"]  # no temp file left behind
    loaded = VectorIndex.load(path)
    assert loaded.generation == 42 and loaded.dim == 16 and sorted(loaded.ids().tolist()) == [7, 8]
    assert np.allclose(loaded.reconstruct(8), index.reconstruct(8))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing", "header"])
def test_damaged_file_is_detected(tmp_path, damage):
    path = tmp_path / "images.faiss"
    VectorIndex.build(16, np.arange(100), unit(100), generation=1).save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:20] + b"{not json" + data[29:])
    with pytest.raises(VectorFileError):
        VectorIndex.load(path)
