"""open_clip's CLIP tokenizer (`SimpleTokenizer`) without torch, so a text query never has to import torch or open_clip.

It gives the same token ids as ``open_clip.get_tokenizer(name)`` for the standard CLIP models (byte-level BPE over
``bpe_simple_vocab_16e6.txt.gz``, ftfy + html cleaning, whitespace collapsed, lowercased; SOT ... EOT, truncated to the
context with EOT kept last). The vocabulary file is read from the installed open_clip package, found with
``importlib.util.find_spec`` (which locates the package without executing it). Models whose tokenizer is another one
(Hugging Face tokenizers, SigLIP, custom cleaning or masking) raise `UnsupportedTokenizer`: callers then use open_clip's.

Plain printable-ASCII text without '&' (nearly every typed query) is cleaned and split with the standard library alone,
because ftfy, html unescaping and the `regex` module change nothing there; ftfy and `regex` are imported only for other
text. The tests check both paths against open_clip on real captions and generated unicode strings.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "ClipTokenizer",
    "UnsupportedTokenizer",
    "bpe_vocab_path",
    "count_tokens",
    "for_model",
    "from_open_clip",
    "read_vocabulary_in_background",
]

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # open_clip keeps the first 48,894 merges of the file
_SPECIAL = ("<start_of_text>", "<end_of_text>")
_PROJECT_CONFIGS = Path(__file__).with_name("model_configs")

# The whole of open_clip's pattern, and the same pattern restricted to lowercase ASCII (where \p{L} is [a-z] and \p{N}
# is [0-9]) so that the standard library's `re` can run it.
_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ASCII_SPLIT = re.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
_PLAIN_ASCII = re.compile(r"[ -%'-~]*")  # printable ASCII except '&' (html entities need the full cleaning)


class UnsupportedTokenizer(ModelError):
    """The model's tokenizer is not open_clip's standard CLIP BPE tokenizer; use open_clip's own (the torch path)."""


def bpe_vocab_path() -> Path:
    """open_clip's BPE merges file, located without importing (executing) the open_clip package."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    raise ModelError(f"open_clip's {VOCAB_FILE} not found: is open-clip-torch installed?")


@functools.lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """open_clip's reversible map from UTF-8 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=4)
def _merge_ranks(path: str) -> dict[str, int]:
    """'first second' -> merge rank for the merges open_clip keeps (the first 48,894 lines after the header).

    Only the part of the file that holds them (a sixth of it) is decompressed. A merge line is the pair joined by one
    space, and no BPE symbol contains a space (the byte encoder maps 0x20 to 'Ġ'), so the line itself is the key.
    """
    raw = Path(path).read_bytes()
    stream = zlib.decompressobj(zlib.MAX_WBITS | 16)  # gzip framing
    chunks: list[bytes] = []
    newlines = pos = 0
    while newlines <= _N_MERGES + 1 and pos < len(raw):
        chunk = stream.decompress(raw[pos : pos + 65536])
        pos += 65536
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
    # A chunk may end inside a UTF-8 character; that tail lies past the lines kept, so 'replace' cannot touch them.
    lines = b"".join(chunks).decode("utf-8", "replace").split("\n", _N_MERGES + 1)[1 : _N_MERGES + 1]
    if len(lines) != _N_MERGES:
        raise ModelError(f"{path} holds {len(lines)} BPE merges, expected {_N_MERGES}")
    return dict(zip(lines, range(_N_MERGES)))


def read_vocabulary_in_background() -> threading.Thread:
    """Start reading the standard BPE merges in a daemon thread (join it before building a tokenizer, or the two
    would both read them). onnxruntime releases the GIL while it loads a session, so a cold query reads the merges
    (30-50 ms) in that time instead of after it. A failure is left to the tokenizer's own read to report."""
    def read() -> None:
        with contextlib.suppress(Exception):
            _merge_ranks(str(bpe_vocab_path()))

    thread = threading.Thread(target=read, name="clipsearch-vocabulary", daemon=True)
    thread.start()
    return thread


def _clean_ascii(text: str) -> str:
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=1)
def _full_cleaning() -> tuple[Any, Any]:
    """(clean, split) for arbitrary text: ftfy + html unescaping twice + whitespace + lowercase, and the `regex` split."""
    import html

    import ftfy
    import regex

    def clean(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).strip().lower()

    return clean, regex.compile(_PATTERN, regex.IGNORECASE).findall


