"""The query language: weighted texts and images, added and subtracted.

    kids on a beach                     one text
    2*dog + beach.jpg - "cat"           weights, an image file, a negative part
    #42 - 0.5*"blurry"                  an indexed image by id

A lone `+` or `-` (spaces around it) joins parts; `W*` in front of a part weighs it (a positive number); an unquoted part
ending in an image extension is an image file, `#N` the indexed image with id N; quotes make anything plain text
(`"beach.jpg"`, `"2*3"`, `"rock - paper"`). Anything that could be read two ways is refused with a message saying how
to write it: a weight that is not a positive number, an operator with no part after it, text glued to a closing quote.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .errors import BadInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif")
"""What makes an unquoted part an image file. Fixed, not media's list: the language must not change with the codecs
installed, and a query must not import Pillow (50 ms of a cold CLI query)."""

_WEIGHT = re.compile(r"^\s*([^\s*\"']*)\s*\*\s*")
_NUMBER = re.compile(r"^(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_IMAGE_ID = re.compile(r"^#(\d+)$")


@dataclass(frozen=True)
class Part:
    """One part of a query. `weight` carries the sign: a negative part pushes results away from it."""

    kind: str            # "text" or "image"
    value: str | int     # the text, an image path, or the id of an indexed image
    weight: float = 1.0


@dataclass(frozen=True)
class Query:
    parts: tuple[Part, ...]

    @classmethod
    def parse(cls, expression: str) -> "Query":
        return cls(tuple(parse_parts(expression)))

    @classmethod
    def build(cls, expression: "str | Query" = "", image: Iterable[str | int] = (),
              not_: Iterable[str | int] = ()) -> "Query":
        """The CLI and library entry: an expression plus `--image` parts (added) and `--not` parts (subtracted)."""
        if isinstance(expression, Query):
            parts = list(expression.parts)
        else:
            parts = parse_parts(expression) if expression and expression.strip() else []
        parts += [_image_part(item, 1.0) for item in image]
        for item in not_:
            negative = parse_parts(item) if isinstance(item, str) else [_image_part(item, 1.0)]
            if len(negative) != 1 or negative[0].weight < 0:
                raise BadInput(f"--not takes one part (a text or an image), got {item!r}")
            only = negative[0]
            parts.append(Part(only.kind, only.value, -only.weight))
        if not parts:
            raise BadInput("the query is empty: give a text, an --image, or both")
        if not any(part.weight > 0 for part in parts):
            raise BadInput("a query needs at least one part to look for, not only parts to avoid")
        return cls(tuple(parts))

    @property
    def texts(self) -> list[str]:
        return [str(part.value) for part in self.parts if part.kind == "text"]


def _image_part(item: str | int, weight: float) -> Part:
    if isinstance(item, int) and not isinstance(item, bool):
        return Part("image", item, weight)
    if not isinstance(item, str) or not item.strip():
        raise BadInput(f"an image must be a file path or an indexed image id, got {item!r}")
    match = _IMAGE_ID.match(item.strip())
    return Part("image", int(match.group(1)) if match else item, weight)


def parse_parts(expression: str) -> list[Part]:
    """Split on lone '+'/'-' words (outside quotes), then read each part's weight and kind."""
    if not isinstance(expression, str):
        raise BadInput(f"the query must be text, got {type(expression).__name__}")
    pieces: list[tuple[int, str]] = []  # (sign, raw part)
    sign, current, quote, i = 1, [], None, 0  # a quote only opens where it also closes: "the '90s" is text
    pending_operator: str | None = None
    text = expression
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'" and (not current or current[-1].isspace() or current[-1] == "*") and ch in text[i + 1:]:
            quote = ch
            current.append(ch)
        elif ch in "+-" and (i == 0 or text[i - 1].isspace()) and (i + 1 == len(text) or text[i + 1].isspace()):
            raw = "".join(current).strip()
            if raw:
                pieces.append((sign, raw))
            elif pending_operator is not None or pieces:
                raise BadInput(f"nothing between '{pending_operator or '+'}' and '{ch}' in the query {expression!r}")
            sign, current, pending_operator = (1 if ch == "+" else -1), [], ch
        else:
            current.append(ch)
        i += 1
    raw = "".join(current).strip()
    if raw:
        pieces.append((sign, raw))
    elif pending_operator is not None:
        raise BadInput(f"the query {expression!r} ends with '{pending_operator}': a part must follow it")
    if not pieces:
        raise BadInput("the query is empty")
    return [_part(raw, sign, expression) for sign, raw in pieces]


def _part(raw: str, sign: int, expression: str) -> Part:
    weight = 1.0
    match = _WEIGHT.match(raw)
    if match:
        number = match.group(1)
        if not _NUMBER.match(number):
            raise BadInput(f"bad weight {number!r} in {raw!r}: a weight is a positive number, as in 2*dog "
                           f"(quote text that contains '*')")
        weight = float(number)
        if not 0 < weight < 1e6:
            raise BadInput(f"weight {number} in {raw!r} must be more than 0 (use '-' to push results away)")
        raw = raw[match.end():].strip()
        if not raw:
            raise BadInput(f"weight {number}* in the query {expression!r} weighs nothing: a part must follow it")
    if raw[0] in "\"'":
        if len(raw) < 2 or raw[-1] != raw[0]:
            raise BadInput(f"unexpected text after the quoted part in {raw!r}: put '+' or '-' between parts")
        inner = raw[1:-1].strip()
        if not inner:
            raise BadInput("a quoted part of the query is empty")
        return Part("text", inner, sign * weight)
    match_id = _IMAGE_ID.match(raw)
    if match_id:
        return Part("image", int(match_id.group(1)), sign * weight)
    if raw.lower().endswith(IMAGE_SUFFIXES):
        return Part("image", raw, sign * weight)
    return Part("text", " ".join(raw.split()), sign * weight)
