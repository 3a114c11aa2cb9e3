"""Where indexes live: a directory path, or a bare name resolved under the index home (see DESIGN.md)."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_INDEX = "default"


def index_home() -> Path:
    """`$CLIPSEARCH_HOME/indexes`, else `indexes/` under the platform's user data dir."""
    root = os.environ.get("CLIPSEARCH_HOME")
    if not root:
        import platformdirs

        root = platformdirs.user_data_dir("clipsearch", appauthor=False)
    return Path(root).expanduser() / "indexes"


def resolve_index(name_or_path: str | os.PathLike | None) -> Path:
    """A bare name (no path separator, not starting with '.' or '~') is an index under the home; anything else is a path."""
    if name_or_path is None or str(name_or_path) == "":
        name_or_path = DEFAULT_INDEX
    text = os.fspath(name_or_path)
    is_bare_name = os.sep not in text and "/" not in text and not text.startswith((".", "~"))
    if is_bare_name:
        return index_home() / text
    return Path(text).expanduser().absolute()
