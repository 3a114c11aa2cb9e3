"""The vectors room: exact search by SQLite id, atomic persistence, damage detection."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from clipsearch.vectors import VectorFileError, VectorIndex


def unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shuffled_flat(tmp_path, vecs: np.ndarray, first_id: int, seed: int,
                  mapped: bool) -> tuple[np.ndarray, VectorIndex]:
    """(ids, index) over `vecs` with shuffled consecutive ids; `mapped`: saved and loaded back (vectors read in place)."""
    ids = np.random.default_rng(seed).permutation(np.arange(first_id, first_id + len(vecs))).astype(np.int64)
    index = VectorIndex.build(vecs.shape[1], ids, vecs, generation=1)
    if mapped:
        index.save(tmp_path / "images.faiss")
        index = VectorIndex.load(tmp_path / "images.faiss")
    return ids, index


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


@pytest.mark.parametrize("flat_max", [None, 0])  # flat, and compressed
def test_saved_at_knows_whether_the_file_holds_these_contents(tmp_path, flat_max):
    path, other = tmp_path / "images.faiss", tmp_path / "other.faiss"
    index = VectorIndex.build(16, np.arange(1, 301), unit(300), generation=1, flat_max=flat_max)
    assert not index.saved_at(path)  # built, never written
    index.save(path)
    assert index.saved_at(path) and not index.saved_at(other)
    loaded = VectorIndex.load(path)
    assert loaded.saved_at(path)
    loaded.remove(np.array([], dtype=np.int64))  # nothing changes
    assert loaded.saved_at(path)
    for change in (lambda i: i.remove(np.array([5])), lambda i: i.add(np.array([999]), unit(1, seed=5)),
                   lambda i: setattr(i, "generation", 2)):
        changed = VectorIndex.load(path)
        change(changed)
        assert not changed.saved_at(path)
    path.unlink()
    assert not loaded.saved_at(path)


def test_loaded_flat_index_reads_the_file_in_place_and_copies_before_a_change(tmp_path):
    """A new process should not copy 200 MB before its first query: the loaded vectors stay in the mapped file. A
    change (a writer reusing the loaded index) must work on its own copy and leave the file as it was."""
    vecs = unit(40)
    VectorIndex.build(16, np.arange(1, 41), vecs, generation=3).save(tmp_path / "images.faiss")
    before = (tmp_path / "images.faiss").read_bytes()
    loaded = VectorIndex.load(tmp_path / "images.faiss")
    assert loaded.engine._mapped is not None
    query = unit(1, seed=5)[0]
    assert loaded.search(query, 5).ids.tolist() == (np.argsort(-(vecs @ query))[:5] + 1).tolist()
    loaded.remove(np.array([1, 2]))
    loaded.add(np.array([100]), query[None])
    assert loaded.engine._mapped is None
    assert loaded.search(query, 1).ids.tolist() == [100] and loaded.ntotal == 39
    assert (tmp_path / "images.faiss").read_bytes() == before


@pytest.mark.parametrize("rows, dim", [(0, 16), (1, 16), (37, 16), (37, 15)])
def test_saved_flat_rows_are_aligned_and_read_as_faiss_reads_them(tmp_path, rows, dim):
    """The rows of a saved flat index start on a 64-byte boundary (numpy's BLAS scans unaligned floats 4-5x slower),
    and the in-place reader sees exactly the rows and ids FAISS's own reader does (odd widths put the ids off their
    8-byte alignment)."""
    import faiss

    path = tmp_path / "images.faiss"
    ids = np.arange(100, 100 + rows) * 7
    VectorIndex.build(dim, ids, unit(rows, dim=dim), generation=1).save(path)
    loaded = VectorIndex.load(path)
    mapped = loaded.engine._mapped
    assert mapped is not None and mapped.rows.ctypes.data % 64 == 0
    body = path.read_bytes()[mapped.start:mapped.end]
    assert mapped.end == path.stat().st_size
    theirs = faiss.deserialize_index(np.frombuffer(body, np.uint8))
    assert np.array_equal(faiss.vector_to_array(theirs.id_map), mapped.ids) and np.array_equal(mapped.ids, ids)
    assert np.array_equal(theirs.index.reconstruct_n(0, rows).reshape(rows, dim), mapped.rows)
    assert read_header(path)["ntotal"] == rows


def test_a_flat_index_loads_searches_and_reconstructs_without_faiss(tmp_path):
    """What a new process's query does with a flat index (search, a filter, an indexed image's vector) imports no
    FAISS, which costs 70-200 ms on this machine."""
    import subprocess
    import sys

    vecs = unit(500, dim=16, seed=41)
    VectorIndex.build(16, np.arange(1, 501), vecs, generation=1).save(tmp_path / "images.faiss")
    code = ("import sys, numpy as np\n"
            "from clipsearch.vectors import VectorIndex\n"
            f"index = VectorIndex.load({str(tmp_path / 'images.faiss')!r})\n"
            "query = index.reconstruct(7)\n"
            "print(index.search(query, 3).ids.tolist(),"
            " index.search(query, 2, allowed=np.arange(100, 200)).ids.tolist(), 'faiss' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = np.argsort(-(vecs @ vecs[6]), kind="stable")
    assert out[-1] == "False"
    filtered = expected[(expected >= 99) & (expected < 199)][:2]  # rows of ids 100..199
    assert " ".join(out[:-1]) == f"{(expected[:3] + 1).tolist()} {(filtered + 1).tolist()}"


def test_flat_file_in_a_layout_the_reader_does_not_know_is_read_by_faiss(tmp_path, monkeypatch):
    vecs = unit(300, seed=42)
    VectorIndex.build(16, np.arange(1, 301), vecs, generation=1).save(tmp_path / "images.faiss")
    monkeypatch.setattr(vector_room._MappedRows, "parse", classmethod(lambda cls, *args: None))
    loaded = VectorIndex.load(tmp_path / "images.faiss")
    assert loaded.engine._mapped is None and loaded.engine._index is not None
    query = unit(1, seed=43)[0]
    assert loaded.search(query, 4).ids.tolist() == (np.argsort(-(vecs @ query), kind="stable")[:4] + 1).tolist()
    assert np.array_equal(loaded.reconstruct(9), vecs[8])


def test_unaligned_flat_file_of_an_older_version_reads_in_place_and_saves_aligned(tmp_path):
    """Files written before the rows were aligned still load in place and answer exactly, and do not count as saved,
    so the next writer's run rewrites them even when nothing changed; written again, the FAISS bytes are the same,
    now on an aligned offset."""
    old, new = tmp_path / "old.faiss", tmp_path / "new.faiss"
    vecs = unit(300, seed=44)
    VectorIndex.build(16, np.arange(1, 301), vecs, generation=1).save(old)
    data = old.read_bytes()
    length = int.from_bytes(data[16:20], "little")
    old.write_bytes(data[:16] + (length + 1).to_bytes(4, "little") + data[20:20 + length] + b" " + data[20 + length:])
    loaded = VectorIndex.load(old)
    assert loaded.engine._mapped is not None and loaded.engine._mapped.rows.ctypes.data % 4 != 0
    assert loaded.engine.unaligned and not loaded.saved_at(old)
    query = unit(1, seed=45)[0]
    assert loaded.search(query, 5).ids.tolist() == (np.argsort(-(vecs @ query), kind="stable")[:5] + 1).tolist()
    loaded.save(new)
    again = VectorIndex.load(new)
    assert again.engine._mapped.rows.ctypes.data % 64 == 0 and again.saved_at(new) and not again.engine.unaligned
    body = slice(loaded.engine._mapped.start, loaded.engine._mapped.end)
    assert old.read_bytes()[body] == new.read_bytes()[again.engine._mapped.start:again.engine._mapped.end]


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("allowed_count", [0, 10, 240, 1500])
def test_flat_filters_are_exact_whether_rows_are_gathered_or_all_scored(tmp_path, mapped, allowed_count):
    """Below the 8-bit copy's size a filter is answered from the float32 rows: up to N/8 allowed rows are gathered,
    more are all scored and then picked; either way only allowed ids come back, the float64 best among them, with
    ids the index lacks ignored. Missing ids in `reconstruct` are a KeyError."""
    vecs = unit(2000, dim=32, seed=46)
    ids, index = shuffled_flat(tmp_path, vecs, first_id=1, seed=47, mapped=mapped)
    rng = np.random.default_rng(48)
    allowed = np.concatenate([rng.choice(ids, allowed_count, replace=False), [5000, 10**12]])
    query = unit(1, dim=32, seed=49)[0]
    scores = np.where(np.isin(ids, allowed), vecs.astype(np.float64) @ query, -np.inf)
    expected = ids[np.argsort(-scores, kind="stable")[:min(7, allowed_count)]]
    assert index.search(query, 7, allowed=allowed).ids.tolist() == expected.tolist()
    assert np.array_equal(index.reconstruct_batch(ids[:3]), vecs[:3])
    with pytest.raises(KeyError):
        index.reconstruct(5000)


@pytest.mark.parametrize("mapped", [False, True])
def test_exact_scan_equals_brute_force_for_every_k(tmp_path, mapped):
    """numpy's scan of the rows (FAISS's copy, or the mapped file) and its top-k selection give exactly the brute
    force's ids and scores, for k from 1 to every row."""
    vecs = unit(2000, dim=32, seed=2)
    ids, index = shuffled_flat(tmp_path, vecs, first_id=5000, seed=3, mapped=mapped)
    for seed in range(5):
        query = unit(1, dim=32, seed=100 + seed)[0]
        for k in (1, 10, 700, 2000):
            result = index.search(query, k)
            expected = np.argsort(-(vecs @ query), kind="stable")[:k]
            assert result.ids.tolist() == ids[expected].tolist()
            assert np.allclose(result.scores, (vecs @ query)[expected], atol=1e-5)


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


