"""Captions end to end through the CLI: COCO and Flickr8k imports with image links, sidecars, re-imports, rich queries."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import clipsearch
from conftest import TINY_MODEL, shared
from test_cli import as_json, clip, tiny


@pytest.fixture(scope="module")
def coco(tmp_path_factory, tiny_checkpoint):
    """coco-mini indexed, its COCO annotations imported as 'coco' and its captions.jsonl as 'coco-jsonl'."""
    root = shared("coco-mini")
    idx = tmp_path_factory.mktemp("coco") / "idx"
    clip("index", root, "--index", idx, *tiny(tiny_checkpoint), "--workers", "1")
    reports = [as_json("captions", "add", root / "annotations" / f"captions_{split}.json", "--index", idx,
                       "--collection", "coco") for split in ("val2017", "train2017")]
    reports.append(as_json("captions", "add", root / "captions.jsonl", "--index", idx, "--collection", "coco-jsonl"))
    return idx, root, reports


def jsonl_links(root: Path) -> dict[str, set[str]]:
    links: dict[str, set[str]] = {}
    for line in (root / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        for caption in row["captions"]:
            links.setdefault(" ".join(caption.split()), set()).add(str(root / row["image"]))
    return links


def test_coco_imports_link_every_caption_to_its_image(coco):
    idx, root, (val, train, jsonl) = coco
    links = jsonl_links(root)
    assert val["added"] == 395 and train["added"] > 300 and not val["problems"] and not train["problems"]
    assert val["linked"] == val["added"] and train["linked"] == train["added"]
    assert jsonl["added"] == sum(len(v) for v in links.values()) - jsonl["duplicates"]
    assert jsonl["linked"] == jsonl["added"]
    collections = {c["collection"]: c for c in as_json("captions", "list", "--index", idx)}
    assert collections["coco"]["captions"] == val["added"] + train["added"] == collections["coco"]["linked"]
    assert len(collections["coco"]["sources"]) == 2
    # Each caption's exact text finds itself (cosine 1) and carries the image the dataset says it describes.
    for text in sorted(links)[::40]:
        hits = as_json("search", text, "--captions", "--collection", "coco-jsonl", "--index", idx, "-k", "1")
        assert hits[0]["text"] == text and hits[0]["score"] > 0.999
        assert hits[0]["image"] in links[text]
        assert set(hits[0]) >= {"id", "text", "collection", "score", "image"}


def test_reimport_is_idempotent_and_counted(coco):
    idx, root, (val, _, _) = coco
    again = as_json("captions", "add", root / "annotations" / "captions_val2017.json", "--index", idx,
                    "--collection", "coco")
    assert (again["added"], again["unchanged"], again["removed"]) == (0, 395, 0)
    info = as_json("info", "--index", idx)
    assert info["captions"] == sum(c["captions"] for c in info["collections"])
    assert clip("verify", "--index", idx).stdout.startswith("ok:")


def test_image_to_captions_and_text_to_captions(coco):
    idx, root, _ = coco
    image = root / "val2017" / "000000000139.jpg"
    hits = as_json("search", "--image", image, "--captions", "--index", idx, "-k", "5")
    assert len(hits) == 5 and hits[0]["score"] >= hits[-1]["score"]
    table = clip("search", "a kitchen", "--captions", "--index", idx, "-k", "3").stdout.splitlines()
    assert len(table) == 3 and "[coco" in table[0]


def test_mixed_and_filtered_image_queries(coco):
    idx, root, _ = coco
    image = root / "val2017" / "000000000139.jpg"
    mixed = as_json("search", f"2*dog + {image} - \"cat\"", "--index", idx, "-k", "5")
    same = as_json("search", "2*dog", "--image", image, "--not", "cat", "--index", idx, "-k", "5")
    assert [h["id"] for h in mixed] == [h["id"] for h in same]
    assert str(image) not in [h["path"] for h in mixed]  # the query image itself is not an answer
    under = as_json("search", "a dog", "--under", root / "train2017", "--index", idx, "-k", "500")
    assert under and all(h["path"].startswith(str(root / "train2017") + "/") for h in under)
    assert len(under) == len(list((root / "train2017").glob("*.jpg")))  # -k up to the index size
    assert as_json("search", "a dog", "--type", "png", "--index", idx) == []
    scores = [h["score"] for h in as_json("search", "a dog", "--threshold", "0.05", "--index", idx, "-k", "500")]
    assert all(s >= 0.05 for s in scores)


@pytest.mark.parametrize("args,message", [
    (["a dog", "--captions", "--under", "."], "do not apply to --captions"),
    (["a dog", "--collection", "coco"], "use it with --captions"),
    (["a dog", "--captions", "--collection", "nope"], "no caption collection named 'nope'"),
    (["a dog", "--after", "2019-02-30"], "invalid date"),
    (["x*dog"], "bad weight"),
    (["dog +"], "ends with"),
    (["a dog", "--threshold", "3"], "threshold must be"),
    (["--not", "cat"], "at least one part to look for"),
    (["a dog", "--image", "missing.jpg"], "image not found"),
])
def test_bad_queries_are_one_line_errors(coco, args, message):
    idx, _, _ = coco
    result = clip("search", *args, "--index", idx, code=2)
    assert message in result.stderr


def test_remove_collection(tmp_path, tiny_checkpoint):
    idx = tmp_path / "idx"
    (tmp_path / "c.txt").write_text("a red bicycle\na blue car\n")
    clip("captions", "add", tmp_path / "c.txt", "--index", idx, *tiny(tiny_checkpoint))
    assert as_json("info", "--index", idx)["captions"] == 2
    assert "2 captions removed" in clip("captions", "remove", "--collection", "c", "--index", idx).stdout
    assert as_json("captions", "list", "--index", idx) == []
    assert "no caption collection named 'c'" in clip("captions", "remove", "--collection", "c", "--index", idx,
                                                     code=2).stderr
    assert not (idx / "captions.faiss").exists()


def test_malformed_rows_reported_good_rows_kept_long_ones_truncated(tmp_path, tiny_checkpoint):
    idx = tmp_path / "idx"
    long = " ".join(["word"] * 120)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"caption": "a dog"}\n{broken\n\n{"caption": "' + long.encode() + b'"}\n'
                     b'{"caption": "bad \xff bytes"}\n{"caption": "a cat"}\n')
    result = clip("captions", "add", path, "--index", idx, *tiny(tiny_checkpoint))
    assert "skipped line 2: not valid JSON" in result.stderr and "skipped line 3: blank line" in result.stderr
    assert "skipped line 5: not valid UTF-8" in result.stderr
    assert "1 captions are longer than the model's context" in result.stderr
    assert "3 added" in result.stdout and "3 skipped" in result.stdout
    hits = as_json("search", long, "--captions", "--index", idx, "-k", "1")
    assert hits[0]["text"] == long  # stored in full


def test_file_without_usable_rows_stores_nothing(tmp_path, tiny_checkpoint):
    idx = tmp_path / "idx"
    (tmp_path / "ok.txt").write_text("a dog\n")
    clip("captions", "add", tmp_path / "ok.txt", "--index", idx, *tiny(tiny_checkpoint))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no usable captions" in clip("captions", "add", tmp_path / "blank.txt", "--index", idx, code=2).stderr
    assert "caption file not found" in clip("captions", "add", tmp_path / "nope.txt", "--index", idx, code=2).stderr
    assert as_json("info", "--index", idx)["captions"] == 1


def test_an_import_that_fails_midway_writes_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    from clipsearch import captions as caption_room
    from clipsearch.model import ClipModel

    path = tmp_path / "many.txt"
    path.write_text("\n".join(f"caption number {n}" for n in range(600)))
    calls = {"n": 0}
    real = ClipModel.encode_texts

    def failing(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:  # the model's own probe is call 1; fail in the second import batch
            raise RuntimeError("disk on fire")
        return real(self, texts)

    monkeypatch.setattr(ClipModel, "encode_texts", failing)
    monkeypatch.setattr(caption_room, "EMBED_BATCH", 256)
    with clipsearch.open(tmp_path / "idx", model="clipsearch-tiny-ViT-32", pretrained=str(tiny_checkpoint)) as idx:
        with pytest.raises(RuntimeError, match="disk on fire"):
            idx.add_captions(path)
        assert idx.info()["captions"] == 0
        monkeypatch.setattr(ClipModel, "encode_texts", real)
        assert idx.add_captions(path).added == 600


def test_sidecar_text_files_become_linked_captions(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(shared("photos", "exif-samples").glob("*.jpg"))[:3]
    images = [Path(shutil.copy2(p, photos / f"IMG_{n}.jpg")) for n, p in enumerate(sources)]
    (photos / "IMG_0.txt").write_text("my grandmother's garden\n\nroses in june\n")
    (photos / "IMG_1.txt").write_text("the old harbour\n")
    (photos / "notes.txt").write_text("not beside any image\n")
    idx = tmp_path / "idx"
    result = clip("index", photos, "--index", idx, *tiny(tiny_checkpoint), "--workers", "0")
    assert "3 sidecar captions" in result.stdout
    hits = as_json("search", "the old harbour", "--captions", "--index", idx, "-k", "1")
    assert hits[0]["text"] == "the old harbour" and hits[0]["image"] == str(images[1])
    assert hits[0]["collection"] == "sidecar"
    (photos / "IMG_1.txt").write_text("the new harbour\n")
    (photos / "IMG_0.txt").unlink()
    clip("index", "--index", idx)
    texts = {h["text"] for h in as_json("search", "harbour", "--captions", "--index", idx, "-k", "10")}
    assert texts == {"the new harbour"}
    images[1].unlink()
    clip("index", "--index", idx)
    assert as_json("info", "--index", idx)["captions"] == 0


def test_sidecars_are_files_beside_their_image_links_followed(tmp_path, tiny_checkpoint):
    """Sidecars are found from one listing per folder (not a stat per image), with isfile's meaning: a folder named
    like a sidecar is none, a link to a text file is one, and the images of another folder never see it."""
    photos, other = tmp_path / "photos", tmp_path / "photos" / "sub"
    other.mkdir(parents=True)
    sources = sorted(shared("photos", "exif-samples").glob("*.jpg"))[:3]
    for n, source in enumerate(sources[:2]):
        shutil.copy2(source, photos / f"IMG_{n}.jpg")
    shutil.copy2(sources[2], other / "IMG_0.jpg")  # same stem, other folder: photos/IMG_0.txt is not its sidecar
    (photos / "IMG_0.txt").mkdir()
    (tmp_path / "elsewhere.txt").write_text("a lighthouse in fog\n")
    (photos / "IMG_1.txt").symlink_to(tmp_path / "elsewhere.txt")
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=0)
        assert report.captions == 1 and not report.warnings
        assert [(hit.text, Path(hit.image).name) for hit in idx.search_captions("a lighthouse in fog", k=5)] == \
            [("a lighthouse in fog", "IMG_1.jpg")]


@pytest.mark.slow
def test_flickr8k_captions_link_whichever_comes_first(tmp_path, tiny_checkpoint):
    root = shared("flickr8k-test1k")
    idx = tmp_path / "idx"
    first = as_json("captions", "add", root / "captions.jsonl", "--index", idx, *tiny(tiny_checkpoint))
    assert first["added"] + first["duplicates"] == 5000 and first["linked"] == 0 and not first["problems"]
    clip("index", root / "images", "--index", idx, "--workers", "1")
    listed = as_json("captions", "list", "--index", idx)
    assert listed == [{"collection": "captions", "captions": first["added"], "linked": first["added"],
                       "sources": [str(root / "captions.jsonl")], "added": listed[0]["added"]}]
    image = sorted((root / "images").glob("*.jpg"))[0]
    hits = as_json("search", "--image", image, "--captions", "--index", idx, "-k", "5")
    assert len(hits) == 5 and all(h["image"] for h in hits)
