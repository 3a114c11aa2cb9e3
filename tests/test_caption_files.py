"""The caption file readers: every format, malformed rows reported and skipped, and fuzzing that only BadInput escapes."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipsearch.caption_files import read_captions
from clipsearch.errors import BadInput

from conftest import shared


def write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_txt_one_caption_per_line_blank_and_bad_bytes_reported(tmp_path):
    path = write(tmp_path / "c.txt", b"\xef\xbb\xbfa red bicycle\r\n\r\n  two   dogs  \nbad \xff\xfe bytes\nlast")
    parsed = read_captions(path)
    assert [r.text for r in parsed.rows] == ["a red bicycle", "two dogs", "last"]
    assert [(p.where, p.reason) for p in parsed.problems] == [("line 2", "blank caption"),
                                                             ("line 4", "not valid UTF-8 text")]
    assert all(r.image is None for r in parsed.rows)


def test_csv_picks_the_caption_column_and_links_images(tmp_path):
    path = write(tmp_path / "c.csv", 'image,caption\nimg/a.jpg,"a dog, running"\nimg/b.jpg,\nonly-one-field\n'
                                     'img/c.jpg,"a cat ""inside"""\n')
    parsed = read_captions(path)
    assert [r.text for r in parsed.rows] == ["a dog, running", 'a cat "inside"']
    assert parsed.rows[0].image == str(tmp_path / "img" / "a.jpg")
    assert [p.where for p in parsed.problems] == ["row 3", "row 4"]
    assert "1 fields" in parsed.problems[1].reason


def test_tsv_and_explicit_column(tmp_path):
    path = write(tmp_path / "c.tsv", "id\tdescription\tnotes\n1\tsunset over the sea\tx\n")
    assert [r.text for r in read_captions(path).rows] == ["sunset over the sea"]
    assert [r.text for r in read_captions(path, column="notes").rows] == ["x"]
    with pytest.raises(BadInput, match="no column 'nope'.*id, description, notes"):
        read_captions(path, column="nope")


def test_csv_without_an_obvious_column_asks_for_one(tmp_path):
    with pytest.raises(BadInput, match="--column"):
        read_captions(write(tmp_path / "c.csv", "a,b\n1,2\n"))


def test_jsonl_flickr_style_field_and_malformed_lines(tmp_path):
    lines = [json.dumps({"image": "images/x.jpg", "captions": ["one", "two", ""]}), "{not json", "",
             json.dumps({"caption": "plain"}), json.dumps({"title": "t", "alt": "by field"}), json.dumps([1, 2]),
             json.dumps({"caption": 42})]
    path = write(tmp_path / "c.jsonl", "\n".join(lines))
    parsed = read_captions(path)
    assert [(r.text, r.image) for r in parsed.rows] == [
        ("one", str(tmp_path / "images/x.jpg")), ("two", str(tmp_path / "images/x.jpg")), ("plain", None)]
    reasons = {p.where: p.reason for p in parsed.problems}
    assert reasons["line 1 caption 3"] == "blank caption"
    assert reasons["line 2"].startswith("not valid JSON")
    assert reasons["line 3"] == "blank line"
    assert "without a caption field" in reasons["line 5"]
    assert reasons["line 7"] == "caption is int, not text"
    assert [r.text for r in read_captions(path, field="alt").rows] == ["by field"]


def test_coco_json_links_each_caption_to_its_image(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "000001.jpg").write_bytes(b"")
    (tmp_path / "annotations").mkdir()
    doc = {"images": [{"id": 1, "file_name": "000001.jpg"}],
           "annotations": [{"image_id": 1, "id": 9, "caption": "A plane."}, {"image_id": 7, "caption": "Orphan."},
                           {"image_id": 1, "id": 10}]}
    parsed = read_captions(write(tmp_path / "annotations" / "captions_val2017.json", json.dumps(doc)))
    assert [(r.text, r.image) for r in parsed.rows] == [("A plane.", str(tmp_path / "val2017" / "000001.jpg")),
                                                       ("Orphan.", None)]
    assert [p.where for p in parsed.problems] == ["annotation 2", "annotation 3"]