# the plan policy and the compressed kind --------------------------------------------------------------------------
import shutil  # noqa: E402

import clipsearch  # noqa: E402
from clipsearch import compressed  # noqa: E402
from clipsearch import vectors as vector_room  # noqa: E402
from clipsearch.vectors import FLAT, PQ_REFINE, Plan, choose_plan, read_header  # noqa: E402
from conftest import TINY_MODEL, shared  # noqa: E402


def brute_top(vecs: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int, allowed=None) -> list[int]:
    keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, allowed)
    scores = vecs[keep] @ query
    return ids[keep][np.argsort(-scores)[:k]].tolist()


def pq_index(n: int = 3000, dim: int = 32, seed: int = 0, **plan) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    vecs = unit(n, dim, seed)
    ids = np.arange(1, n + 1, dtype=np.int64) * 2
    return VectorIndex.build(dim, ids, vecs, generation=3, flat_max=100, **plan), ids, vecs


def test_plan_is_exact_while_small_then_compressed_within_budget():
    assert choose_plan(100_000, 512, flat_max=100_000).kind == FLAT
    large = choose_plan(100_001, 512, flat_max=100_000)
    assert (large.kind, large.pq_m, large.refine) == (PQ_REFINE, 256, "fp16")
    assert choose_plan(1_000_000, 512).memory(1_000_000, 512) <= vector_room.MEMORY_BUDGET
    # fp16 copies of 1M x 512-d do not fit 800 MB: 8-bit copies do
    assert choose_plan(1_000_000, 512, memory_budget=800_000_000).refine == "sq8"
    # float32 copies over the budget are not kept even below the size threshold
    assert choose_plan(50_000, 512, memory_budget=50_000_000, flat_max=100_000).kind == PQ_REFINE
    assert choose_plan(10, 12, flat_max=5).pq_m == 6  # half the dimensions, dividing them


