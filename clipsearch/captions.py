"""Caption collections: importing parsed caption files (and sidecar .txt files beside images) into the store.

An import is all or nothing: every new caption is embedded first, then the collection's rows for that file are replaced
in one transaction. Re-importing the same file changes nothing and embeds nothing; a caption another file of the same
collection already holds is taken over rather than duplicated.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .caption_files import CaptionRow, ParsedCaptions, RowProblem
from .errors import BadInput
from .indexer import Progress, ProgressCallback
from .model import ClipModel
from .store import Store

SIDECAR_COLLECTION = "sidecar"
SIDECAR_SUFFIX = ".txt"
EMBED_BATCH = 256


@dataclass
class CaptionReport:
    """What one import did. `problems` are the rows that were skipped, each with where and why."""

    collection: str
    source: str
    format: str
    added: int = 0
    unchanged: int = 0
    removed: int = 0
    duplicates: int = 0
    truncated: int = 0
    linked: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "problems"}
        return {**data, "problems": [str(p) for p in self.problems]}


@dataclass
class CaptionHit:
    """A caption, best first; `image` is the path of the indexed image it describes, if any."""

    id: int
    text: str
    collection: str
    score: float
    image: str | None = None
    image_id: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_collection(name: str) -> str:
    name = name.strip()
    if not name or any(ch in name for ch in "\x00\n\r\t"):
        raise BadInput(f"invalid collection name {name!r}")
    return name


def default_collection(path: Path) -> str:
    """The file's name without suffix: captions_val2017.json -> 'captions_val2017'."""
    return check_collection(path.stem or path.name)


def import_captions(store: Store, model_loader: Callable[[], ClipModel], parsed: ParsedCaptions, collection: str,
                    source: str, progress: ProgressCallback | None = None) -> CaptionReport:
    """Make the collection hold exactly this file's captions for `source`, embedding only texts it lacks."""
    started = time.perf_counter()
    report = CaptionReport(collection, source, parsed.format, problems=list(parsed.problems))
    wanted: dict[tuple[str, str | None], CaptionRow] = {}
    for row in parsed.rows:
        key = (row.text, row.image)
        if key in wanted:
            report.duplicates += 1
        else:
            wanted[key] = row
    existing = store.caption_keys(collection)
    new = [row for key, row in wanted.items() if key not in existing]
    claimed = [existing[key][0] for key in wanted if key in existing and existing[key][1] != source]
    stale = [caption_id for key, (caption_id, owner) in existing.items() if owner == source and key not in wanted]
    report.unchanged = len(wanted) - len(new)
    vectors, overlong = _embed([row.text for row in new], model_loader, progress)
    report.truncated = int(sum(overlong))
    with store.transaction():
        store.claim_captions(claimed, source)
        store.put_captions(collection, source,
                           [{"text": row.text, "image_path": row.image, "truncated": int(long)}
                            for row, long in zip(new, overlong)],
                           vectors, stale)
    report.added, report.removed = len(new), len(stale)
    report.linked = store.linked_caption_count(collection, source)
    report.seconds = time.perf_counter() - started
    return report


def _embed(texts: Sequence[str], model_loader: Callable[[], ClipModel],
           progress: ProgressCallback | None) -> tuple[np.ndarray, list[bool]]:
    if not texts:
        return np.empty((0, 0), np.float32), []
    model = model_loader()
    overlong = model.overlong(texts)
    parts = []
    for start in range(0, len(texts), EMBED_BATCH):
        parts.append(model.encode_texts(texts[start:start + EMBED_BATCH]))
        if progress:
            progress(Progress("captions", done=min(start + EMBED_BATCH, len(texts)), total=len(texts)))
    return np.concatenate(parts), overlong


def sidecar_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + SIDECAR_SUFFIX


def sync_sidecars(store: Store, model_loader: Callable[[], ClipModel], image_paths: Sequence[str]) -> CaptionReport:
    """Import IMG_1234.txt beside IMG_1234.jpg as captions of that image (one per non-blank line), and drop sidecar
    captions once their image left the index or their text file was deleted beside a still-present image, so an
    unplugged drive, whose images the indexer keeps, keeps its captions too.

    `image_paths` are the indexed images to look beside (those under the roots just indexed)."""
    from .caption_files import read_captions

    started = time.perf_counter()
    total = CaptionReport(SIDECAR_COLLECTION, "", "txt")
    existing_sources = set(store.caption_sources(SIDECAR_COLLECTION))
    by_file = _sidecars_beside(image_paths)
    for text_file, images in by_file.items():
        try:
            parsed = read_captions(text_file)
        except BadInput as exc:
            total.problems.append(RowProblem(text_file, str(exc)))
            continue
        parsed.problems = [p for p in parsed.problems if p.reason != "blank caption"]  # blank lines: just spacing
        parsed.rows = [CaptionRow(row.text, image, row.where) for image in images for row in parsed.rows]
        report = import_captions(store, model_loader, parsed, SIDECAR_COLLECTION, text_file)
        total.added += report.added
        total.unchanged += report.unchanged
        total.removed += report.removed
        total.truncated += report.truncated
        total.problems += [RowProblem(f"{text_file} {p.where}", p.reason) for p in report.problems]
    seen = set(by_file)
    gone = [source for source in existing_sources - seen if _sidecar_gone(store, source)]
    if gone:
        ids = [i for source in gone for i in store.caption_ids(SIDECAR_COLLECTION, source)]
        with store.transaction():
            store.put_captions(SIDECAR_COLLECTION, "", [], np.empty((0, 0), np.float32), ids)
        total.removed += len(ids)
    total.seconds = time.perf_counter() - started
    return total


def _sidecars_beside(image_paths: Sequence[str]) -> dict[str, list[str]]:
    """The sidecar files present, each with the images it describes (IMG_1.jpg and IMG_1.png share IMG_1.txt).
    One listing per folder rather than a stat per image: every refresh runs this over every indexed image."""
    by_folder: dict[str, list[str]] = {}
    for image in image_paths:
        by_folder.setdefault(os.path.dirname(image), []).append(image)
    by_file: dict[str, list[str]] = {}
    for folder, images in by_folder.items():
        try:
            with os.scandir(folder) as entries:
                present = {entry.path for entry in entries if entry.name.endswith(SIDECAR_SUFFIX) and entry.is_file()}
        except OSError:  # gone or unreadable (an unplugged drive): no sidecar can be read there
            continue
        for image in images if present else ():
            if (text_file := sidecar_path(image)) in present:
                by_file.setdefault(text_file, []).append(image)
    return by_file


def _sidecar_gone(store: Store, source: str) -> bool:
    images = {row["image_path"] for row in store.captions_of_source(SIDECAR_COLLECTION, source)}
    indexed = [path for path in images if (row := store.row_by_path(path)) is not None and row["status"] == "ok"]
    if not indexed:
        return True  # the indexer removed the image (it never removes images of a missing folder)
    return not os.path.exists(source) and any(os.path.exists(path) for path in indexed)
