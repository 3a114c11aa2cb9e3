"""Retrieval evaluation on a captioned collection: text->image and image->text recall@K and ranks, next to chance.

It is how a user with real weights reproduces published retrieval numbers for their model, and how a test proves that a
random model sits at chance while a trained one does not. The gallery is the collection's own images (distractors that
happen to share their folders are not counted), the ranking is exact (all pairs), and ties count against the model.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .caption_files import read_captions
from .errors import BadInput
from .indexer import ProgressCallback

if TYPE_CHECKING:  # pragma: no cover
    from .index import Index

KS = (1, 5, 10)
CHUNK = 2048  # caption rows per similarity block: bounds memory for COCO-sized sets


@dataclass
class Direction:
    recall: dict[str, float]      # "R@1" -> fraction of queries whose answer ranks within K
    mean_rank: float
    median_rank: float
    chance: dict[str, float]      # the same recalls for a model that ranks at random, plus "mean_rank"


@dataclass
class EvalReport:
    dataset: str
    collection: str
    model: str
    images: int
    captions: int
    text_to_image: Direction
    image_to_text: Direction
    unusable: int = 0               # captions without an image, or whose image could not be indexed
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def default_index_name(dataset: str | os.PathLike) -> str:
    """An index of its own per dataset (named after its folder), so evaluating never mixes into a photo index."""
    path = Path(os.path.abspath(os.fspath(dataset)))
    return "eval-" + (path.parent.name or path.stem)


def evaluate(idx: "Index", dataset: str | os.PathLike, *, batch_size: int = 32, workers: int | None = None,
             progress: ProgressCallback | None = None) -> EvalReport:
    """Index the dataset's images and import its captions where missing, then rank every caption against every image."""
    started = time.perf_counter()
    parsed = read_captions(dataset)
    linked = [row for row in parsed.rows if row.image]
    if not linked:
        raise BadInput(f"{dataset} links no captions to images: eval needs Flickr-style .jsonl "
                       f"({{\"image\": ..., \"captions\": [...]}}) or COCO caption JSON")
    folders = sorted({os.path.dirname(row.image) for row in linked if os.path.isdir(os.path.dirname(row.image))})
    if not folders:
        raise BadInput(f"none of the images {dataset} names exist (first: {linked[0].image})")
    report = idx.index(folders, batch_size=batch_size, workers=workers, progress=progress)
    captions = idx.add_captions(dataset, progress=progress)
    store = idx.store
    rows = [r for r in store.captions_of_source(captions.collection, captions.source) if r["image_path"]]
    image_ids = store.ok_ids_by_path(sorted({r["image_path"] for r in rows}))
    usable = [r for r in rows if r["image_path"] in image_ids]
    if not usable:
        raise BadInput(f"no image named by {dataset} could be indexed ({report.errors} errors)")
    gallery = sorted(set(image_ids.values()))
    column = {image_id: n for n, image_id in enumerate(gallery)}
    truth = np.array([column[image_ids[r["image_path"]]] for r in usable])
    image_vectors = store.vectors_of(gallery)
    caption_vectors = store.vectors_of([r["id"] for r in usable], captions=True)
    t2i, i2t = _ranks(caption_vectors, image_vectors, truth)
    per_image = np.bincount(truth, minlength=len(gallery))
    return EvalReport(
        dataset=os.path.abspath(os.fspath(dataset)), collection=captions.collection,
        model=f"{idx.model_spec.name} / {idx.model_spec.pretrained}", images=len(gallery), captions=len(usable),
        text_to_image=_direction(t2i, {f"R@{k}": min(k, len(gallery)) / len(gallery) for k in KS}
                                 | {"mean_rank": (len(gallery) + 1) / 2}),
        image_to_text=_direction(i2t[per_image > 0], _chance_image_to_text(per_image[per_image > 0], len(usable))),
        unusable=len(parsed.rows) - len(usable) - captions.duplicates,
        seconds=time.perf_counter() - started,
        notes=[f"{report.errors} images could not be indexed"] if report.errors else [],
    )


def _ranks(captions: np.ndarray, images: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based rank of each caption's image among all images, and of each image's best caption among all captions
    (ties count against the model: an answer shares its rank with everything scoring the same)."""
    # True scores are read from the same product they are compared with, so rounding cannot make an answer beat itself.
    t2i = np.empty(len(captions), dtype=np.int64)
    for start in range(0, len(captions), CHUNK):
        block = captions[start:start + CHUNK] @ images.T  # captions x images
        own = block[np.arange(len(block)), truth[start:start + len(block)]]
        t2i[start:start + len(block)] = (block >= own[:, None]).sum(axis=1)
    caption_rank = np.empty(len(captions), dtype=np.int64)
    step = max(1, CHUNK // 8)
    for start in range(0, len(images), step):
        block = images[start:start + step] @ captions.T  # images x captions
        mine = np.nonzero((truth >= start) & (truth < start + len(block)))[0]
        rows = block[truth[mine] - start]
        own = rows[np.arange(len(mine)), mine]
        caption_rank[mine] = (rows >= own[:, None]).sum(axis=1)
    i2t = np.full(len(images), np.iinfo(np.int64).max)
    np.minimum.at(i2t, truth, caption_rank)
    return t2i, i2t


def _direction(ranks: np.ndarray, chance: dict[str, float]) -> Direction:
    return Direction(recall={f"R@{k}": round(float((ranks <= k).mean()), 4) for k in KS},
                     mean_rank=round(float(ranks.mean()), 2), median_rank=float(np.median(ranks)),
                     chance={key: round(value, 4) for key, value in chance.items()})


def _chance_image_to_text(per_image: np.ndarray, total: int) -> dict[str, float]:
    """An image with m of the M captions: a random ranking puts one within the top K with probability
    1 - C(M-m, K) / C(M, K); its best caption's expected rank is (M+1)/(m+1)."""
    chance = {}
    for k in KS:
        misses = [math.exp(_log_comb(total - m, k) - _log_comb(total, k)) if total - m >= k else 0.0 for m in per_image]
        chance[f"R@{k}"] = float(1 - np.mean(misses))
    chance["mean_rank"] = float(np.mean([(total + 1) / (m + 1) for m in per_image]))
    return chance


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
