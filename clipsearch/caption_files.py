"""Reading caption collections from files: .txt, .csv/.tsv, .jsonl, COCO caption JSON (and plain JSON lists).

Pure parsing, no model and no database. A file that cannot be read at all raises `BadInput`; a row that cannot be used
(blank, bad encoding, malformed) becomes a `RowProblem` and the good rows are still returned, so an import can say
exactly what it skipped.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import BadInput, first_line

FORMATS = ("txt", "csv", "tsv", "jsonl", "json")
TEXT_FIELDS = ("caption", "captions", "text", "description", "sentence", "sentences")
IMAGE_FIELDS = ("image", "file_name", "filename", "file", "path", "image_path")
MAX_FILE_BYTES = 2 * 1024 ** 3  # a caption file larger than this is surely something else


@dataclass
class CaptionRow:
    text: str
    image: str | None  # absolute path of the described image, when the file says which
    where: str         # "line 3", "row 7", "annotation 12": how a person finds it in the file


@dataclass
class RowProblem:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class ParsedCaptions:
    format: str
    rows: list[CaptionRow] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)


def caption_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise BadInput(f"{path}: unknown caption file type '.{suffix}' (use .txt, .csv, .tsv, .jsonl or COCO .json)")


def read_captions(path: str | os.PathLike, *, column: str | None = None, field: str | None = None) -> ParsedCaptions:
    """Every usable caption in the file, in file order, with a report of the rows that were not usable."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    fmt = caption_format(path)
    if column is not None and fmt not in ("csv", "tsv"):
        raise BadInput("--column applies to .csv and .tsv files")
    if field is not None and fmt not in ("jsonl", "json"):
        raise BadInput("--field applies to .jsonl and .json files")
    try:
        if path.is_dir():
            raise BadInput(f"{path} is a folder, not a caption file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise BadInput(f"{path} is larger than {MAX_FILE_BYTES // 1024 ** 3} GiB: not a caption file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"caption file not found: {path}") from None
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc}") from None
    # Undecodable bytes survive as lone surrogates, so one bad line is reported instead of failing the whole file.
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    parsed = ParsedCaptions(fmt)
    base = path.parent
    if fmt == "txt":
        _read_lines(text, parsed)
    elif fmt in ("csv", "tsv"):
        _read_table(text, "\t" if fmt == "tsv" else ",", column, base, parsed, path)
    elif fmt == "jsonl":
        _read_jsonl(text, field, base, parsed)
    else:
        _read_json(text, field, path, parsed)
    return parsed


# Each reader appends through `_add`, the one place a text is checked and cleaned. ----------------------------------
def _add(parsed: ParsedCaptions, value: Any, image: str | None, where: str) -> None:
    if not isinstance(value, str):
        parsed.problems.append(RowProblem(where, f"caption is {type(value).__name__}, not text"))
        return
    text = " ".join(value.split())
    if not text:
        parsed.problems.append(RowProblem(where, "blank caption"))
        return
    if not _is_valid_unicode(text) or (image is not None and not _is_valid_unicode(image)):
        parsed.problems.append(RowProblem(where, "not valid UTF-8 text"))
        return
    if "\x00" in text:
        parsed.problems.append(RowProblem(where, "contains a NUL character"))
        return
    parsed.rows.append(CaptionRow(text, image, where))


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _image_path(base: Path, value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return os.path.abspath(os.path.join(base, os.path.expanduser(value.strip())))


def _read_lines(text: str, parsed: ParsedCaptions) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        _add(parsed, line, None, f"line {number}")


def _read_table(text: str, delimiter: str, column: str | None, base: Path, parsed: ParsedCaptions,
                path: Path) -> None:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = _safe_rows(reader, parsed)
    first = next(rows, None)
    if first is None:
        raise BadInput(f"{path} is empty")
    names = [name.strip() for name in first[1]]
    lowered = [name.lower() for name in names]
    if column is not None:
        if column not in names:
            raise BadInput(f"{path} has no column '{column}' (columns: {', '.join(names)})")
        text_at = names.index(column)
    else:
        found = [lowered.index(name) for name in TEXT_FIELDS if name in lowered]
        if found:
            text_at = found[0]
        elif len(names) == 1:
            text_at = 0
        else:
            raise BadInput(f"{path}: say which column holds the captions with --column (columns: {', '.join(names)})")
    image_at = next((lowered.index(name) for name in IMAGE_FIELDS if name in lowered and lowered.index(name) != text_at),
                    None)
    for number, row in rows:
        where = f"row {number}"
        if not any(cell.strip() for cell in row):
            parsed.problems.append(RowProblem(where, "blank row"))
            continue
        if len(row) != len(names):
            parsed.problems.append(RowProblem(where, f"has {len(row)} fields, the header has {len(names)}"))
            continue
        image = _image_path(base, row[image_at]) if image_at is not None else None
        _add(parsed, row[text_at], image, where)


def _safe_rows(reader: Iterator[list[str]], parsed: ParsedCaptions) -> Iterator[tuple[int, list[str]]]:
    """csv rows numbered from 1 (the header), with a malformed row reported and skipped rather than fatal."""
    number = 0
    while True:
        number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            parsed.problems.append(RowProblem(f"row {number}", f"malformed CSV ({exc})"))
            if "unexpected end of data" in str(exc) or "EOF" in str(exc):
                return
            continue
        yield number, row


def _row_captions(obj: Any, field_name: str | None) -> tuple[list[Any] | None, Any]:
    """(captions, image) from one JSON object, or (None, None) when it holds no caption field."""
    if isinstance(obj, str):
        return [obj], None
    if not isinstance(obj, dict):
        return None, None
    image = next((obj[name] for name in IMAGE_FIELDS if name in obj), None)
    names = (field_name,) if field_name else TEXT_FIELDS
    for name in names:
        if name in obj:
            value = obj[name]
            return (value if isinstance(value, list) else [value]), image
    return None, image


def _add_object(parsed: ParsedCaptions, obj: Any, field_name: str | None, base: Path, where: str) -> None:
    captions, image_value = _row_captions(obj, field_name)
    if captions is None:
        wanted = f"field '{field_name}'" if field_name else "caption field (" + ", ".join(TEXT_FIELDS) + ")"
        what = "object" if isinstance(obj, dict) else type(obj).__name__
        parsed.problems.append(RowProblem(where, f"{what} without a {wanted}"))
        return
    image = _image_path(base, image_value)
    if len(captions) == 1:
        _add(parsed, captions[0], image, where)
        return
    if not captions:
        parsed.problems.append(RowProblem(where, "empty caption list"))
    for n, caption in enumerate(captions, 1):
        _add(parsed, caption, image, f"{where} caption {n}")


def _read_jsonl(text: str, field_name: str | None, base: Path, parsed: ParsedCaptions) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}"
        if not line.strip():
            parsed.problems.append(RowProblem(where, "blank line"))
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            parsed.problems.append(RowProblem(where, f"not valid JSON ({first_line(exc)})"))
            continue
        _add_object(parsed, obj, field_name, base, where)


def _read_json(text: str, field_name: str | None, path: Path, parsed: ParsedCaptions) -> None:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"{path} is not valid JSON ({first_line(exc)})") from None
    if isinstance(document, dict) and isinstance(document.get("annotations"), list):
        _read_coco(document, path, parsed)
        return
    if isinstance(document, dict):
        document = next((document[k] for k in ("captions", "data", "items") if isinstance(document.get(k), list)),
                        None)
    if not isinstance(document, list):
        raise BadInput(f"{path}: expected COCO caption JSON (with 'annotations') or a JSON list of captions")
    for n, obj in enumerate(document, 1):
        _add_object(parsed, obj, field_name, path.parent, f"item {n}")


