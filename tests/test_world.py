"""The generated world: deterministic files that decode through the engine, truthful captions, held-out pairs kept out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch import media, world
from clipsearch.errors import BadInput

SPEC = media.PreprocessSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic",
                            resize_mode="shortest", fill_color=0)


@pytest.fixture(scope="module")
def test_world(tmp_path_factory) -> Path:
    return world.generate(tmp_path_factory.mktemp("w") / "test", "test", 160, seed=3)


@pytest.fixture(scope="module")
def train_world(tmp_path_factory) -> Path:
    return world.generate(tmp_path_factory.mktemp("w") / "train", "train", 400, seed=3)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    a = world.generate(tmp_path / "a", "test", 24, seed=5).parent
    b = world.generate(tmp_path / "b", "test", 24, seed=5, workers=2).parent  # processes do not change the files
    c = world.generate(tmp_path / "c", "test", 24, seed=6).parent
    assert _tree(a) == _tree(b)
    assert _tree(a) != _tree(c)
    assert (a / "captions.jsonl").read_bytes() != (c / "captions.jsonl").read_bytes()


def test_a_world_matches_only_the_settings_and_generator_that_drew_it(tmp_path, monkeypatch):
    jsonl = world.generate(tmp_path / "w", "test", 24, seed=5)
    assert world.matches(jsonl, "test", 24, 5)
    assert not world.matches(jsonl, "test", 24, 6) and not world.matches(jsonl, "test", 23, 5)
    assert not world.matches(jsonl, "train", 24, 5) and not world.matches(tmp_path / "none.jsonl", "test", 24, 5)
    monkeypatch.setattr(world, "HELD_OUT", world.HELD_OUT - {("red", "star")})  # an earlier generator
    assert not world.matches(jsonl, "test", 24, 5)


def test_train_and_test_splits_differ_for_one_seed():
    train = world.sample_scenes("train", 20, seed=0)
    test = world.sample_scenes("test", 20, seed=0)
    assert [s.captions for s in train] != [s.captions for s in test]


def test_jsonl_is_flickr_style_with_paths_relative_to_it(test_world):
    lines = test_world.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 160
    names = set()
    for line in lines:
        rec = json.loads(line)
        assert isinstance(rec["image"], str) and rec["image"].startswith("images/")
        assert (test_world.parent / rec["image"]).is_file()
        assert len(rec["captions"]) >= 3 and all(isinstance(c, str) and c for c in rec["captions"])
        assert len(set(rec["captions"])) == len(rec["captions"])
        assert rec["split"] == "test" and rec["kind"] in world.KINDS
        names.add(rec["image"])
    assert len(names) == 160
    assert {p.name for p in (test_world.parent / "images").iterdir()} == {n.split("/")[1] for n in names}


def test_files_are_real_assorted_pngs_and_jpegs_that_decode_through_the_engine(test_world):
    records = world.read_records(test_world)
    formats, sizes = set(), set()
    for rec in records:
        decoded = media.load(rec["path"], SPEC)
        assert decoded.pixels.shape == (64, 64, 3)
        assert (decoded.width, decoded.height) == (rec["width"], rec["height"])
        assert 96 <= min(decoded.width, decoded.height) and max(decoded.width, decoded.height) <= 320
        formats.add(decoded.format)
        sizes.add((decoded.width, decoded.height))
        assert Path(rec["path"]).suffix == {"PNG": ".png", "JPEG": ".jpg"}[decoded.format]
    assert formats == {"PNG", "JPEG"}
    assert len(sizes) > 100
    assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)


def test_exif_oriented_jpegs_look_right_after_load(test_world):
    """Pixels are stored transposed under EXIF orientation 2..8: the engine's decode must show the drawn picture."""
    records = [r for r in world.read_records(test_world) if r["orientation"] != 1]
    assert {r["orientation"] for r in records} >= {3, 6, 8}
    really_turned = 0
    for rec in records:
        drawn = np.asarray(world.render(world.Scene.from_record(rec)), dtype=np.float32)
        shown = np.asarray(media.open_image(rec["path"]), dtype=np.float32)
        assert shown.shape == drawn.shape
        assert np.abs(shown - drawn).mean() < 4.0  # JPEG noise only
        with Image.open(rec["path"]) as raw:
            assert raw.getexif()[0x0112] == rec["orientation"]
            stored = np.asarray(raw.convert("RGB"), dtype=np.float32)
        if rec["orientation"] >= 5:
            assert stored.shape == (drawn.shape[1], drawn.shape[0], 3)
        # ignoring the tag would show another picture (unless the drawing happens to be symmetric that way)
        if stored.shape != drawn.shape or np.abs(stored - drawn).mean() > 3 * np.abs(shown - drawn).mean():
            really_turned += 1
    assert really_turned >= 0.8 * len(records)


