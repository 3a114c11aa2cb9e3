"""The `store` room: the SQLite database, the single source of truth (image rows, their vectors, roots, runs, meta).

Knows nothing of torch or FAISS. Every write that changes the set of vectors bumps `generation`, which the derived FAISS
file records, so a stale FAISS file is always detectable.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import sqlite_utils

from .errors import IndexReadOnly, NotAnIndex

DB_NAME = "clipsearch.db"
APP_ID = 0x434C5053  # "CLPS": marks the file as ours, so another SQLite file is refused instead of altered


def _migration_1(db: "sqlite_utils.Database") -> None:
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


def _migration_2(db: "sqlite_utils.Database") -> None:
    """Captions: text rows grouped in collections, unique by (collection, text, image), each remembering the file it
    came from (a re-import replaces exactly that file's rows) and, optionally, the image it describes, by path, so the
    link holds whichever is indexed first."""
    db["captions"].create(
        {"id": int, "collection": str, "source": str, "text": str, "image_path": str, "truncated": int,
         "added": str},
        pk="id",
        not_null={"collection", "source", "text"},
    )
    db.execute("CREATE UNIQUE INDEX captions_identity ON captions (collection, text, coalesce(image_path, ''))")
    db["captions"].create_index(["source"])
    db["captions"].create_index(["image_path"])
    db["caption_vectors"].create({"caption_id": int, "vector": bytes}, pk="caption_id",
                                 foreign_keys=[("caption_id", "captions", "id")])
    db["meta"].upsert({"key": "caption_generation", "value": "0"}, pk="key")


MIGRATIONS: list[Callable[["sqlite_utils.Database"], None]] = [_migration_1, _migration_2]
SCHEMA_VERSION = len(MIGRATIONS)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _under(root: str) -> tuple[str, list[object]]:
    """(SQL condition, its parameters) for the image rows at or under `root`, a folder or a single file."""
    prefix = root.rstrip("/") + "/"
    return "(path = ? OR substr(path, 1, ?) = ?)", [root, len(prefix), prefix]


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
        exists = self.path.exists()
        if not exists and not create:
            raise NotAnIndex(f"{self.directory} is not a clipsearch index (no {DB_NAME})")
        if exists and not os.access(self.path, os.R_OK):
            raise NotAnIndex(f"cannot read {self.path}: permission denied")
        # Another user's index, or one on read-only media: it can still be searched, never written.
        self.read_only = exists and not (os.access(self.path, os.W_OK) and os.access(self.directory, os.W_OK))
        self._immutable_as_of: tuple | None = None  # the file as a connection opened immutable found it
        if not exists:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if not os.access(self.directory, os.W_OK):
                    raise PermissionError("permission denied")
            except OSError as exc:
                raise IndexReadOnly(f"cannot create an index in {self.directory}: {exc.strerror or exc}") from exc
        try:
            self.conn = self._connect_read_only() if self.read_only else self._connect()
            self._check_and_migrate(create)
        except sqlite3.DatabaseError as exc:
            raise NotAnIndex(f"{self.path} is not a readable clipsearch database ({exc})") from exc

    def _connect(self, uri: str | None = None) -> sqlite3.Connection:
        return sqlite3.connect(uri or self.path, timeout=30, isolation_level=None, check_same_thread=False,
                               uri=uri is not None)

    def _connect_read_only(self) -> sqlite3.Connection:
        """Read-only. A WAL database needs its -shm file, which exists only while a writer has it open (it then
        works as usual) and cannot be created here otherwise: with no writer about, the file is opened as immutable."""
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode=ro"
        conn = self._connect(uri)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            self._immutable_as_of = None
            return conn
        except sqlite3.OperationalError:
            conn.close()
            self._immutable_as_of = self._file_state()
            return self._connect(uri + "&immutable=1")

    def _file_state(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # gone: the open connection still reads the file it has
        return st.st_ino, st.st_size, st.st_mtime_ns, os.path.exists(f"{self.path}-wal")

    def follow_changes(self) -> None:
        """An immutable connection never looks at the file again: once the file has changed, or a writer has it
        open, connect again, so a long-lived reader (the web page) follows another user's runs."""
        if self._immutable_as_of is None or self._file_state() in (None, self._immutable_as_of):
            return
        self.conn.close()
        self.__dict__.pop("db", None)  # sqlite-utils over the old connection
        self.conn = self._connect_read_only()

    @cached_property
    def db(self) -> "sqlite_utils.Database":
        """sqlite-utils over the same connection, for writes. Imported on first use: reads go through `conn` and
        plain SQL, so a query from a new process does not pay for importing sqlite-utils."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict]:
        """Rows as dicts, like sqlite-utils' `query`."""
        cursor = self.conn.execute(sql, params)
        names = [column[0] for column in cursor.description]
        for row in cursor:
            yield dict(zip(names, row))

    def _check_and_migrate(self, create: bool) -> None:
        conn = self.conn
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1").fetchone()
        if app_id not in (0, APP_ID) or (app_id == 0 and tables):
            raise NotAnIndex(f"{self.path} is an SQLite file but not a clipsearch index")
        if version > SCHEMA_VERSION:
            raise NotAnIndex(f"{self.path} was written by a newer clipsearch (schema {version} > {SCHEMA_VERSION})")
        if not create and version == 0:
            raise NotAnIndex(f"{self.path} is not a clipsearch index")
        if self.read_only:  # nothing to set or migrate: a connection's settings here would be writes
            if version < SCHEMA_VERSION:
                self.check_writable(f"it needs an upgrade to schema {SCHEMA_VERSION} (it has {version}); open it "
                                    "once where it can be written")
            return
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        if version == SCHEMA_VERSION:
            return
        db = self.db
        with self.transaction():
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA application_id={APP_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if version == 0:
                db["meta"].upsert_all([{"key": "generation", "value": "0"}, {"key": "created", "value": now()}],
                                      pk="key")

    def check_writable(self, what: str = "it can be searched, not changed") -> None:
        """Raise IndexReadOnly, saying ``what``, when this process cannot write the index."""
        if self.read_only:
            raise IndexReadOnly(f"index {self.directory} is read-only here (another user's, or on read-only media): "
                                f"{what}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic write: everything inside commits together or not at all."""
        self.check_writable()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self._commit()

    def _commit(self) -> None:
        """The one COMMIT of every write (a seam the crash harness hooks to kill a run mid-commit)."""
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # meta ---------------------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
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
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return self.generation

    @property
    def dim(self) -> int | None:
        value = self.get_meta("dim")
        return int(value) if value else None

    # roots --------------------------------------------------------------------------------------------------------
    def roots(self) -> list[dict]:
        return list(self._query("SELECT * FROM roots ORDER BY path"))

    def touch_root(self, path: str, status: str) -> None:
        existing = self.conn.execute("SELECT added FROM roots WHERE path = ?", [path]).fetchone()
        self.db["roots"].upsert(
            {"path": path, "added": existing[0] if existing else now(), "last_scan": now(), "last_status": status},
            pk="path",
        )

    # images -------------------------------------------------------------------------------------------------------
    def states_under(self, root: str) -> dict[str, ImageState]:
        """Rows at or under `root` (a folder or a single file), whatever root they were indexed from, keyed by path."""
        under, params = _under(root)
        rows = self.conn.execute(f"SELECT path, id, size, mtime_ns, status FROM images WHERE {under}", params)
        return {path: ImageState(id_, size, mtime, status) for path, id_, size, mtime, status in rows}

    def rows_with_fingerprints(self, fingerprints: Iterable[str]) -> dict[str, list[dict]]:
        """Embedded rows by fingerprint: the candidates a moved or copied file can take its vector from."""
        wanted = sorted(set(fingerprints))
        found: dict[str, list[dict]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(
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
            for row in self._query(f"SELECT * FROM images WHERE id IN ({marks})", chunk):
                result[row["id"]] = row
        return result

    def row_by_path(self, path: str) -> dict | None:
        return next(self._query("SELECT * FROM images WHERE path = ? LIMIT 1", [path]), None)

    def put_image(self, row: dict, vector: np.ndarray | None) -> int:
        """Insert or replace the row for row['path'] (keeping its id) and its vector. Call inside a transaction."""
        existing = self.conn.execute("SELECT id FROM images WHERE path = ?", [row["path"]]).fetchone()
        row = {**row, "indexed_at": now()}
        if existing:
            image_id = existing[0]
            self.db["images"].update(image_id, row)
        else:
            image_id = self.db["images"].insert(row).last_pk
        self.conn.execute("DELETE FROM vectors WHERE image_id = ?", [image_id])
        if vector is not None:
            self.db["vectors"].insert({"image_id": image_id, "vector": _blob(vector)})
        return int(image_id)

    def move_image(self, image_id: int, path: str, root: str, size: int, mtime_ns: int) -> None:
        """The row keeps its id and vector; captions linked to the old path follow the file."""
        old = self.conn.execute("SELECT path FROM images WHERE id = ?", [image_id]).fetchone()
        self.db["images"].update(image_id, {"path": path, "root": root, "size": size, "mtime_ns": mtime_ns})
        if old and old[0] != path:
            self.conn.execute("UPDATE OR IGNORE captions SET image_path = ? WHERE image_path = ?", [path, old[0]])

    def delete_images(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start:start + 500]]
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM vectors WHERE image_id IN ({marks})", chunk)
            self.conn.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)

    def errors(self) -> list[dict]:
        return list(self._query("SELECT * FROM images WHERE status = 'error' ORDER BY path"))

    def counts(self) -> dict[str, int]:
        ok, errors = self.conn.execute(
            "SELECT coalesce(sum(status = 'ok'), 0), coalesce(sum(status = 'error'), 0) FROM images"
        ).fetchone()
        vectors = self.conn.execute("SELECT count(*) FROM vectors").fetchone()[0]
        return {"images": ok, "errors": errors, "vectors": vectors}

    # vectors ------------------------------------------------------------------------------------------------------
    def has_vectors(self) -> bool:
        return self.conn.execute("SELECT 1 FROM vectors LIMIT 1").fetchone() is not None

    def vector(self, image_id: int) -> np.ndarray | None:
        row = self.conn.execute("SELECT vector FROM vectors WHERE image_id = ?", [image_id]).fetchone()
        return np.frombuffer(row[0], dtype=np.float32).copy() if row else None

    def vectors_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, ids, matrix) read in one transaction, so a concurrent writer cannot slip a batch in between."""
        return self._snapshot("generation", self.all_vectors)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, matrix float32 N x dim) of every stored image vector, in id order: what FAISS is rebuilt from."""
        return self._matrix("SELECT image_id, vector FROM vectors ORDER BY image_id", "SELECT count(*) FROM vectors")

    def _snapshot(self, generation_key: str, read: Callable[[], tuple[np.ndarray, np.ndarray]]):
        in_transaction = self.conn.in_transaction
        if not in_transaction:
            self.conn.execute("BEGIN")
        try:
            return (int(self.get_meta(generation_key, "0")), *read())
        finally:
            if not in_transaction:
                self.conn.execute("COMMIT")

    def _matrix(self, select: str, count: str) -> tuple[np.ndarray, np.ndarray]:
        dim = self.dim or 0
        total = self.conn.execute(count).fetchone()[0]
        ids = np.empty(total, dtype=np.int64)
        matrix = np.empty((total, dim), dtype=np.float32)
        for n, (row_id, blob) in enumerate(self.conn.execute(select)):
            ids[n] = row_id
            matrix[n] = np.frombuffer(blob, dtype=np.float32)
        return ids, matrix

    # filters ------------------------------------------------------------------------------------------------------
    def image_ids_where(self, *, under: Sequence[str] = (), after: str | None = None, before: str | None = None,
                        formats: Sequence[str] = ()) -> np.ndarray:
        """Ids of indexed images passing every given filter (folders OR-ed): the allow-list FAISS searches within.

        Dates compare as ISO text against the EXIF capture time, else the file's modification time (local time)."""
        where, params = ["status = 'ok'"], []
        if under:
            alternatives = []
            for folder in under:  # a range on the path index: '/' + 1 is '0', so [F/, F0) holds exactly F/...
                folder = folder.rstrip("/")
                alternatives.append("(path = ? OR (path >= ? AND path < ?))")
                params += [folder, folder + "/", folder + "0"]
            where.append("(" + " OR ".join(alternatives) + ")")
        when = "coalesce(taken, strftime('%Y-%m-%dT%H:%M:%S', mtime_ns / 1000000000, 'unixepoch', 'localtime'))"
        if after:
            where.append(f"{when} >= ?")
            params.append(after)
        if before:
            where.append(f"{when} <= ?")
            params.append(before)
        if formats:
            where.append(f"upper(format) IN ({','.join('?' * len(formats))})")
            params += [f.upper() for f in formats]
        rows = self.conn.execute(f"SELECT id FROM images WHERE {' AND '.join(where)} ORDER BY id", params)
        return np.fromiter((row[0] for row in rows), dtype=np.int64)

    # captions -----------------------------------------------------------------------------------------------------
    def caption_keys(self, collection: str) -> dict[tuple[str, str | None], tuple[int, str]]:
        """(text, image_path) -> (id, source) of a collection's captions: what a re-import is compared against."""
        rows = self.conn.execute("SELECT id, text, image_path, source FROM captions WHERE collection = ?", [collection])
        return {(text, image): (row_id, source) for row_id, text, image, source in rows}

    def claim_captions(self, ids: Sequence[int], source: str) -> None:
        """Captions another file brought that this file also holds now belong to this file (it moved or was merged)."""
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start:start + 500]]
            self.conn.execute(f"UPDATE captions SET source = ? WHERE id IN ({','.join('?' * len(chunk))})",
                            [source, *chunk])

    def put_captions(self, collection: str, source: str, rows: Sequence[dict], vectors: np.ndarray,
                     stale: Sequence[int]) -> None:
        """Add `rows` (text, image_path, truncated) with their vectors and drop `stale` ids. Call inside a transaction."""
        self.delete_captions(stale)
        stamp = now()
        for row, vector in zip(rows, vectors):
            caption_id = self.db["captions"].insert({"collection": collection, "source": source, "added": stamp,
                                                     **row}).last_pk
            self.db["caption_vectors"].insert({"caption_id": caption_id, "vector": _blob(vector)})
        if len(rows) or len(stale):
            self.bump_caption_generation()

    def delete_captions(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 500):
            chunk = [int(i) for i in ids[start:start + 500]]
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM caption_vectors WHERE caption_id IN ({marks})", chunk)
            self.conn.execute(f"DELETE FROM captions WHERE id IN ({marks})", chunk)

    def caption_ids(self, collection: str | None = None, source: str | None = None) -> list[int]:
        where, params = [], []
        if collection is not None:
            where.append("collection = ?")
            params.append(collection)
        if source is not None:
            where.append("source = ?")
            params.append(source)
        sql = "SELECT id FROM captions" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [row[0] for row in self.conn.execute(sql, params)]

    def collections(self) -> list[dict]:
        """One row per collection: name, caption count, linked count, sources, last added."""
        rows = self.conn.execute(
            "SELECT c.collection, count(*), sum(i.id IS NOT NULL), group_concat(DISTINCT c.source), max(c.added) "
            "FROM captions c LEFT JOIN images i ON i.path = c.image_path AND i.status = 'ok' "
            "GROUP BY c.collection ORDER BY c.collection")
        return [{"collection": name, "captions": count, "linked": linked or 0,
                 "sources": sorted(sources.split(",")) if sources else [], "added": added}
                for name, count, linked, sources, added in rows]

    def caption_rows(self, ids: Sequence[int]) -> dict[int, dict]:
        """Caption rows with `image` = the linked image's path when that image is indexed (else None)."""
        result: dict[int, dict] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(
                f"SELECT c.*, i.path AS image, i.id AS image_id FROM captions c LEFT JOIN images i "
                f"ON i.path = c.image_path AND i.status = 'ok' WHERE c.id IN ({marks})", chunk
            ):
                result[row["id"]] = row
        return result

    def captions_of_source(self, collection: str, source: str) -> list[dict]:
        return list(self._query("SELECT * FROM captions WHERE collection = ? AND source = ?", [collection, source]))

    def captions_of_image(self, path: str) -> list[dict]:
        return list(self._query("SELECT * FROM captions WHERE image_path = ? ORDER BY id", [path]))

    def caption_ids_where(self, collections: Sequence[str] = ()) -> np.ndarray | None:
        if not collections:
            return None
        marks = ",".join("?" * len(collections))
        rows = self.conn.execute(f"SELECT id FROM captions WHERE collection IN ({marks}) ORDER BY id", list(collections))
        return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def caption_sources(self, collection: str) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT DISTINCT source FROM captions WHERE collection = ?",
                                                  [collection])]

    def linked_caption_count(self, collection: str, source: str) -> int:
        """Captions of this file whose image is indexed right now."""
        return self.conn.execute(
            "SELECT count(*) FROM captions c JOIN images i ON i.path = c.image_path AND i.status = 'ok' "
            "WHERE c.collection = ? AND c.source = ?", [collection, source]).fetchone()[0]

    def ok_paths_under(self, roots: Sequence[str]) -> list[str]:
        paths: set[str] = set()
        for root in roots:
            under, params = _under(root)
            paths.update(path for (path,) in self.conn.execute(
                f"SELECT path FROM images WHERE status = 'ok' AND {under}", params))
        return sorted(paths)

    def ok_ids_by_path(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(paths), 500):
            chunk = list(paths[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for path, image_id in self.conn.execute(
                    f"SELECT path, id FROM images WHERE status = 'ok' AND path IN ({marks})", chunk):
                found[path] = image_id
        return found

    def vectors_of(self, ids: Sequence[int], captions: bool = False) -> np.ndarray:
        """The stored vectors of these image (or caption) ids, in the order given."""
        table, key = ("caption_vectors", "caption_id") if captions else ("vectors", "image_id")
        position = {int(i): n for n, i in enumerate(ids)}
        matrix = np.empty((len(position), self.dim or 0), dtype=np.float32)
        wanted, found = list(position), 0
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row_id, blob in self.conn.execute(f"SELECT {key}, vector FROM {table} WHERE {key} IN ({marks})", chunk):
                matrix[position[row_id]] = np.frombuffer(blob, dtype=np.float32)
                found += 1
        if found != len(wanted):
            raise LookupError(f"{len(wanted) - found} of the requested {table} are missing")
        return matrix

    def caption_count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM captions").fetchone()[0]

    @property
    def caption_generation(self) -> int:
        return int(self.get_meta("caption_generation", "0"))

    def bump_caption_generation(self) -> None:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'caption_generation'")

    def caption_vectors_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]:
        return self._snapshot("caption_generation", self.all_caption_vectors)

    def all_caption_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._matrix("SELECT caption_id, vector FROM caption_vectors ORDER BY caption_id",
                            "SELECT count(*) FROM caption_vectors")

    # runs ---------------------------------------------------------------------------------------------------------
    def start_run(self, roots: Sequence[str]) -> int:
        with self.transaction():
            return int(self.db["runs"].insert({"started": now(), "roots": json.dumps(list(roots)), "status": "running"}).last_pk)

    def finish_run(self, run_id: int, values: dict[str, Any]) -> None:
        with self.transaction():
            self.db["runs"].update(run_id, {**values, "finished": now()})

    def last_run(self) -> dict | None:
        rows = list(self._query("SELECT * FROM runs ORDER BY id DESC LIMIT 1"))
        return rows[0] if rows else None

    def integrity_problems(self) -> list[str]:
        """SQLite's quick_check, one line per problem (at most 5, then a count); a check that cannot even run on the
        damage is itself the problem."""
        try:
            result = [str(row[0]) for row in self.conn.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            return [f"the database cannot be read ({exc})"]
        if result == ["ok"]:
            return []
        problems = [" ".join(problem.split()) for problem in result]
        return problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()
