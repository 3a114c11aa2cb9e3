"""clipsearch: local image-text semantic search with CLIP (open_clip), FAISS and SQLite.

    import clipsearch
    with clipsearch.open("~/my-index") as idx:
        idx.add_folder("~/Photos")
        for hit in idx.search("a red bicycle", k=10):
            print(hit.score, hit.path)

Names are imported on first use (PEP 562), so `import clipsearch.media` in a decode worker stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "open": "index", "Index": "index", "VerifyReport": "index",
    "IndexReport": "indexer", "Progress": "indexer",
    "Hit": "query", "Filters": "query", "Query": "query_syntax", "Part": "query_syntax",
    "CaptionHit": "captions", "CaptionReport": "captions", "EvalReport": "evaluate",
    "ClipsearchError": "errors", "BadInput": "errors", "ModelError": "errors", "ModelMismatch": "errors",
    "NotAnIndex": "errors", "IndexBusy": "errors", "IndexMissing": "errors", "VerifyFailed": "errors",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .errors import (BadInput, ClipsearchError, IndexBusy, IndexMissing, ModelError, ModelMismatch, NotAnIndex,
                         VerifyFailed)
    from .index import Index, VerifyReport, open
    from .indexer import IndexReport, Progress
    from .captions import CaptionHit, CaptionReport
    from .evaluate import EvalReport
    from .query import Filters, Hit
    from .query_syntax import Part, Query


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