def test_module_limits_are_read_at_call_time(monkeypatch):
    monkeypatch.setattr(vector_room, "FLAT_MAX", 10)
    assert choose_plan(11, 16).kind == PQ_REFINE and choose_plan(10, 16).kind == FLAT


def test_compressed_index_has_high_recall_and_exact_scores_for_its_hits():
    index, ids, vecs = pq_index()
    assert index.kind == PQ_REFINE and index.lossy and index.ntotal == 3000
    queries = unit(30, 32, seed=11)
    hits = 0
    for q in queries:
        result = index.search(q, 10)
        truth = brute_top(vecs, ids, q, 10)
        hits += len(set(result.ids.tolist()) & set(truth))
        rows = result.ids // 2 - 1
        assert np.allclose(result.scores, vecs[rows] @ q, atol=2e-3)  # re-scored from the fp16 copy
        assert list(result.scores) == sorted(result.scores, reverse=True)
    assert hits / (10 * len(queries)) >= 0.95


def test_compressed_round_trip_keeps_plan_results_and_vectors(tmp_path):
    index, ids, vecs = pq_index(n=1000, dim=16)
    path = tmp_path / "images.faiss"
    index.save(path)
    header = read_header(path)
    assert header["kind"] == PQ_REFINE and header["plan"]["refine"] == "fp16" and header["ntotal"] == 1000
    loaded = VectorIndex.load(path)
    assert loaded.plan == index.plan and loaded.generation == 3 and loaded.trained_n == 1000
    assert np.array_equal(np.sort(loaded.ids()), ids)
    q = unit(1, 16, seed=5)[0]
    assert loaded.search(q, 10).ids.tolist() == index.search(q, 10).ids.tolist()
    got = loaded.reconstruct_batch(ids)
    assert np.abs(got - vecs).max() <= loaded.tolerance
    with pytest.raises(KeyError):
        loaded.reconstruct(1)  # odd ids were never added


