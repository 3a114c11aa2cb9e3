"""Image files in, model-ready pixels out: scanning, fast decoding and open_clip-identical preprocessing.

This module runs inside spawn-started decode workers, so it imports only numpy, Pillow and pillow_heif (never torch
or open_clip): a worker must start in a fraction of a second. Every per-file problem becomes a `MediaError` whose
message is a short, one-line reason meant to be stored next to the file's row.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import signal
import stat
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from . import jpeg_scans

try:  # HEIC/HEIF (and AVIF on old pillow_heif versions); decoding still works for every other format without it
    import pillow_heif
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    pillow_heif = None

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "DRAFT_FACTOR",
    "MediaError",
    "PreprocessSpec",
    "Decoded",
    "iter_images",
    "fingerprint",
    "open_image",
    "to_rgb",
    "preprocess_pixels",
    "to_model_input",
    "load",
    "decode",
    "decode_many",
    "init_worker",
    "os_reason",
    "stat_or_none",
]

MAX_PIXELS = 200_000_000
"""Largest image (width x height, after JPEG draft scaling) we agree to decode; a bigger one is refused before any pixel
is allocated. Other formats are also bound by Pillow's own limit (Image.MAX_IMAGE_PIXELS, about 89 MP by default), whose
DecompressionBombWarning counts as an error here; JPEG is exempt from Pillow's limit because draft decoding makes a huge
JPEG cheap, so for JPEG this constant alone decides."""

DRAFT_FACTOR = 1.5
"""JPEG draft (DCT-domain 1/2, 1/4, 1/8) decoding keeps both sides at least this many times the model's input size.
Measured on the 146 shared photos against a full decode, with the resize keeping the full image's geometry
(preprocess_pixels' `full_size` and `box`; random-init ViT-B-32 and ViT-B-16, worst photo):

| factor | cosine | PSNR | decoding per photo |
| --- | --- | --- | --- |
| 2 | 0.99991, 0.99994 | 44.3 dB | 14.1 ms |
| 1.5 | 0.99990, 0.99989 | 39.4 dB | 12.7 ms |
| 1.25 | 0.99979, 0.99986 | 37.8 dB | 11.7 ms |
| 1 | 0.99851 | 29.0 dB | 11.1 ms |

1.5 moves embeddings by about what bf16 inference does (cosine 0.9999), and `clipsearch index` ran 2.6% faster than at
2 (median 31.0 against 30.2 images/s, 8 interleaved rounds). Before the geometry was the full image's, factor 2's
worst was 0.99891 and 28.8 dB."""

YIELDING_NICENESS = 19  # decode workers beside a CPU model: see yield_cpu_to_the_model
_FINGERPRINT_CHUNK = 64 * 1024
_MAX_RESIZED_PIXELS = 4_000_000  # above this the 'shortest' resize only computes the cropped region
_MAX_REASON = 200


def _avif_available() -> bool:
    """Whether some installed decoder can really open AVIF (Pillow >= 11.2 ships one; old pillow_heif had another)."""
    try:
        if features.check_module("avif"):
            from PIL import _avif  # noqa: PLC0415 - private, but the only way to ask whether a decoder is built in

            if any(_avif.decoder_codec_available(c) for c in ("dav1d", "aom", "libgav1", "avm")):
                return True
    except Exception:  # noqa: BLE001 - a missing or odd plugin only means "no AVIF"
        pass
    if pillow_heif is not None and hasattr(pillow_heif, "register_avif_opener"):
        try:
            return bool(pillow_heif.libheif_info().get("AVIF"))
        except Exception:  # noqa: BLE001
            return False
    return False


def _register_openers() -> bool:
    """Teach Pillow HEIC/HEIF (and AVIF where pillow_heif provides it); returns whether AVIF can be decoded."""
    if pillow_heif is not None:
        pillow_heif.register_heif_opener()
    avif = _avif_available()
    if avif and not features.check_module("avif") and pillow_heif is not None:
        pillow_heif.register_avif_opener()
    return avif


_AVIF = _register_openers()

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
    | ({".avif"} if _AVIF else set())
)

# Folders that NAS boxes, operating systems and archivers fill with thumbnails, trash or metadata (compared lower-case).
_SKIP_DIRS = frozenset(
    name.lower()
    for name in (
        "@eaDir", "#recycle", "#snapshot", "@Recycle", "@Recently-Snapshot", "@tmp", "$RECYCLE.BIN", "RECYCLER",
        "System Volume Information", "lost+found", "__MACOSX", ".Trashes", ".Trash", ".thumbnails", ".AppleDouble",
        ".Spotlight-V100", ".fseventsd", ".TemporaryItems", ".@__thumb",
    )
)

_EXIF_IFD = 0x8769
_TAG_DATETIME_ORIGINAL = 36867
_TAG_DATETIME_DIGITIZED = 36868
_TAG_DATETIME = 306
_TAG_ORIENTATION = 274
_DATE_RE = re.compile(r"(\d{4})[:\-/.](\d{1,2})[:\-/.](\d{1,2})[ T_]+(\d{1,2})[:.](\d{1,2})(?:[:.](\d{1,2}))?")
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class MediaError(Exception):
    """A file that cannot become pixels; str(e) is a short one-line reason stored in the index."""


# --------------------------------------------------------------------------------------------------------------- scan


def _skip_name(name: str) -> bool:
    """Hidden entries (.Trash-1000, ._foo.jpg ...) and system/junk folders are never part of a photo collection."""
    return name[:1] == "." or name.lower() in _SKIP_DIRS


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def os_reason(exc: OSError) -> str:
    """One line for an OSError, without the path (the caller already knows it); also the indexer's wording."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, NotADirectoryError):
        return "not a directory"
    return _one_line(exc.strerror or str(exc) or type(exc).__name__)


def iter_images(root: str | os.PathLike, on_error: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Absolute paths (not resolved through links) of the image files under root, in code-point sorted order.

    Children are visited sorted by name, directories keyed as ``name + "/"``, which makes the depth-first walk produce
    exactly ``sorted()`` order of the full path strings while still streaming. A directory reached a second time
    (symlink loops, or two links to one folder) is skipped by (st_dev, st_ino), so each one is listed once, under the
    first path in that order. Unreadable directories, the root included, go to ``on_error(path, reason)`` and are
    skipped. A root that does not exist raises FileNotFoundError: it must never look like an empty folder.
    """
    top = os.path.abspath(os.fspath(root))
    try:
        st = os.stat(top)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if on_error is not None:
            on_error(top, os_reason(exc))
        return
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode) and _is_image_name(top):
            yield top
        return
    visited: set[tuple[int, int]] = set()
    stack: list[Iterator[tuple[str, str, bool]]] = [iter([(top + "/", top, True)])]
    while stack:
        try:
            _key, path, is_dir = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if not is_dir:
            yield path
            continue
        try:
            dst = os.stat(path)
            ident = (dst.st_dev, dst.st_ino)
            if ident in visited:
                continue
            visited.add(ident)
            with os.scandir(path) as it:
                children = _children(it, on_error)
        except OSError as exc:
            if on_error is not None:
                on_error(path, os_reason(exc))
            continue
        stack.append(iter(children))


def _children(
    it: Iterator[os.DirEntry[str]], on_error: Callable[[str, str], None] | None
) -> list[tuple[str, str, bool]]:
    """(sort key, path, is_dir) for the wanted entries of one directory listing."""
    out: list[tuple[str, str, bool]] = []
    for entry in it:
        name = entry.name
        if _skip_name(name):
            continue
        try:
            if entry.is_dir():  # follows links; a dangling link is neither a directory nor a file
                out.append((name + "/", entry.path, True))
            elif _is_image_name(name) and entry.is_file():  # regular files only, after following links
                out.append((name, entry.path, False))
        except OSError as exc:
            if on_error is not None:
                on_error(entry.path, os_reason(exc))
    out.sort()
    return out


# -------------------------------------------------------------------------------------------------------- fingerprint


def fingerprint(path: str | os.PathLike) -> str:
    """blake2b-128 of the size plus the first, middle and last 64 KiB (whole file up to 192 KiB), as hex.

    Recognises a moved, renamed or copied file without decoding it, in three reads whatever the file size. Stored in
    indexes, so the recipe is fixed: size as 8-byte little-endian, then the bytes at 0, (size - 64 KiB) // 2 and
    size - 64 KiB.
    """
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(struct.pack("<Q", size))
        if size <= 3 * _FINGERPRINT_CHUNK:
            h.update(f.read())
        else:
            for offset in (0, (size - _FINGERPRINT_CHUNK) // 2, size - _FINGERPRINT_CHUNK):
                f.seek(offset)
                h.update(f.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------------- preprocess


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model wants: open_clip's eval-transform settings, without needing torch to apply them."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # 'bicubic' | 'bilinear' | 'nearest'
    resize_mode: str = "shortest"  # 'shortest' | 'longest' | 'squash'
    fill_color: int = 0

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"bad size {self.size!r}")

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessSpec:
        """From ``model.visual.preprocess_cfg``; size may be an int, and open_clip's 'random' interpolation is
        bicubic at eval time."""
        size = cfg.get("size", 224)
        if isinstance(size, (int, float)):
            size = (int(size), int(size))
        elif len(size) == 1:
            size = (int(size[0]), int(size[0]))
        mean = cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073)
        std = cfg.get("std") or (0.26862954, 0.26130258, 0.27577711)
        if isinstance(mean, (int, float)):
            mean = (mean,) * 3
        if isinstance(std, (int, float)):
            std = (std,) * 3
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation == "random":
            interpolation = "bicubic"
        return cls(
            size=(int(size[-2]), int(size[-1])),
            mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in std),  # type: ignore[arg-type]
            interpolation=str(interpolation),
            resize_mode=str(cfg.get("resize_mode") or "shortest"),
            fill_color=int(cfg.get("fill_color") or 0),
        )

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> PreprocessSpec:
        """From `dataclasses.asdict` of one, after a JSON round trip (the index's recorded model identity)."""
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})


def preprocess_pixels(img: Image.Image, spec: PreprocessSpec, full_size: tuple[int, int] | None = None,
                      box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) exactly as open_clip's eval transform would crop and resize ``img`` (an RGB image).

    The size arithmetic is torchvision's (Resize int-truncates the long side, ResizeKeepRatio rounds, CenterCrop uses
    Python's round), and so are the PIL calls, so the result is bit-identical. Two cases resize just the kept region
    with PIL's ``box`` (same scale and taps, but Pillow may run its two passes in the other order: a few levels of
    difference): an intermediate image that would be huge (a 1:100 panorama: bounded memory), and an ``img`` decoded
    at a reduced scale, which is not bit-identical anyway (the shared photos: 0.37 ms less per photo, PSNR against a
    full decode unchanged within 0.04 dB, at most 3 levels from resizing it all).

    ``full_size`` and ``box`` describe an ``img`` decoded at a reduced scale (JPEG draft mode, see `_decode_file`): the
    (width, height) of the full picture, and the region of ``img`` that holds it. Every size and crop is then the full
    picture's, and ``img`` is resized over exactly that region. libjpeg rounds a scaled side up (1181 rows at 1/2 give
    591, half a row of it padding), and sizes taken from the scaled image put the crop up to a pixel off and stretch
    it by that rounding: 28.8 dB against a full decode on one of the shared photos, 53.6 dB with the full geometry.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    th, tw = spec.size
    w, h = full_size if full_size is not None and box is not None else img.size
    resample = _RESAMPLE[spec.interpolation]

    def fit(size: tuple[int, int]) -> Image.Image:
        """The whole image at ``size``, as if resized from its full resolution."""
        if box is None:
            return img if size == img.size else img.resize(size, resample)
        return img.resize(size, resample, box=box)

    if spec.resize_mode == "squash":
        return np.asarray(fit((tw, th)), dtype=np.uint8).copy()
    if spec.resize_mode == "longest":
        ratio = max(h / th, w / tw)
        return _crop_or_pad(fit((round(w / ratio), round(h / ratio))), th, tw, spec.fill_color)
    # 'shortest'
    if th == tw:  # torchvision Resize(int): the short side becomes th, the long side int()-truncated
        if w <= h:
            nw, nh = th, int(th * h / w)
        else:
            nw, nh = int(th * w / h), th
    else:  # open_clip's ResizeKeepRatio(size) - always bicubic, whatever the configured interpolation
        ratio = min(h / th, w / tw)
        nh, nw = round(h / ratio), round(w / ratio)
        resample = Image.Resampling.BICUBIC
    if nh < th or nw < tw:  # cannot happen with the arithmetic above, but keep torchvision's pad-then-crop semantics
        return _crop_or_pad(fit((nw, nh)), th, tw, 0)
    top = int(round((nh - th) / 2.0))
    left = int(round((nw - tw) / 2.0))
    if box is None and nw * nh <= _MAX_RESIZED_PIXELS:  # exactly torchvision: resize everything, then crop
        out = fit((nw, nh)).crop((left, top, left + tw, top + th))
    else:  # drafted, or an extreme panorama: resize only the kept region (same scale and geometry)
        x0, y0, x1, y1 = box or (0, 0, *img.size)
        sx, sy = (x1 - x0) / nw, (y1 - y0) / nh
        out = img.resize((tw, th), resample,
                         box=(x0 + left * sx, y0 + top * sy, x0 + (left + tw) * sx, y0 + (top + th) * sy))
    return np.asarray(out, dtype=np.uint8).copy()