class ClipTokenizer:
    """open_clip's `SimpleTokenizer` (clean='lower', truncation, the two special tokens) returning numpy int64."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: str | Path | None = None) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        self.context_length = int(context_length)
        self._ranks = _merge_ranks(str(bpe_path or bpe_vocab_path()))
        self._bytes = _byte_encoder()
        # open_clip's vocabulary is the 256 byte symbols, the same with '</w>', one entry per merge, then SOT and EOT.
        # Merged symbols are all distinct (the tests check this against open_clip's encoder), so merge r has id 512 + r
        # and no token -> id table is needed.
        singles = list(self._bytes.values())
        self._single_ids = {c: i for i, c in enumerate(singles)} | {c + "</w>": 256 + i for i, c in enumerate(singles)}
        self.sot_token_id = 512 + len(self._ranks)
        self.eot_token_id = self.sot_token_id + 1
        self.vocab_size = self.eot_token_id + 1
        self._cache: dict[str, list[int]] = {_SPECIAL[0]: [self.sot_token_id], _SPECIAL[1]: [self.eot_token_id]}

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already byte-encoded): merge the lowest-ranked adjacent pair until none is known."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ranks = self._ranks
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ids = [self._single_ids[s] for s in symbols]
        while len(symbols) > 1:
            best_rank, best = None, ""
            for pair in {f"{a} {b}" for a, b in zip(symbols, symbols[1:])}:
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best_rank is None:
                break
            first, second = best.split(" ")
            merged: list[str] = []
            merged_ids: list[int] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    merged_ids.append(512 + best_rank)
                    i += 2
                else:
                    merged.append(symbols[i])
                    merged_ids.append(ids[i])
                    i += 1
            symbols, ids = merged, merged_ids
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        if _PLAIN_ASCII.fullmatch(text):
            words = _ASCII_SPLIT.findall(_clean_ascii(text))
        else:
            clean, split = _full_cleaning()
            words = split(clean(text))
        byte_chars = self._bytes
        ids: list[int] = []
        for word in words:  # special tokens are ASCII, so they stay themselves and hit the cache, as in open_clip
            ids.extend(self._bpe("".join(byte_chars[b] for b in word.encode("utf-8"))))
        return ids

    def count_tokens(self, text: str) -> int:
        """How many BPE tokens the text has (SOT/EOT not counted): more than context_length - 2 means truncated."""
        return len(self.encode(text))

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(N, context_length) int64: SOT, tokens, EOT, zero padding; a text too long keeps its first tokens and EOT."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > length:
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            out[row, : len(tokens)] = tokens
        return out


@functools.lru_cache(maxsize=1)
def _default() -> ClipTokenizer:
    return ClipTokenizer()


def count_tokens(text: str) -> int:
    """BPE tokens of ``text`` under the standard CLIP vocabulary (SOT/EOT not counted)."""
    return _default().count_tokens(text)


def _model_config(name: str) -> dict[str, Any]:
    """A model's open_clip config, looked up the way open_clip does (project configs win) but without importing it."""
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser() / "open_clip_config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))["model_cfg"]
        except (OSError, ValueError, KeyError) as exc:
            raise UnsupportedTokenizer(f"cannot read the model config {path}: {exc}") from exc
    if name.startswith("hf-hub:"):
        raise UnsupportedTokenizer(f"{name}: an hf-hub model's tokenizer is defined by its hub config; use open_clip's")
    spec = importlib.util.find_spec("open_clip")
    installed = (spec.submodule_search_locations or []) if spec else []
    for folder in [_PROJECT_CONFIGS, *(Path(p) / "model_configs" for p in installed)]:
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    raise UnsupportedTokenizer(f"no open_clip config for model '{name}'")


def for_model(name: str, context_length: int | None = None) -> ClipTokenizer:
    """The tokenizer open_clip.get_tokenizer(name) would build, when that is the standard CLIP one.

    Raises UnsupportedTokenizer for Hugging Face / SigLIP tokenizers, non-default tokenizer settings and hf-hub models.
    """
    text_cfg = _model_config(name).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        raise UnsupportedTokenizer(f"{name} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}")
    if ":" not in name and "siglip" in name.lower():  # open_clip's own rule, for plain names only
        raise UnsupportedTokenizer(f"{name} uses a SigLIP tokenizer")
    kwargs = {k: v for k, v in text_cfg.get("tokenizer_kwargs", {}).items() if (k, v) != ("clean", "lower")}
    if kwargs:
        raise UnsupportedTokenizer(f"{name} sets tokenizer options {sorted(kwargs)} that only open_clip's tokenizer has")
    return ClipTokenizer(context_length or text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))


def from_open_clip(tokenizer: Any) -> ClipTokenizer:
    """The equivalent of a live open_clip tokenizer object, or UnsupportedTokenizer when it has none.

    Checks what makes the ids differ: the class, the cleaning, a reduction (masking) strategy, extra special tokens,
    and the vocabulary (size and special ids, which a custom BPE file would change).
    """
    kind = type(tokenizer).__name__
    clean = getattr(getattr(tokenizer, "clean_fn", None), "__name__", "")
    if kind != "SimpleTokenizer":
        raise UnsupportedTokenizer(f"the model's tokenizer is open_clip's {kind}, not the CLIP BPE tokenizer")
    if clean != "_clean_lower" or getattr(tokenizer, "reduction_fn", None) is not None:
        raise UnsupportedTokenizer("the model's tokenizer uses non-default cleaning or token reduction")
    ours = ClipTokenizer(tokenizer.context_length or DEFAULT_CONTEXT_LENGTH)
    theirs = (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id, len(tokenizer.bpe_ranks))
    if theirs != (ours.vocab_size, ours.sot_token_id, ours.eot_token_id, len(ours._ranks)):
        raise UnsupportedTokenizer("the model's tokenizer has another vocabulary than open_clip's default BPE file")
    return ours