@pytest.mark.parametrize("mapped", [True, False])
def test_loaded_compressed_index_maps_its_copies_and_owns_them_before_a_change(tmp_path, mapped):
    """A loaded compressed index reads its re-ranking copies in place from the file (a load at 1M reads 136 MB, not
    1.2 GB) and answers as the saved index did. FAISS cannot change a mapped copy (it aborts the process), so an add,
    a removal and a compaction each work on their own copy, leaving the file as it was; a writer's load
    (`mapped=False`) reads them into memory at once."""
    index, ids, vecs = pq_index(n=2000, dim=16)
    path = tmp_path / "images.faiss"
    index.save(path)
    before = path.read_bytes()
    loaded = VectorIndex.load(path, mapped=mapped)
    for shard in loaded.engine.shards:
        assert (shard._mapping is not None) == mapped
        if mapped:
            codes = compressed.faiss.rev_swig_ptr(shard.store.codes.data(), 1)
            assert shard._mapping.ctypes.data <= codes.ctypes.data < shard._mapping.ctypes.data + shard._mapping.size
    queries = unit(10, 16, seed=51)
    for q in queries:
        assert loaded.search(q, 10).ids.tolist() == index.search(q, 10).ids.tolist()
    assert np.array_equal(loaded.reconstruct_batch(ids[:50]), index.reconstruct_batch(ids[:50]))
    new = unit(3, 16, seed=52)
    loaded.add(np.array([90_001, 90_002, 90_003]), new)  # goes to one shard
    loaded.remove(ids[::3])  # from every shard, past the compaction fraction
    assert all(shard._mapping is None for shard in loaded.engine.shards)
    index.add(np.array([90_001, 90_002, 90_003]), new)
    index.remove(ids[::3])
    for q in [*queries, *new]:
        assert loaded.search(q, 10).ids.tolist() == index.search(q, 10).ids.tolist()
    assert path.read_bytes() == before
    loaded.save(tmp_path / "again.faiss")
    again = VectorIndex.load(tmp_path / "again.faiss")
    assert again.ntotal == 1336 and again.search(new[1], 1).ids.tolist() == [90_002]


def test_truncated_compressed_file_is_detected(tmp_path):
    path = tmp_path / "images.faiss"
    pq_index(n=1000, dim=16)[0].save(path)
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 9000, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(VectorFileError):
            VectorIndex.load(path)


def test_sq8_copy_is_within_its_tolerance():
    vecs = unit(2000, 32)
    ids = np.arange(2000)
    plan = Plan(PQ_REFINE, 16, "sq8", 2, 1.0)
    index = VectorIndex.build(32, ids, vecs, 1, plan)
    assert index.plan.refine == "sq8"
    assert np.abs(index.reconstruct_batch(ids) - vecs).max() <= index.tolerance
    q = vecs[7]
    assert index.search(q, 1).ids.tolist() == [7]


def test_compressed_add_remove_and_replace(tmp_path):
    index, ids, vecs = pq_index(n=2000, dim=16)
    gone = ids[:400]  # past the compaction fraction: the re-ranking copy is compacted in place
    index.remove(gone)
    assert index.ntotal == 1600 and not set(gone.tolist()) & set(index.ids().tolist())
    for q in vecs[:20]:
        assert not set(index.search(q, 10).ids.tolist()) & set(gone.tolist())
    new = unit(5, 16, seed=99)
    index.add(np.array([10_001, 10_002, 10_003, 10_004, 10_005]), new)
    assert index.search(new[2], 1).ids.tolist() == [10_003]
    index.add(np.array([10_003]), new[4:5])  # an id added again gets the new vector
    assert index.ntotal == 1605 and np.abs(index.reconstruct(10_003) - new[4]).max() <= index.tolerance
    path = tmp_path / "v.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert loaded.ntotal == 1605 and loaded.search(new[0], 1).ids.tolist() == [10_001]


@pytest.mark.parametrize("size", [3, 25, 300, 1500])
def test_flat_filtered_search_is_exactly_the_filtered_brute_force(size):
    vecs = unit(3000, 16, seed=2)
    ids = np.arange(1, 3001, dtype=np.int64)
    index = VectorIndex.build(16, ids, vecs, 1)
    allowed = np.random.default_rng(size).choice(ids, size, replace=False)
    for q in unit(5, 16, seed=size):
        assert index.search(q, 10, allowed).ids.tolist() == brute_top(vecs, ids, q, 10, allowed)


@pytest.mark.parametrize("size", [3, 40, 1500])
def test_compressed_filtered_search_never_leaves_the_filter(size):
    index, ids, vecs = pq_index(n=3000, dim=32, seed=4)
    allowed = np.random.default_rng(size).choice(ids, size, replace=False)
    hits = 0
    queries = unit(10, 32, seed=size + 1)
    for q in queries:
        result = index.search(q, 10, allowed)
        assert set(result.ids.tolist()) <= set(allowed.tolist()) and len(result.ids) == min(10, size)
        hits += len(set(result.ids.tolist()) & set(brute_top(vecs, ids, q, 10, allowed)))
    recall = hits / (min(10, size) * len(queries))
    # small filters are scored id by id from the fp16 copy: exact up to fp16 ties
    assert recall >= (0.99 if size <= 40 else 0.9)