def _upright_box(box: tuple[float, float, float, float], size: tuple[int, int],
                 orientation: int) -> tuple[float, float, float, float]:
    """Where ``box`` of a stored image of ``size`` lands once exif_transpose turns the image upright: a turn or a flip
    moves the padding of a draft-decoded side from the end of the stored image to the start of the upright one."""
    x0, y0, x1, y1 = box
    w, h = size
    return {
        2: (w - x1, y0, w - x0, y1),  # FLIP_LEFT_RIGHT
        3: (w - x1, h - y1, w - x0, h - y0),  # ROTATE_180
        4: (x0, h - y1, x1, h - y0),  # FLIP_TOP_BOTTOM
        5: (y0, x0, y1, x1),  # TRANSPOSE
        6: (h - y1, x0, h - y0, x1),  # ROTATE_270
        7: (h - y1, w - x1, h - y0, w - x0),  # TRANSVERSE
        8: (y0, w - x1, y1, w - x0),  # ROTATE_90
    }.get(orientation, box)


def _crop_or_pad(img: Image.Image, th: int, tw: int, fill: int) -> np.ndarray:
    """open_clip's center_crop_or_pad: pad (left/top get the smaller half) with ``fill``, then centre-crop."""
    w, h = img.size
    if tw > w or th > h:
        canvas = Image.new("RGB", (max(w, tw), max(h, th)), (fill, fill, fill))
        canvas.paste(img, ((tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0))
        img = canvas
        w, h = img.size
    if (w, h) != (tw, th):
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        img = img.crop((left, top, left + tw, top + th))
    return np.asarray(img, dtype=np.uint8).copy()


def to_model_input(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, bit-for-bit what ToTensor + Normalize compute.

    An 8-bit channel has only 256 values, so each is looked up in a table computed with ToTensor's and Normalize's
    own float32 steps: one pass over the batch instead of five (9 against 22 ms for 32 images at 224)."""
    if batch.dtype != np.uint8:
        raise TypeError(f"to_model_input wants uint8 pixels, not {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[None]
    table = _normalised_levels(tuple(spec.mean), tuple(spec.std))
    n, h, w, channels = batch.shape
    out = np.empty((n, channels, h, w), np.float32)
    for c in range(channels):
        out[:, c] = table[c][batch[..., c]]
    return out


@functools.lru_cache(maxsize=8)
def _normalised_levels(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: (level / 255 - mean) / std per channel, in float32 step by step as torchvision does."""
    levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255)
    levels = levels - np.asarray(mean, dtype=np.float32)[:, None]
    levels /= np.asarray(std, dtype=np.float32)[:, None]
    levels.flags.writeable = False
    return levels


# ------------------------------------------------------------------------------------------------------------ decode


@dataclass
class Decoded:
    """One decoded file: displayed size, capture time, format, and the model's pixels (not yet normalised)."""

    width: int
    height: int
    taken: str | None
    format: str
    pixels: np.ndarray


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _reason(exc: BaseException, fmt: str | None) -> str:
    """A short human reason for a decode failure, without the file path Pillow likes to embed."""
    kind = fmt or "image"
    msg = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        m = re.search(r"\((\d+) pixels\)", msg)
        return f"too large: {m.group(1)} pixels" if m else "too large (decompression bomb)"
    if isinstance(exc, MemoryError):
        return f"out of memory decoding {kind}"
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return os_reason(exc)
    if "image file is truncated" in msg:  # drop Pillow's "(N bytes not processed)": noise to a person
        return f"truncated {kind} (image file is truncated)"
    if "truncated" in msg.lower():
        return _one_line(f"truncated {kind} ({msg})")
    if "broken data stream" in msg or "decoder error" in msg or "cannot load" in msg:
        return _one_line(f"corrupt {kind} ({msg})")
    if isinstance(exc, (SyntaxError, struct.error, EOFError, zlib.error)):
        return _one_line(f"corrupt {kind} ({type(exc).__name__}: {msg})" if msg else f"corrupt {kind}")
    return _one_line(f"cannot decode {kind} ({type(exc).__name__}: {msg})" if msg else f"cannot decode {kind}")


_JPEG_MAGIC = b"\xff\xd8\xff"
# What Pillow and its plugins are known to raise for garbage input (UnidentifiedImageError is an OSError; plugins also
# throw TypeError, IndexError, struct.error ... on malformed headers). decode() turns anything else into a reason too.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError, struct.error, EOFError,
    zlib.error, MemoryError, RuntimeError, AssertionError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)


