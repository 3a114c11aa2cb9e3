"""The store room: schema and migrations, rows and vectors, generations, refusing files that are not ours."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from clipsearch.errors import NotAnIndex
from clipsearch.store import DB_NAME, SCHEMA_VERSION, Store


def row(path: str, **extra) -> dict:
    return {"path": path, "root": "/r", "size": 10, "mtime_ns": 1, "fingerprint": "f" + path, "status": "ok",
            "error": None, **extra}


def test_new_store_is_migrated_and_reopens(tmp_path):
    store = Store(tmp_path / "idx", create=True)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {"images", "vectors", "meta", "roots", "runs"} <= set(store.db.table_names())
    assert store.generation == 0
    store.close()
    again = Store(tmp_path / "idx")
    assert again.generation == 0


def test_missing_index_is_not_created_without_create(tmp_path):
    with pytest.raises(NotAnIndex):
        Store(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_foreign_sqlite_file_is_refused_untouched(tmp_path):
    (tmp_path / "x").mkdir()
    conn = sqlite3.connect(tmp_path / "x" / DB_NAME)
    conn.execute("CREATE TABLE mine (a)")
    conn.commit()
    conn.close()
    before = (tmp_path / "x" / DB_NAME).read_bytes()
    with pytest.raises(NotAnIndex):
        Store(tmp_path / "x", create=True)
    assert (tmp_path / "x" / DB_NAME).read_bytes() == before


def test_garbage_file_is_not_an_index(tmp_path):
    (tmp_path / DB_NAME).write_bytes(b"this is not sqlite at all" * 50)
    with pytest.raises(NotAnIndex):
        Store(tmp_path)


def test_put_move_delete_and_generation(tmp_path):
    store = Store(tmp_path, create=True)
    vec = np.arange(4, dtype=np.float32)
    with store.transaction():
        store.set_meta({"dim": "4"})
        a = store.put_image(row("/r/a.jpg"), vec)
        b = store.put_image(row("/r/b.jpg"), vec + 1)
        store.bump_generation()
    assert store.generation == 1
    with store.transaction():
        assert store.put_image(row("/r/a.jpg", size=11), vec * 2) == a  # replacing keeps the id
        store.move_image(b, "/s/b.jpg", "/s", 10, 2)
    assert np.array_equal(store.vector(a), vec * 2)
    assert store.row_by_path("/s/b.jpg")["id"] == b and store.row_by_path("/r/b.jpg") is None
    ids, matrix = store.all_vectors()
    assert ids.tolist() == [a, b] and matrix.shape == (2, 4)
    with store.transaction():
        store.delete_images([a])
    assert store.vector(a) is None and store.counts() == {"images": 1, "errors": 0, "vectors": 1}


def test_failed_transaction_rolls_back(tmp_path):
    store = Store(tmp_path, create=True)
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put_image(row("/r/a.jpg"), np.zeros(4, np.float32))
            store.bump_generation()
            raise RuntimeError("boom")
    assert store.counts()["images"] == 0 and store.generation == 0


def test_states_under_matches_folder_prefix_not_string_prefix(tmp_path):
    store = Store(tmp_path, create=True)
    with store.transaction():
        store.put_image(row("/photos/a.jpg"), None)
        store.put_image(row("/photos2/b.jpg"), None)
        store.put_image(row("/photos/sub/c.jpg"), None)
    assert sorted(store.states_under("/photos")) == ["/photos/a.jpg", "/photos/sub/c.jpg"]
    assert list(store.states_under("/photos/a.jpg")) == ["/photos/a.jpg"]


def test_fingerprint_lookup_only_returns_embedded_rows(tmp_path):
    store = Store(tmp_path, create=True)
    with store.transaction():
        store.put_image(row("/r/a.jpg", fingerprint="same"), np.zeros(4, np.float32))
        store.put_image(row("/r/b.jpg", fingerprint="same", status="error", error="bad"), None)
    found = store.rows_with_fingerprints(["same", "other"])
    assert [r["path"] for r in found["same"]] == ["/r/a.jpg"] and "other" not in found


def test_an_index_from_schema_1_gains_captions_and_keeps_its_images(tmp_path):
    """Indexes built before captions existed are migrated in place on open, nothing lost."""
    store = Store(tmp_path / "idx", create=True)
    with store.transaction():
        store.set_meta({"dim": "4"})
        image_id = store.put_image(row("/r/a.jpg"), np.ones(4, np.float32) / 2)
        store.bump_generation()
    db = store.db
    db.execute("DROP TABLE caption_vectors")
    db.execute("DROP TABLE captions")
    db.execute("DELETE FROM meta WHERE key = 'caption_generation'")
    db.execute("PRAGMA user_version=1")
    store.close()
    migrated = Store(tmp_path / "idx")
    assert migrated.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert migrated.caption_count() == 0 and migrated.caption_generation == 0
    assert migrated.generation == 1 and np.allclose(migrated.vector(image_id), 0.5)


def test_captions_follow_a_moved_image_and_are_unique_per_collection(tmp_path):
    store = Store(tmp_path / "idx", create=True)
    with store.transaction():
        store.set_meta({"dim": "4"})
        image_id = store.put_image(row("/r/a.jpg"), np.ones(4, np.float32) / 2)
        store.put_captions("c", "/f.txt", [{"text": "a dog", "image_path": "/r/a.jpg", "truncated": 0}],
                           np.ones((1, 4), np.float32), [])
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.put_captions("c", "/g.txt", [{"text": "a dog", "image_path": "/r/a.jpg", "truncated": 0}],
                               np.ones((1, 4), np.float32), [])
    with store.transaction():
        store.move_image(image_id, "/r/b.jpg", "/r", 10, 2)
    (caption,) = store.caption_rows(store.caption_ids("c")).values()
    assert caption["image"] == "/r/b.jpg" and caption["image_id"] == image_id
    assert store.caption_generation == 1
