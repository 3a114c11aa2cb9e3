"""The `query` room: turning a question into a vector, searching FAISS, and joining ids back to SQLite rows as `Hit`s."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from . import media
from .errors import BadInput
from .model import ClipModel
from .store import Store
from .vectors import VectorIndex


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


def text_vector(text: str, model_loader: Callable[[], ClipModel]) -> np.ndarray:
    """Checked before the model loads, so a typo costs nothing."""
    if not text or not text.strip():
        raise BadInput("the query text is empty")
    return model_loader().encode_texts([text.strip()])[0]


def image_vector(store: Store, image: str | int, model_loader: Callable[[], ClipModel]) -> tuple[np.ndarray, int | None]:
    """The vector of an image: stored when it is indexed and unchanged (no model needed), else embedded now.

    Returns the vector and the indexed id of the image (so `similar` can leave the image itself out), if any."""
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        vector = store.vector(int(image))
        if vector is None:
            raise BadInput(f"no indexed image has id {image}")
        return vector, int(image)
    path = os.path.abspath(os.path.expanduser(os.fspath(image)))
    row = store.row_by_path(path)
    st = media.stat_or_none(path)
    if row is not None and row["status"] == "ok" and st is not None and \
            (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        vector = store.vector(row["id"])
        if vector is not None:
            return vector, row["id"]
    if st is None:
        raise BadInput(f"image not found: {image}")
    if not os.path.isfile(path):
        raise BadInput(f"not an image file: {image}")
    model = model_loader()
    try:
        decoded = media.load(path, model.preprocess)
    except media.MediaError as exc:
        raise BadInput(f"cannot read image {image}: {exc}") from exc
    vector = model.encode_images(media.to_model_input(decoded.pixels[None], model.preprocess))[0]
    return vector, (row["id"] if row is not None else None)


def search_vector(store: Store, vectors: VectorIndex, query: np.ndarray, k: int,
                  exclude: int | None = None) -> list[Hit]:
    check_k(k)
    result = vectors.search(query, k + (1 if exclude is not None else 0))
    keep = result.ids != (exclude if exclude is not None else -1)
    return to_hits(store, result.ids[keep][:k], result.scores[keep][:k])