def _open_unloaded(f: Any, head: bytes) -> Image.Image:
    """Image.open (header only, no pixels yet) with Pillow's bomb warning as an error, except for JPEG: a JPEG over
    Pillow's limit has its header read directly, since draft decoding can bring even a huge one down to a few
    megapixels; MAX_PIXELS is checked once draft has had its say."""
    try:
        return Image.open(f, formats=_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        if not head.startswith(_JPEG_MAGIC):
            raise
    from PIL import JpegImagePlugin  # noqa: PLC0415

    f.seek(0)
    return JpegImagePlugin.jpeg_factory(f, getattr(f, "name", None))


_FORMATS: tuple[str, ...] | None = None


def _formats() -> tuple[str, ...]:
    """Every format Pillow can read except those that run external programs on the file (EPS -> Ghostscript)."""
    global _FORMATS
    if _FORMATS is None:
        Image.init()
        _FORMATS = tuple(f for f in Image.ID if f not in ("EPS",))
    return _FORMATS


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_TAG_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF must not make a readable image fail
        return 1
    return value if 1 <= value <= 8 else 1


def _taken(img: Image.Image) -> str | None:
    """EXIF capture time as ISO 'YYYY-MM-DDTHH:MM:SS': DateTimeOriginal, else DateTimeDigitized, else DateTime."""
    try:
        exif = img.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
        candidates = (sub.get(_TAG_DATETIME_ORIGINAL), sub.get(_TAG_DATETIME_DIGITIZED), exif.get(_TAG_DATETIME))
    except Exception:  # noqa: BLE001 - damaged EXIF simply means "no date"
        return None
    for value in candidates:
        parsed = _parse_exif_date(value)
        if parsed is not None:
            return parsed
    return None


def _parse_exif_date(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    m = _DATE_RE.search(value.strip("\x00 "))
    if m is None:
        return None
    year, month, day, hour, minute = (int(g) for g in m.groups()[:5])
    second = int(m.group(6) or 0)
    try:
        dt = datetime(year, month, day, hour, minute, second)
    except ValueError:  # '0000:00:00 00:00:00', month 13, ...
        return None
    if dt.year < 1826:  # before the first photograph: a placeholder, not a date
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of any Pillow mode, the way a person would look at it.

    Alpha (RGBA, LA, PA, palette or colour-key transparency) is composited onto white; 16-bit data keeps its value range
    (I;16 >> 8, so mid-grey stays mid-grey; 32-bit 'I' likewise when its values fit 16 bits, 'F' as 0..1 or 0..255,
    min/max stretched otherwise); CMYK/YCbCr/L/1 go through Pillow's converters (Pillow already undoes the inverted
    Adobe CMYK convention when it reads JPEG).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), mode), "L")
        return img.convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied: over white is colour + (255 - alpha)
        arr = np.asarray(img).astype(np.int16)
        color, alpha = arr[..., :-1], arr[..., -1:]
        out = np.clip(color + (255 - alpha), 0, 255).astype(np.uint8)
        if out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        return Image.fromarray(out, "RGB")
    if img.has_transparency_data:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency expressed in bytes ..."
            rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale one high-bit-depth channel to 8 bits by its nominal range (16-bit: >> 8), by min/max only when unknown."""
    if mode.startswith("I;16"):
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:  # 16-bit data Pillow widened to 32 bits (some PNG/TIFF paths)
            return (arr >> 8).astype(np.uint8)
        return _stretch(arr.astype(np.float64), lo, hi)
    data = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # 'F'
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1.0:
        return np.round(data * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.round(data).astype(np.uint8)
    return _stretch(data, lo, hi)


def _stretch(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.round((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


class _Opened(NamedTuple):
    """A decoded file before preprocessing: the upright RGB image, Pillow's format name, the capture time, the
    displayed full-resolution (width, height) whatever scale it was decoded at, and the region of the image that holds
    the full picture when draft decoding scaled it (see preprocess_pixels), else None."""

    image: Image.Image
    format: str
    taken: str | None
    full_size: tuple[int, int]
    box: tuple[float, float, float, float] | None


def _decode_file(path: str | os.PathLike, min_size: tuple[int, int] | None) -> _Opened:
    """The file decoded, a JPEG at a reduced scale when ``min_size`` allows it; raises MediaError."""
    fmt: str | None = None
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise MediaError("is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise MediaError("not a regular file")
        if st.st_size == 0:
            raise MediaError("0-byte file")
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's chatter about odd files is not our output
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_unloaded(f, f.read(16))
            fmt = img.format or "image"
            full_w, full_h = img.size
            box = None  # Pillow's draft says which region of the scaled image holds the full picture
            if min_size is not None and fmt in ("JPEG", "MPO"):
                mh, mw = min_size
                if _orientation(img) >= 5:  # draft scales the stored image; these orientations swap the sides
                    mh, mw = mw, mh
                request = (math.ceil(DRAFT_FACTOR * mw), math.ceil(DRAFT_FACTOR * mh))
                drafted = img.draft("RGB", request)
                if drafted is not None and img.size != (full_w, full_h):
                    box = drafted[1]
                    img = _without_unread_scans(img, f, (full_w, full_h), request)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise MediaError(f"too large: {w}x{h} pixels")
            img.load()
            taken = _taken(img)
            orientation = _orientation(img)
            if orientation >= 5:
                full_w, full_h = full_h, full_w
            if box is not None:
                box = _upright_box(box, img.size, orientation)
            ImageOps.exif_transpose(img, in_place=True)
            return _Opened(to_rgb(img), fmt, taken, (full_w, full_h), box)
    except MediaError:
        raise
    except _DECODE_ERRORS as exc:
        raise MediaError(_reason(exc, fmt)) from exc


def _without_unread_scans(img: Image.Image, f: Any, full_size: tuple[int, int],
                          request: tuple[int, int]) -> Image.Image:
    """``img`` (a JPEG, drafted to ``request``), or when that is a progressive JPEG drafted to 1/8 scale, the same
    picture from a copy of the file without the AC scans that scale never reads (see jpeg_scans): bit-identical, and
    the shared photos' four progressive ones of 12-24 MP decode in 17-63 ms instead of 55-132."""
    eighth = (-(-full_size[0] // 8), -(-full_size[1] // 8))
    if not img.info.get("progressive") or img.size != eighth:
        return img
    f.seek(0)
    lean = jpeg_scans.dc_only(f.read())
    if lean is None:
        return img
    from PIL import JpegImagePlugin  # noqa: PLC0415

    out = JpegImagePlugin.JpegImageFile(io.BytesIO(lean))
    out.draft("RGB", request)
    return out


def open_image(path: str | os.PathLike, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Fully decoded RGB image, EXIF orientation applied, first frame of an animation, alpha composited on white.

    ``min_size`` is the (height, width) the caller will downscale to: JPEGs are then decoded in draft mode at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= DRAFT_FACTOR x min_size, which is several times faster
    and can bring a huge JPEG under MAX_PIXELS. Anything that cannot be decoded raises MediaError.
    """
    return _decode_file(path, min_size).image


def load(path: str | os.PathLike, spec: PreprocessSpec) -> Decoded:
    """Decode one file into the model's pixels plus the metadata the index stores. Raises MediaError.

    width/height are the displayed full-resolution size, whatever scale draft decoding used.
    """
    opened = _decode_file(path, spec.size)
    try:
        pixels = preprocess_pixels(opened.image, spec, full_size=opened.full_size, box=opened.box)
    except _DECODE_ERRORS as exc:
        raise MediaError(_reason(exc, opened.format)) from exc
    width, height = opened.full_size
    return Decoded(width=width, height=height, taken=opened.taken, format=opened.format, pixels=pixels)


def decode(path: str, spec: PreprocessSpec) -> tuple[str, Decoded | None, str | None]:
    """Worker entry point: (path, decoded, None) or (path, None, reason); never raises for a bad file."""
    try:
        return path, load(path, spec), None
    except MediaError as exc:
        return path, None, str(exc) or "cannot decode"
    except Exception as exc:  # noqa: BLE001 - a worker must report, not die, whatever Pillow does with garbage
        return path, None, _reason(exc, None)


def decode_many(paths: list[str], spec: PreprocessSpec,
                yield_cpu: bool = False) -> list[tuple[str, Decoded | None, str | None]]:
    """Worker entry point for a chunk of files: one round trip between processes for several images. With
    `yield_cpu`, this process drops to the lowest priority first (see yield_cpu_to_the_model)."""
    if yield_cpu:
        yield_cpu_to_the_model()
    return [decode(path, spec) for path in paths]


def yield_cpu_to_the_model() -> None:
    """Run this process at the lowest priority (nice 19) from now on, for a decode worker beside a model on the CPU.

    At the lowest priority the workers decode chiefly while the model is between batches, instead of pausing its
    streams: on an otherwise idle machine indexing ran 3-5% faster (29.0 against 27.65 images/s, medians of 6
    interleaved rounds). But such a worker weighs 1/68 of a normal process: while other programs keep the cores busy it
    gets almost nothing, and the model waits. The indexer watches for that (indexer.STARVED_AFTER) and replaces lowered
    workers with new ones at its own priority: an unprivileged process cannot raise its priority again. Workers also
    yield to the model's load (one core for 2-3 s), whatever its device. Beside a GPU model, where decoding is the
    bottleneck, they are otherwise never lowered; those lowered for the load lose nothing on idle cores."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < YIELDING_NICENESS:
            os.setpriority(os.PRIO_PROCESS, 0, YIELDING_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - Windows has no niceness; a sandbox may refuse
        pass


def init_worker(parent: int) -> None:
    """Decode-worker initializer (here so a worker imports nothing heavier than this module).

    Ctrl-C is the parent's to handle (it commits nothing half-done); workers just stop when it shuts the pool. And a
    worker must not outlive a parent that was killed (SIGKILL, OOM killer): it would wait forever on its task queue,
    whose write end it holds itself, so a watchdog thread ends it once its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def stat_or_none(path: str | os.PathLike) -> os.stat_result | None:
    """The file's stat, or None when it vanished or cannot be reached (callers treat both as "not there")."""
    try:
        return os.stat(path)
    except OSError:
        return None
