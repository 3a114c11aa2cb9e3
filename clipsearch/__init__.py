"""clipsearch: local image-text semantic search with CLIP (open_clip), FAISS and SQLite.

    import clipsearch
    with clipsearch.open("~/my-index") as idx:
        idx.add_folder("~/Photos")
        for hit in idx.search("a red bicycle", k=10):
            print(hit.score, hit.path)
"""
from .errors import (BadInput, ClipsearchError, IndexBusy, IndexMissing, ModelError, ModelMismatch, NotAnIndex,
                     VerifyFailed)
from .index import Index, VerifyReport, open
from .indexer import IndexReport, Progress
from .query import Hit

__version__ = "0.1.0"
__all__ = [
    "open", "Index", "Hit", "IndexReport", "Progress", "VerifyReport", "ClipsearchError", "BadInput", "ModelError",
    "ModelMismatch", "NotAnIndex", "IndexBusy", "IndexMissing", "VerifyFailed", "__version__",
]
