"""The `query` room: turning a question into a vector, searching FAISS within the filters, and joining ids back to
SQLite rows as `Hit`s and `CaptionHit`s.

Filters become an allow-list of ids read from SQLite that FAISS searches within (an id selector), so a filtered search
returns the true top k of the filtered set, never a post-filtered remainder of an unfiltered top k.

An image part needs the image model only when its file is not indexed (by path, or by content fingerprint when it was
copied or moved): a query process otherwise imports neither torch nor the image decoder.
"""
from __future__ import annotations

import calendar
import os
import re
import stat
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from .errors import BadInput
from .query_syntax import Query
from .store import Store

if TYPE_CHECKING:  # pragma: no cover - imported where used: a text query needs neither
    from .captions import CaptionHit
    from .model import ClipModel
    from .vectors import VectorIndex

TextEncoder = Callable[[list[str]], np.ndarray]

# What a user types after --type -> the Pillow formats it stands for (phones write JPEGs as MPO).
TYPE_FORMATS: dict[str, tuple[str, ...]] = {
    "jpg": ("JPEG", "MPO"), "jpeg": ("JPEG", "MPO"), "png": ("PNG",), "gif": ("GIF",), "webp": ("WEBP",),
    "tif": ("TIFF",), "tiff": ("TIFF",), "bmp": ("BMP",), "heic": ("HEIF",), "heif": ("HEIF",), "avif": ("AVIF",),
}
_DATE = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?$")


@dataclass
class Hit:
    """One result, best first. `score` is the cosine similarity between query and image."""

    id: int
    path: str
    score: float
    width: int | None = None
    height: int | None = None
    taken: str | None = None
    size: int | None = None
    modified: str | None = None
    format: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise BadInput(f"k must be a whole number of at least 1 (got {k!r})")
    return k


def check_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise BadInput(f"threshold must be a score between -1 and 1 (got {threshold!r})")
    return float(threshold)


def parse_date(value: str, *, end: bool) -> str:
    """'2019', '2019-05', '2019-05-04' or '2019-05-04T12:30[:00]' -> the first (or, with end, the last) second it
    covers, as ISO text: --after and --before are both inclusive of the period named."""
    match = _DATE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise BadInput(f"invalid date {value!r}: use YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]")
    year, month, day, hour, minute, second = match.groups()
    y = int(year)
    mo = int(month) if month else (12 if end else 1)
    if not 1 <= mo <= 12:
        raise BadInput(f"invalid date {value!r}: month {mo} does not exist")
    last_day = calendar.monthrange(y, mo)[1]
    d = int(day) if day else (last_day if end else 1)
    if not 1 <= d <= last_day:
        raise BadInput(f"invalid date {value!r}: {y}-{mo:02d} has no day {d}")
    if hour is None:
        h, mi, sec = (23, 59, 59) if end else (0, 0, 0)
    else:
        h, mi = int(hour), int(minute)
        sec = int(second) if second else (59 if end else 0)
        if h > 23 or mi > 59 or sec > 59:
            raise BadInput(f"invalid date {value!r}: no such time of day")
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}"


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


@dataclass(frozen=True)
class Filters:
    """Which images a search may return. Folders are OR-ed; everything else must hold too."""

    under: tuple[str, ...] = ()
    after: str | None = None
    before: str | None = None
    formats: tuple[str, ...] = ()

    @classmethod
    def build(cls, under: str | Iterable[str] | None = None, after: str | None = None, before: str | None = None,
              types: str | Iterable[str] | None = None) -> "Filters":
        """Check and normalise what a person typed: folders must exist, dates parse, types are known."""
        folders = []
        for folder in _as_list(under):
            path = os.path.abspath(os.path.expanduser(folder))
            if not os.path.exists(path):
                raise BadInput(f"folder not found: {folder}")
            folders.append(path)
        formats: list[str] = []
        for item in _as_list(types):
            for name in item.split(","):
                key = name.strip().lower().lstrip(".")
                if not key:
                    continue
                if key not in TYPE_FORMATS:
                    raise BadInput(f"unknown image type {name.strip()!r} (known: {', '.join(sorted(TYPE_FORMATS))})")
                formats += [f for f in TYPE_FORMATS[key] if f not in formats]
        low = parse_date(after, end=False) if after else None
        high = parse_date(before, end=True) if before else None
        if low and high and low > high:
            raise BadInput(f"--after {after} is later than --before {before}: no image can match")
        return cls(tuple(folders), low, high, tuple(formats))

    @property
    def active(self) -> bool:
        return bool(self.under or self.after or self.before or self.formats)

    def allowed(self, store: Store) -> np.ndarray | None:
        if not self.active:
            return None
        return store.image_ids_where(under=self.under, after=self.after, before=self.before, formats=self.formats)