@pytest.mark.parametrize("images", [True, 3, "x.jpg", {"id": 1}])
def test_coco_json_with_malformed_images_keeps_its_captions(tmp_path, images):
    """Found by the fuzz test: 'images': true raised a TypeError; ids that are lists or objects did too."""
    doc = {"images": images, "annotations": [{"image_id": 1, "caption": "A plane."},
                                             {"image_id": [1], "caption": "Listed id."}]}
    parsed = read_captions(write(tmp_path / "captions.json", json.dumps(doc)))
    assert [(r.text, r.image) for r in parsed.rows] == [("A plane.", None), ("Listed id.", None)]
    assert parsed.problems[0].where == "images" and "not a list" in parsed.problems[0].reason
    doc = {"images": [{"id": [1], "file_name": "a.jpg"}, {"id": True, "file_name": "b.jpg"}],
           "annotations": [{"image_id": {"x": 1}, "caption": "Object id."}, {"image_id": 1, "caption": "True?"}]}
    parsed = read_captions(write(tmp_path / "captions.json", json.dumps(doc)))
    assert [(r.text, r.image) for r in parsed.rows] == [("Object id.", None), ("True?", None)]


def test_real_coco_and_flickr_files_read_cleanly():
    coco = read_captions(shared("coco-mini", "annotations", "captions_val2017.json"))
    assert len(coco.rows) == 395 and not coco.problems
    assert all(os.path.exists(r.image) for r in coco.rows)
    flickr = read_captions(shared("flickr8k-test1k", "captions.jsonl"))
    assert len(flickr.rows) == 5000 and not flickr.problems
    assert len({r.image for r in flickr.rows}) == 1000 and all(os.path.exists(r.image) for r in flickr.rows[:50])


@pytest.mark.parametrize("name,content,message", [
    ("c.doc", "x", "unknown caption file type"),
    ("missing.txt", None, "caption file not found"),
    ("bad.json", "{oops", "not valid JSON"),
    ("obj.json", '{"a": 1}', "expected COCO caption JSON"),
    ("empty.csv", "", "is empty"),
])
def test_whole_file_errors_are_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(BadInput, match=message):
        read_captions(path)


def test_options_that_do_not_fit_the_format_are_refused(tmp_path):
    path = write(tmp_path / "c.txt", "x")
    with pytest.raises(BadInput, match="--column"):
        read_captions(path, column="caption")
    with pytest.raises(BadInput, match="--field"):
        read_captions(path, field="caption")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(BadInput, match="is a folder"):
        read_captions(tmp_path / "dir.txt")


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from(["txt", "csv", "tsv", "jsonl", "json"]))
def test_fuzz_any_bytes_only_bad_input_escapes(tmp_path, data, suffix):
    path = write(tmp_path / f"fuzz.{suffix}", data)
    try:
        parsed = read_captions(path)
    except BadInput:
        return
    for row in parsed.rows:
        assert row.text == row.text.strip() and row.text
        row.text.encode("utf-8")  # storable in SQLite


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["image", "caption", "captions", "text", "annotations", "images", "id", "image_id",
                         "file_name"]), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(rows=st.lists(json_values, max_size=6))
def test_fuzz_structured_json_only_bad_input_escapes(tmp_path, rows):
    write(tmp_path / "f.jsonl", "\n".join(json.dumps(r) for r in rows))
    write(tmp_path / "f.json", json.dumps(rows[0] if rows else rows))
    for name in ("f.jsonl", "f.json"):
        try:
            read_captions(tmp_path / name)
        except BadInput:
            pass


@FUZZ
@given(cells=st.lists(st.lists(st.text(max_size=12), min_size=1, max_size=4), min_size=1, max_size=6))
def test_fuzz_csv_rows_only_bad_input_escapes(tmp_path, cells):
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerows([["caption", "image"]] + cells)
    write(tmp_path / "f.csv", out.getvalue())
    parsed = read_captions(tmp_path / "f.csv")
    assert len(parsed.rows) + len(parsed.problems) == len(cells)  # every row is a caption or a reported problem