def _read_coco(document: dict, path: Path, parsed: ParsedCaptions) -> None:
    """COCO captions: annotations {image_id, caption} joined to images {id, file_name}, images found beside the
    annotations folder (coco/annotations/captions_val2017.json -> coco/val2017/NAME)."""
    files: dict[Any, str] = {}
    images = document.get("images")
    if images is not None and not isinstance(images, list):
        parsed.problems.append(RowProblem("images", "'images' is not a list (captions kept without images)"))
        images = None
    for image in images or []:
        if isinstance(image, dict) and _is_id(image.get("id")) and isinstance(image.get("file_name"), str):
            files[image["id"]] = image["file_name"]
    split = re.sub(r"^captions_", "", path.stem)
    roots = [path.parent.parent / split, path.parent / split, path.parent.parent / "images" / split,
             path.parent.parent / "images", path.parent.parent, path.parent]
    found_root: dict[str, Path] = {}
    for n, annotation in enumerate(document["annotations"], 1):
        where = f"annotation {n}"
        if not isinstance(annotation, dict) or "caption" not in annotation:
            parsed.problems.append(RowProblem(where, "annotation without a 'caption'"))
            continue
        name = files.get(annotation.get("image_id")) if _is_id(annotation.get("image_id")) else None
        image = None
        if name is not None and _is_valid_unicode(name):
            image = _coco_image(name, roots, found_root)
        elif annotation.get("image_id") is not None:
            parsed.problems.append(RowProblem(where, f"image_id {annotation.get('image_id')!r} is not in 'images' "
                                                     f"(caption kept without an image)"))
        _add(parsed, annotation["caption"], image, where)


def _is_id(value: Any) -> bool:
    """COCO ids are numbers or strings; anything else (a list, an object) cannot name an image."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _coco_image(name: str, roots: list[Path], found_root: dict[str, Path]) -> str:
    """The first candidate folder holding the file wins and is then tried first (one stat per image, not six)."""
    if "root" in found_root and (found_root["root"] / name).exists():
        return os.path.abspath(found_root["root"] / name)
    for root in roots:
        if (root / name).exists():
            found_root["root"] = root
            return os.path.abspath(root / name)
    return os.path.abspath(roots[0] / name)
