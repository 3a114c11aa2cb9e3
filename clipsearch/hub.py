"""Whether a pretrained tag's weights can be had before open_clip goes for them.

open_clip downloads a tag's weights through huggingface_hub, which, when the hub cannot be reached and the file is
not cached, retries each candidate file with backoff: the default model failed only after about 50 s and forty
lines of warnings. One look at the cache, then at most one request without retries, turns that into a one-line error
at once. Weights already cached are left to open_clip's usual lookup, which works offline.
"""
from __future__ import annotations

import os
from typing import Any

from .errors import first_line

PROBE_TIMEOUT = 10.0  # seconds: a network that does not answer in that time will not carry 150 MB-1 GB of weights
DEFAULT_FILE = "open_clip_pytorch_model.bin"  # what open_clip reads when a tag's hf_hub names only the repository


def hub_file(open_clip: Any, name: str, tag: str) -> tuple[str, str] | None:
    """The (repository, weights file) open_clip downloads ``name``/``tag`` from; None when it comes from elsewhere."""
    if name.startswith("hf-hub:"):  # the repository's own config and default weights; the tag is not used
        return name[len("hf-hub:"):], DEFAULT_FILE
    hub = (open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub", "")
    if not hub:
        return None
    repo, filename = os.path.split(hub)  # 'org/model/' names the repository only
    return repo, filename or DEFAULT_FILE


def _candidates(filename: str) -> list[str]:
    """The file and the safetensors twin open_clip tries first (its own rule: .bin/.pth -> .safetensors)."""
    if filename == DEFAULT_FILE:
        return ["open_clip_model.safetensors", filename]
    stem, ext = os.path.splitext(filename)
    return [stem + ".safetensors", filename] if ext in (".bin", ".pth") else [filename]


def unobtainable(open_clip: Any, name: str, tag: str) -> str | None:
    """Why ``tag``'s weights can be neither read from the cache nor downloaded now; None when they can, or may."""
    where = hub_file(open_clip, name, tag)
    if where is None:
        return None
    import huggingface_hub as hf

    repo, filename = where
    if any(isinstance(hf.try_to_load_from_cache(repo, candidate), str) for candidate in _candidates(filename)):
        return None
    try:
        hf.get_hf_file_metadata(hf.hf_hub_url(repo, filename), timeout=PROBE_TIMEOUT)
    except hf.errors.HfHubHTTPError:
        return None  # the hub answered (a gated repository, a moved file): open_clip's own attempt says what is wrong
    except hf.errors.OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE is set"
    except Exception as exc:  # no answer: name resolution, refused, timed out, SSL
        return first_line(exc)
    return None