def test_needs_rebuild_across_thresholds():
    vecs = unit(400, 16)
    flat = VectorIndex.build(16, np.arange(300), vecs[:300], 1, flat_max=350)
    assert flat.kind == FLAT and not flat.needs_rebuild(flat_max=350)
    flat.add(np.arange(300, 400), vecs[300:])
    assert flat.needs_rebuild(flat_max=350)  # 400 > 350: compress
    compressed = VectorIndex.build(16, np.arange(400), vecs, 1, flat_max=350)
    assert compressed.kind == PQ_REFINE and compressed.trained_n == 400
    assert not compressed.needs_rebuild(flat_max=350)
    assert not compressed.needs_rebuild(300, flat_max=350)  # hysteresis: not back to flat just under the line
    assert compressed.needs_rebuild(170, flat_max=350)      # well under it: exact again
    assert compressed.needs_rebuild(1601, flat_max=350)     # outgrew what its codes were trained on


def test_index_replans_verifies_and_filters_a_compressed_index(tmp_path, tiny_checkpoint, monkeypatch):
    """Through the library: the plan follows N (rebuilt when N crosses the line), is recorded in the file, verify
    accepts the compressed copy within tolerance and catches a wrong one, filters still hold."""
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    for n, source in enumerate(sorted(shared("photos", "exif-samples").glob("*.jpg"))[:8]):
        shutil.copy2(source, photos / ("a" if n % 2 else "b") / source.name)
    idx = clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint))
    idx.index([photos], workers=0)
    assert idx.vectors().kind == FLAT and read_header(idx.faiss_path)["kind"] == FLAT
    idx.close()

    monkeypatch.setattr(vector_room, "FLAT_MAX", 4)
    idx = clipsearch.open(tmp_path / "idx")
    assert idx.vectors().kind == PQ_REFINE
    assert any("call for another index type than flat-ip" in n for n in idx.notices)
    assert read_header(idx.faiss_path)["kind"] == PQ_REFINE
    report = idx.verify()
    assert report.ok and report.checked == 8, report.problems
    under_a = idx.search("a photo", k=8, under=str(photos / "a"))
    assert len(under_a) == 4 and all(h.path.startswith(str(photos / "a")) for h in under_a)

    vectors = idx.vectors()
    victim = int(np.sort(vectors.ids())[0])
    wrong = vectors.reconstruct(victim) + 0.05
    vectors.add(np.array([victim]), (wrong / np.linalg.norm(wrong))[None])
    vectors.save(idx.faiss_path)
    idx.close()
    again = clipsearch.open(tmp_path / "idx")
    report = again.verify()
    assert not report.ok and "pq-refine allows" in report.problems[0]
    again.close()
    # a reader maps the re-ranking copies; a writer reads them into memory (it would otherwise hold both on a change)
    writer = clipsearch.open(tmp_path / "idx")
    writer.index([photos], workers=0)  # nothing new: its index stays as it was loaded
    assert all(shard._mapping is None for shard in writer._vectors.engine.shards)
    writer.close()
    reader = clipsearch.open(tmp_path / "idx")
    assert all(shard._mapping is not None for shard in reader.vectors().engine.shards)
    reader.close()


def test_a_run_that_crosses_the_threshold_saves_the_new_index_type(tmp_path, tiny_checkpoint, monkeypatch):
    """The writer re-plans when its own run takes N over the line, so no reader has to rebuild (and say so) later."""
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(shared("photos", "exif-samples").glob("*.jpg"))[:8]
    for source in sources[:3]:
        shutil.copy2(source, photos / source.name)
    monkeypatch.setattr(vector_room, "FLAT_MAX", 4)
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=0)
        assert read_header(idx.faiss_path)["kind"] == FLAT
        for source in sources[3:]:
            shutil.copy2(source, photos / source.name)
        idx.index([photos], workers=0)
        assert read_header(idx.faiss_path)["kind"] == PQ_REFINE and idx.vectors().kind == PQ_REFINE
    with clipsearch.open(tmp_path / "idx") as reader:
        assert reader.vectors().kind == PQ_REFINE and reader.verify().ok
        assert not reader.notices