def to_hits(store: Store, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
    rows = store.rows(ids.tolist())
    hits = []
    for image_id, score in zip(ids.tolist(), scores.tolist()):
        row = rows.get(image_id)
        if row is None:  # a row deleted after FAISS was loaded: never hand out a dangling id
            continue
        modified = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(row["mtime_ns"] / 1e9))
        hits.append(Hit(image_id, row["path"], round(float(score), 6), row["width"], row["height"], row["taken"],
                        row["size"], modified, row["format"]))
    return hits


def image_vector(store: Store, image: str | int, model_loader: Callable[[], ClipModel]) -> tuple[np.ndarray, int | None]:
    """The vector of an image: stored when it is indexed and unchanged, or when an indexed image has the same content
    fingerprint (a copy, or the file moved since); embedded now otherwise (the only case that loads the model).

    Returns the vector and the indexed id of the image (so `similar` can leave the image itself out), if any."""
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        vector = store.vector(int(image))
        if vector is None:
            raise BadInput(f"no indexed image has id {image}")
        return vector, int(image)
    path = os.path.abspath(os.path.expanduser(os.fspath(image)))
    row = store.row_by_path(path)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if row is not None and row["status"] == "ok" and st is not None and \
            (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        vector = store.vector(row["id"])
        if vector is not None:
            return vector, row["id"]
    if st is None:
        raise BadInput(f"image not found: {image}")
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"not an image file: {image}")
    from . import media

    try:
        same = store.rows_with_fingerprints([media.fingerprint(path)])
    except OSError as exc:
        raise BadInput(f"cannot read image {image}: {exc.strerror or exc}") from exc
    for candidate in next(iter(same.values()), []):
        vector = store.vector(candidate["id"])
        if vector is not None:
            return vector, candidate["id"]
    model = model_loader()
    try:
        decoded = media.load(path, model.preprocess)
    except media.MediaError as exc:
        raise BadInput(f"cannot read image {image}: {exc}") from exc
    vector = model.encode_images(media.to_model_input(decoded.pixels[None], model.preprocess))[0]
    return vector, (row["id"] if row is not None else None)


def query_vector(query: Query, store: Store, encode_texts: TextEncoder,
                 model_loader: Callable[[], ClipModel]) -> tuple[np.ndarray, set[int]]:
    """The weighted sum of the parts' unit vectors, renormalised; and the ids of indexed images in the query (a search
    for 'more like these' should not answer with the images themselves)."""
    texts = query.texts
    text_vectors = iter(encode_texts(texts)) if texts else iter(())
    total: np.ndarray | None = None
    own: set[int] = set()
    for part in query.parts:
        if part.kind == "text":
            vector = next(text_vectors)
        else:
            vector, image_id = image_vector(store, part.value, model_loader)
            if image_id is not None and part.weight > 0:
                own.add(image_id)
        total = part.weight * vector if total is None else total + part.weight * vector
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise BadInput("the parts of the query cancel each other out")
    return (total / norm).astype(np.float32), own


def search_images(store: Store, vectors: VectorIndex, query: np.ndarray, k: int, *, filters: Filters = Filters(),
                  threshold: float | None = None, exclude: Iterable[int] = ()) -> list[Hit]:
    """The k indexed images nearest to `query` among those the filters allow, best first."""
    check_k(k)
    allowed = filters.allowed(store)
    result = _search(vectors, query, k, allowed, exclude)
    return _above(to_hits(store, result.ids, result.scores), threshold)


def search_captions(store: Store, vectors: VectorIndex, query: np.ndarray, k: int, *,
                    collections: Sequence[str] = (), threshold: float | None = None) -> list[CaptionHit]:
    """The k captions nearest to `query`, optionally only from some collections, best first."""
    from .captions import CaptionHit

    check_k(k)
    result = _search(vectors, query, k, store.caption_ids_where(collections), ())
    rows = store.caption_rows(result.ids.tolist())
    hits = [CaptionHit(int(i), rows[i]["text"], rows[i]["collection"], round(float(score), 6), rows[i]["image"],
                       rows[i]["image_id"])
            for i, score in zip(result.ids.tolist(), result.scores.tolist()) if i in rows]
    return _above(hits, threshold)


def _search(vectors: VectorIndex, query: np.ndarray, k: int, allowed: np.ndarray | None, exclude: Iterable[int]):
    exclude = sorted(set(exclude))
    if allowed is not None:
        if exclude:
            allowed = np.setdiff1d(allowed, np.asarray(exclude, dtype=np.int64))
        if not len(allowed):
            return vectors.search(query, 0)
        return vectors.search(query, min(k, len(allowed)), allowed)
    result = vectors.search(query, k + len(exclude))
    keep = ~np.isin(result.ids, np.asarray(exclude, dtype=np.int64))
    result.ids, result.scores = result.ids[keep][:k], result.scores[keep][:k]
    return result


def _above(hits: list, threshold: float | None) -> list:
    return hits if threshold is None else [hit for hit in hits if hit.score >= threshold]
