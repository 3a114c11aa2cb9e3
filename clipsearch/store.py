"""The `store` room: the SQLite database, the single source of truth (image rows, their vectors, roots, runs, meta).

Knows nothing of torch or FAISS. Every write that changes the set of vectors bumps `generation`, which the derived FAISS
file records, so a stale FAISS file is always detectable.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import sqlite_utils

from .errors import NotAnIndex

DB_NAME = "clipsearch.db"
APP_ID = 0x434C5053  # "CLPS": marks the file as ours, so another SQLite file is refused instead of altered


def _migration_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["roots"].create({"path": str, "added": str, "last_scan": str, "last_status": str}, pk="path")
    db["images"].create(
        {
            "id": int, "path": str, "root": str, "size": int, "mtime_ns": int, "fingerprint": str,
            "width": int, "height": int, "taken": str, "format": str, "status": str, "error": str,
            "indexed_at": str,
        },
        pk="id",
        not_null={"path", "root", "size", "mtime_ns", "status"},
    )
    db["images"].create_index(["path"], unique=True)
    db["images"].create_index(["fingerprint"])
    db["images"].create_index(["root"])
    db["images"].create_index(["status"])
    db["vectors"].create({"image_id": int, "vector": bytes}, pk="image_id", foreign_keys=[("image_id", "images", "id")])
    db["runs"].create(
        {
            "id": int, "started": str, "finished": str, "roots": str, "status": str, "added": int, "updated": int,
            "moved": int, "copied": int, "removed": int, "errors": int, "unchanged": int, "seconds": float,
            "warnings": str,
        },
        pk="id",
    )


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migration_1]
SCHEMA_VERSION = len(MIGRATIONS)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class ImageState:
    """What the indexer needs to decide whether a file changed, without loading whole rows."""

    id: int
    size: int
    mtime_ns: int
    status: str


class Store:
    """One index's database. Opened per process; writes go through `transaction()`."""

    def __init__(self, directory: Path, create: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.exists():
            if not create:
                raise NotAnIndex(f"{self.directory} is not a clipsearch index (no {DB_NAME})")
            self.directory.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self._check_and_migrate(create)
        except sqlite3.DatabaseError as exc:
            raise NotAnIndex(f"{self.path} is not a readable clipsearch database ({exc})") from exc

    def _check_and_migrate(self, create: bool) -> None:
        db = self.db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if app_id not in (0, APP_ID) or (app_id == 0 and db.table_names()):
            raise NotAnIndex(f"{self.path} is an SQLite file but not a clipsearch index")
        if version > SCHEMA_VERSION:
            raise NotAnIndex(f"{self.path} was written by a newer clipsearch (schema {version} > {SCHEMA_VERSION})")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        if version == SCHEMA_VERSION:
            return
        if not create and version == 0:
            raise NotAnIndex(f"{self.path} is not a clipsearch index")
        with self.transaction():
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA application_id={APP_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if version == 0:
                db["meta"].insert_all([{"key": "generation", "value": "0"}, {"key": "created", "value": now()}])

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One atomic write: everything inside commits together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.conn.close()

    # meta ---------------------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return {row["key"]: row["value"] for row in self.db["meta"].rows}

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, values: dict[str, Any]) -> None:
        """Call inside a transaction."""
        self.db["meta"].upsert_all(
            [{"key": k, "value": v if isinstance(v, str) else json.dumps(v)} for k, v in values.items()], pk="key"
        )

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def bump_generation(self) -> int:
        """Call inside the transaction that changed vectors."""
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return self.generation

    @property
    def dim(self) -> int | None:
        value = self.get_meta("dim")
        return int(value) if value else None

    # roots --------------------------------------------------------------------------------------------------------
    def roots(self) -> list[dict]:
        return list(self.db["roots"].rows_where(order_by="path"))

    def touch_root(self, path: str, status: str) -> None:
        existing = self.db.execute("SELECT added FROM roots WHERE path = ?", [path]).fetchone()
        self.db["roots"].upsert(
            {"path": path, "added": existing[0] if existing else now(), "last_scan": now(), "last_status": status},
            pk="path",
        )

    # images -------------------------------------------------------------------------------------------------------
    def states_under(self, root: str) -> dict[str, ImageState]:
        """Rows at or under `root` (a folder or a single file), whatever root they were indexed from, keyed by path."""
        prefix = root.rstrip("/") + "/"
        rows = self.db.execute(
            "SELECT path, id, size, mtime_ns, status FROM images WHERE path = ? OR substr(path, 1, ?) = ?",
            [root, len(prefix), prefix],
        )
        return {path: ImageState(id_, size, mtime, status) for path, id_, size, mtime, status in rows}

    def rows_with_fingerprints(self, fingerprints: Iterable[str]) -> dict[str, list[dict]]:
        """Embedded rows by fingerprint: the candidates a moved or copied file can take its vector from."""
        wanted = sorted(set(fingerprints))
        found: dict[str, list[dict]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.query(
                f"SELECT * FROM images WHERE status = 'ok' AND fingerprint IN ({marks}) ORDER BY id", chunk
            ):
                found.setdefault(row["fingerprint"], []).append(row)
        return found

    def rows(self, ids: Sequence[int]) -> dict[int, dict]:
        result: dict[int, dict] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.query(f"SELECT * FROM images WHERE id IN ({marks})", chunk):
                result[row["id"]] = row
        return result

    def row_by_path(self, path: str) -> dict | None:
        rows = list(self.db["images"].rows_where("path = ?", [path], limit=1))
        return rows[0] if rows else None

    def put_image(self, row: dict, vector: np.ndarray | None) -> int:
        """Insert or replace the row for row['path'] (keeping its id) and its vector. Call inside a transaction."""
        existing = self.db.execute("SELECT id FROM images WHERE path = ?", [row["path"]]).fetchone()
        row = {**row, "indexed_at": now()}
        if existing:
            image_id = existing[0]
            self.db["images"].update(image_id, row)
        else:
            image_id = self.db["images"].insert(row).last_pk
        self.db.execute("DELETE FROM vectors WHERE image_id = ?", [image_id])
        if vector is not None:
            self.db["vectors"].insert({"image_id": image_id, "vector": _blob(vector)})
        return int(image_id)

    def move_image(self, image_id: int, path: str, root: str, size: int, mtime_ns: int) -> None:
        self.db["images"].update(image_id, {"path": path, "root": root, "size": size, "mtime_ns": mtime_ns})

    def delete_images(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start:start + 500]]
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM vectors WHERE image_id IN ({marks})", chunk)
            self.db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)

    def errors(self) -> list[dict]:
        return list(self.db["images"].rows_where("status = 'error'", order_by="path"))

    def counts(self) -> dict[str, int]:
        ok, errors = self.db.execute(
            "SELECT coalesce(sum(status = 'ok'), 0), coalesce(sum(status = 'error'), 0) FROM images"
        ).fetchone()
        vectors = self.db.execute("SELECT count(*) FROM vectors").fetchone()[0]
        return {"images": ok, "errors": errors, "vectors": vectors}

    # vectors ------------------------------------------------------------------------------------------------------
    def has_vectors(self) -> bool:
        return self.db.execute("SELECT 1 FROM vectors LIMIT 1").fetchone() is not None

    def vector(self, image_id: int) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM vectors WHERE image_id = ?", [image_id]).fetchone()
        return np.frombuffer(row[0], dtype=np.float32).copy() if row else None

    def vectors_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, ids, matrix) read in one transaction, so a concurrent writer cannot slip a batch in between."""
        in_transaction = self.db.conn.in_transaction
        if not in_transaction:
            self.db.execute("BEGIN")
        try:
            return (self.generation, *self.all_vectors())
        finally:
            if not in_transaction:
                self.db.execute("COMMIT")

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, matrix float32 N x dim) of every stored vector, in id order: what FAISS is rebuilt from."""
        dim = self.dim or 0
        count = self.db.execute("SELECT count(*) FROM vectors").fetchone()[0]
        ids = np.empty(count, dtype=np.int64)
        matrix = np.empty((count, dim), dtype=np.float32)
        for n, (image_id, blob) in enumerate(self.db.execute("SELECT image_id, vector FROM vectors ORDER BY image_id")):
            ids[n] = image_id
            matrix[n] = np.frombuffer(blob, dtype=np.float32)
        return ids, matrix

    # runs ---------------------------------------------------------------------------------------------------------
    def start_run(self, roots: Sequence[str]) -> int:
        with self.transaction():
            return int(self.db["runs"].insert({"started": now(), "roots": json.dumps(list(roots)), "status": "running"}).last_pk)

    def finish_run(self, run_id: int, values: dict[str, Any]) -> None:
        with self.transaction():
            self.db["runs"].update(run_id, {**values, "finished": now()})

    def last_run(self) -> dict | None:
        rows = list(self.db["runs"].rows_where(order_by="id desc", limit=1))
        return rows[0] if rows else None

    def integrity_problems(self) -> list[str]:
        result = [row[0] for row in self.db.execute("PRAGMA quick_check")]
        return [] if result == ["ok"] else result


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()