def test_compressed_shards_are_searched_at_the_same_time(monkeypatch):
    """The pool searches one shard while the calling thread searches the other: the pool's shard waits for the
    caller's to start, which it never did when the caller first waited for the pool."""
    index, _ids, vecs = pq_index()
    first, second = index.engine.shards[:2]
    started = threading.Event()
    search = type(first).search

    def traced(shard, *args):
        if shard is first:
            started.set()
        elif not started.wait(timeout=5):
            raise AssertionError("the shards were searched one after the other")
        return search(shard, *args)

    monkeypatch.setattr(type(first), "search", traced)
    assert index.search(vecs[3], 1).ids.tolist() == [8]  # row 3's id


@pytest.fixture
def byte_copies(monkeypatch):
    """Small sizes take the 8-bit path, scanned in two parts."""
    import clipsearch.vectors as vectors

    monkeypatch.setattr(vectors, "_COPY_MIN", 400)
    monkeypatch.setattr(vectors, "_COPY_EXTRA", 8)
    monkeypatch.setattr(vectors, "_SPLIT_MIN", 200)
    monkeypatch.setattr(vectors, "usable_cores", lambda: 2)
    calls = {"above": 0}
    above = compressed.ByteCopy.above

    def counted(self, *args):
        calls["above"] += 1
        return above(self, *args)

    monkeypatch.setattr(compressed.ByteCopy, "above", counted)
    return calls


@pytest.mark.parametrize("mapped", [False, True])
def test_8bit_scan_answers_exactly_and_only_from_the_second_search(tmp_path, byte_copies, mapped):
    vecs = unit(3000, dim=32, seed=7)
    ids, index = shuffled_flat(tmp_path, vecs, first_id=10, seed=8, mapped=mapped)
    for seed in range(30):
        query = unit(1, dim=32, seed=200 + seed)[0] * (0.5 + seed / 10)  # mixed queries need not be unit length
        if seed == 1:
            assert index.engine._copy is None  # a one-shot query never pays for the copy
        expected = np.argsort(-(vecs.astype(np.float64) @ query), kind="stable")[:10]
        result = index.search(query, 10)
        assert result.ids.tolist() == ids[expected].tolist()
        assert np.allclose(result.scores, (vecs @ query)[expected], atol=1e-5)
    assert index.engine._copy is not None


def test_8bit_scan_that_cannot_tell_rows_apart_rescores_every_contender(byte_copies):
    """Rows 1e-6 apart in score, closer than 8-bit codes can resolve (their step here is 4e-3): the candidates alone
    cannot prove the answer, so every row within the error bound is re-scored, and the answer is still exact."""
    n, dim = 2000, 8
    rng = np.random.default_rng(3)
    first = 0.5 + rng.permutation(n) * 1e-6
    vecs = np.zeros((n, dim), np.float32)
    vecs[:, 0], vecs[:, 1] = first, np.sqrt(1 - first ** 2)
    index = VectorIndex.build(dim, np.arange(1, n + 1), vecs, generation=1)
    query = np.zeros(dim, np.float32)
    query[0] = 1.0
    for _ in range(2):
        result = index.search(query, 10)
    assert byte_copies["above"] >= 1
    assert result.ids.tolist() == (np.argsort(-first)[:10] + 1).tolist()


def test_changes_retire_the_8bit_copy(byte_copies):
    vecs = unit(2000, dim=16, seed=4)
    index = VectorIndex.build(16, np.arange(1, 2001), vecs, generation=1)
    query = unit(1, seed=5)[0]
    index.search(query, 3)
    top = index.search(query, 3).ids.tolist()
    assert index.engine._copy is not None
    index.remove(np.array(top[:1]))
    index.add(np.array([5000]), query[None])
    assert index.search(query, 3).ids.tolist() == [5000, *top[1:]]


@pytest.mark.parametrize("case", ["unit", "outlier-dimensions", "long-rows", "wide"])
def test_8bit_error_bound_holds_for_every_row(case):
    """The exactness of the 8-bit path rests on one inequality: |S/t - q.x| <= error for every row. Checked against
    float64 on data that stresses each term: per-dimension scales far apart, rows and queries far from unit length,
    and a width (1280) where the code range shrinks to keep integer sums exact."""
    from clipsearch.compressed import ByteCopy

    rng = np.random.default_rng(11)
    dim = 1280 if case == "wide" else 64
    rows = rng.standard_normal((3000, dim)).astype(np.float32)
    if case == "outlier-dimensions":
        rows[:, :3] *= 40
        rows[7, 5] = 300.0
    if case == "long-rows":
        rows *= rng.uniform(0.01, 50, (len(rows), 1)).astype(np.float32)
    if case != "long-rows":
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    copy = ByteCopy.of(rows, 2)
    assert copy is not None and copy.limit == (114 if case == "wide" else 127)
    for seed in range(10):
        query = rng.standard_normal((1, dim)).astype(np.float32) * (0.3 + seed)
        integers, t, error = copy.quantize(query)
        found = copy.search(integers, t, len(rows))
        approx = np.concatenate([s for s, _p in found])
        positions = np.concatenate([p for _s, p in found])
        exact = rows[positions].astype(np.float64) @ query[0].astype(np.float64)
        assert np.abs(approx - exact).max() <= error
        assert error < 0.2 * np.linalg.norm(query) * np.linalg.norm(rows, axis=1).max()  # and it is worth having