def test_pngs_are_exactly_the_drawing(test_world):
    rec = next(r for r in world.read_records(test_world) if r["format"] == "png")
    assert np.array_equal(np.asarray(media.open_image(rec["path"])), np.asarray(world.render(world.Scene.from_record(rec))))


def test_held_out_pairs_never_in_train_and_common_in_test(train_world, test_world):
    train = world.read_records(train_world)
    for rec in train:
        assert not rec["held_out"]
        assert not any((t["colour"], t["shape"]) in world.HELD_OUT for t in rec["things"])
        for colour, shape in world.HELD_OUT:
            assert all(f"{colour} {shape}" not in c for c in rec["captions"])
    test = world.read_records(test_world)
    held = [r for r in test if r["held_out"]]
    assert len(held) >= 0.15 * len(test)
    assert {(r["attributes"]["colour"], r["attributes"]["shape"]) for r in held if r["kind"] == "single"} <= world.HELD_OUT
    assert len({(t["colour"], t["shape"]) for r in held for t in r["things"]} & world.HELD_OUT) == len(world.HELD_OUT)


def test_test_split_first_captions_are_unique_and_cover_every_kind(test_world):
    test = world.read_records(test_world)
    firsts = [r["captions"][0] for r in test]
    assert len(set(firsts)) == len(firsts)
    assert {r["kind"] for r in test} == set(world.KINDS)


def test_captions_say_what_was_drawn(test_world):
    for rec in world.read_records(test_world):
        first, things, attrs = rec["captions"][0], rec["things"], rec["attributes"]
        assert rec["background"] in first
        if rec["kind"] == "single":
            (thing,) = things
            assert f"{attrs['size']} {thing['colour']} {thing['shape']}" in first
            fx = (thing["x"] - (rec["width"] - min(rec["width"], rec["height"])) / 2) / min(rec["width"], rec["height"])
            fy = (thing["y"] - (rec["height"] - min(rec["width"], rec["height"])) / 2) / min(rec["width"], rec["height"])
            px, py = world.POSITIONS[attrs["position"]]
            assert abs(fx - px) < 0.05 and abs(fy - py) < 0.05
        elif rec["kind"] == "count":
            assert len(things) == attrs["count"] and len({(t["colour"], t["shape"]) for t in things}) == 1
            assert first.startswith({2: "two ", 3: "three "}[attrs["count"]])
        else:
            a, b = things
            assert first.index(f"{a['colour']} {a['shape']}") < first.index(f"{b['colour']} {b['shape']}")
            if attrs["relation"] == "left of":
                assert "to the left of" in first and a["x"] < b["x"]
            else:
                assert " above " in first and a["y"] < b["y"]


def test_bad_arguments_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="split"):
        world.generate(tmp_path / "x", "validation", 4)
    with pytest.raises(BadInput, match="n must be"):
        world.generate(tmp_path / "x", "test", 0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="not an empty folder"):
        world.generate(tmp_path / "full", "test", 4)
    with pytest.raises(BadInput, match="distinct first captions"):
        world.sample_scenes("test", 100_000, seed=0)


def test_command_line_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "clipsearch.world", str(tmp_path / "cli"), "--split", "test",
                           "--n", "6", "--seed", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "cli" / "captions.jsonl").read_text().splitlines()) == 6
    again = subprocess.run([sys.executable, "-m", "clipsearch.world", str(tmp_path / "cli"), "--n", "6"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == BadInput.exit_code and "not an empty folder" in again.stderr
