"""The library's error types. Each carries the exit code the CLI uses, so scripts can tell failures apart."""
from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A one-line reason from any exception (third-party messages span lines or are empty), at most ``limit`` long."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class ClipsearchError(Exception):
    """Base of every error the library raises on purpose; the message is one line meant for a person."""

    exit_code = 1


class BadInput(ClipsearchError):
    """Something the caller passed is wrong: a missing path, an empty query, a bad number."""

    exit_code = 2


class ModelError(ClipsearchError):
    """The model cannot be loaded: unknown name or tag, unreadable checkpoint, weights not available offline."""

    exit_code = 3


class ModelMismatch(ClipsearchError):
    """The index was built with another model; mixing embeddings of two models would give garbage."""

    exit_code = 4


class NotAnIndex(ClipsearchError):
    """The path exists but is not a clipsearch index (or its database is damaged)."""

    exit_code = 5


class IndexBusy(ClipsearchError):
    """Another process is writing to this index."""

    exit_code = 6


class IndexMissing(ClipsearchError):
    """A read-only command was pointed at an index that does not exist yet."""

    exit_code = 7


class VerifyFailed(ClipsearchError):
    """SQLite and FAISS disagree."""

    exit_code = 8


class IndexReadOnly(ClipsearchError):
    """The index can be searched but not written here: another user's, or on read-only media."""

    exit_code = 9