def test_8bit_scan_proves_typical_answers_from_its_candidates_alone(monkeypatch):
    """On random unit vectors the default candidate count suffices: no query needs the second (range) scan."""
    import clipsearch.vectors as vectors

    monkeypatch.setattr(vectors, "_COPY_MIN", 4000)
    calls = []
    above = compressed.ByteCopy.above
    monkeypatch.setattr(compressed.ByteCopy, "above", lambda self, *args: calls.append(1) or above(self, *args))
    vecs = unit(40_000, dim=512, seed=12)
    index = VectorIndex.build(512, np.arange(1, 40_001), vecs, generation=1)
    queries = unit(20, dim=512, seed=13)
    for query in queries:
        expected = np.argsort(-(vecs.astype(np.float64) @ query), kind="stable")[:10] + 1
        assert index.search(query, 10).ids.tolist() == expected.tolist()
    assert index.engine._copy is not None and calls == []


def test_8bit_path_answers_a_zero_query_and_skips_rows_it_cannot_copy(byte_copies, monkeypatch):
    import clipsearch.vectors as vectors

    vecs = unit(1000, dim=16, seed=14)
    index = VectorIndex.build(16, np.arange(1, 1001), vecs, generation=1)
    zero = np.zeros(16, np.float32)
    for _ in range(2):
        assert len(index.search(zero, 5).ids) == 5  # every score is 0: any five rows, from the float32 scan
    assert index.engine._copy is not None
    vecs[3, 2] = np.inf
    broken = VectorIndex.build(16, np.arange(1, 1001), vecs, generation=1)
    builds = []
    of = compressed.ByteCopy.of
    monkeypatch.setattr(compressed.ByteCopy, "of", lambda rows, parts: builds.append(1) or of(rows, parts))
    for _ in range(4):
        assert broken.search(unit(1, dim=16, seed=15)[0], 3).ids.tolist()
    assert broken.engine._copy is None
    assert builds == [1]  # found impossible once, not tried again on every search
    monkeypatch.setattr(compressed.ByteCopy, "of", of)
    # a FAISS whose 8-bit kernel did not score integers exactly gets no copy: the float32 scan answers
    monkeypatch.setattr(compressed, "_scores_integers_exactly", lambda dim, limit: False)
    vecs[3, 2] = 0.5
    fine = VectorIndex.build(16, np.arange(1, 1001), vecs, generation=1)
    query = unit(1, dim=16, seed=16)[0]
    for _ in range(2):
        assert fine.search(query, 3).ids.tolist() == (np.argsort(-(vecs @ query), kind="stable")[:3] + 1).tolist()
    assert fine.engine._copy is None


@pytest.mark.parametrize("mapped", [False, True])
def test_filtered_search_goes_through_the_8bit_copy_and_stays_exact(tmp_path, byte_copies, monkeypatch, mapped):
    """A large filter is scanned through the 8-bit copy with a per-row bitmap (FAISS's id selector over the float32
    rows was 8x slower): only allowed ids come back, exactly the float64 best among them, also when the filter names
    ids the index lacks, ids far beyond its own, or none of its ids at all."""
    import clipsearch.vectors as vectors

    vecs = unit(4000, dim=32, seed=21)
    ids, index = shuffled_flat(tmp_path, vecs, first_id=1, seed=22, mapped=mapped)
    filtered = []
    search = compressed.ByteCopy.search
    monkeypatch.setattr(compressed.ByteCopy, "search",
                        lambda self, *a: filtered.append(a[3] is not None) or search(self, *a))
    rng = np.random.default_rng(23)
    query = unit(1, dim=32, seed=24)[0]
    index.search(query, 3)  # the first search builds no copy
    for allowed in (rng.choice(ids, 2000, replace=False), rng.choice(ids, 1000, replace=False),
                    np.concatenate([rng.choice(ids, 1500, replace=False), np.arange(10**6, 10**6 + 500)]),
                    np.concatenate([rng.choice(ids, 1500, replace=False), [10**12]])):
        keep = np.isin(ids, allowed)
        scores = np.where(keep, vecs.astype(np.float64) @ query, -np.inf)
        expected = ids[np.argsort(-scores, kind="stable")[:5]]
        assert index.search(query, 5, allowed=allowed).ids.tolist() == expected.tolist()
    assert index.search(query, 5, allowed=np.arange(10**6, 10**6 + 2000)).ids.tolist() == []
    assert filtered == [True] * 5


def test_warm_builds_the_8bit_copy_that_the_first_search_then_uses(byte_copies, monkeypatch):
    import clipsearch.vectors as vectors

    vecs = unit(1000, dim=16, seed=31)
    index = VectorIndex.build(16, np.arange(1, 1001), vecs, generation=1)
    index.warm()
    assert index.engine._copy is not None
    used = []
    search = compressed.ByteCopy.search
    monkeypatch.setattr(compressed.ByteCopy, "search", lambda self, *a: used.append(1) or search(self, *a))
    query = unit(1, dim=16, seed=32)[0]
    assert index.search(query, 3).ids.tolist() == (np.argsort(-(vecs @ query), kind="stable")[:3] + 1).tolist()
    assert used == [1]
    small = VectorIndex.build(16, np.arange(1, 11), vecs[:10], generation=1)
    small.warm()  # below the size where the copy pays: nothing built
    assert small.engine._copy is None


# huge pages ---------------------------------------------------------------------------------------------------------
def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds the first 2 MB boundary from `address` on (/proc/self/smaps): asking
    for huge pages splits a mapping there."""
    address = -(-address // (2 << 20)) * (2 << 20)
    inside = False
    for line in open("/proc/self/smaps").read().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def _spy_on_huge_pages(monkeypatch) -> list[tuple[int, int, bool]]:
    from clipsearch import compressed

    calls: list[tuple[int, int, bool]] = []
    real = compressed.on_huge_pages

    def spy(address: int, size: int) -> bool:
        moved = real(address, size)
        calls.append((address, size, moved))
        return moved

    monkeypatch.setattr(compressed, "on_huge_pages", spy)
    return calls


def test_on_huge_pages_moves_a_buffer_and_keeps_its_contents():
    import ctypes
    import mmap

    from clipsearch.compressed import on_huge_pages

    buffer = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # like the heap FAISS allocates
    data = np.frombuffer(buffer, np.uint8)
    data[:] = np.arange(len(data)) % 251
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    if not on_huge_pages(address, len(buffer)):
        pytest.skip("this system cannot move memory onto huge pages (it takes Linux 6.1+ with THP)")
    assert _huge_bytes_at(address) >= 2 << 20
    assert np.array_equal(data, np.arange(len(data)) % 251)
    assert not on_huge_pages(address + 4096, 4096)  # no whole 2 MB page inside: nothing to do


def test_a_compressed_index_puts_its_codes_on_huge_pages_from_its_second_search(monkeypatch):
    """A one-query process (the CLI) pays nothing; from the second search on, each shard's 4-bit codes are on huge
    pages (once per buffer, again after adding vectors moved it), and the answers do not change."""
    import faiss

    index, ids, vecs = pq_index(n=64_000, dim=512)
    calls = _spy_on_huge_pages(monkeypatch)
    query = unit(1, 512, seed=9)[0]
    first = index.search(query, 10)
    assert calls == []
    assert index.search(query, 10).ids.tolist() == first.ids.tolist()
    assert index.search(query, 10).ids.tolist() == first.ids.tolist()
    shards = index.engine.shards
    assert len(calls) == len(shards) == 2  # the third search moved nothing again
    for shard, (address, size, moved) in zip(shards, calls):
        assert address == int(faiss.downcast_InvertedLists(shard.scan.invlists).get_codes(0))
        assert shard.ntotal * 128 <= size < shard.ntotal * 128 + 4096  # whole blocks of 32 codes
        if moved:
            assert _huge_bytes_at(address) >= 2 << 20
    index.add(np.arange(10**6, 10**6 + 64_000, dtype=np.int64), unit(64_000, 512, seed=10))
    index.search(query, 10)
    assert len(calls) == 4 and {size for _a, size, _m in calls[2:]} != {size for _a, size, _m in calls[:2]}


def test_the_8bit_copy_puts_its_codes_on_huge_pages(monkeypatch):
    from clipsearch.compressed import ByteCopy

    calls = _spy_on_huge_pages(monkeypatch)
    copy = ByteCopy.of(unit(40_000, 256), 2)
    assert copy is not None
    assert sorted((address, size) for address, size, _m in calls) == sorted(  # parts are encoded in parallel
        (int(part.codes.data()), part.ntotal * part.code_size) for _start, part in copy.parts)
