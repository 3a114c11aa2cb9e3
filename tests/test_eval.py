"""`clipsearch eval`: exact ranks and recall on synthetic vectors, chance level with a random model on Flickr8k."""
from __future__ import annotations

import numpy as np
import pytest

from clipsearch.evaluate import _chance_image_to_text, _ranks, default_index_name
from conftest import shared
from test_cli import as_json, clip, tiny


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_ranks_of_a_perfect_and_of_a_known_model():
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(50, 16)))
    truth = np.repeat(np.arange(50), 3)
    captions = unit(images[truth] + 0.01 * rng.normal(size=(150, 16)))
    t2i, i2t = _ranks(captions, images, truth)
    assert (t2i == 1).all() and (i2t == 1).all()
    # Swap two images' captions: those captions now rank their labelled image below the one they describe.
    truth_swapped = truth.copy()
    truth_swapped[truth == 0], truth_swapped[truth == 1] = 1, 0
    t2i, i2t = _ranks(captions, images, truth_swapped)
    assert (t2i[truth_swapped != truth] > 1).all() and (t2i[truth_swapped == truth] == 1).all()
    assert i2t[0] > 1 and i2t[1] > 1 and (i2t[2:] == 1).all()


def test_random_rankings_sit_at_the_analytic_chance_level():
    rng = np.random.default_rng(1)
    per_image, n_images = 5, 200
    truth = np.repeat(np.arange(n_images), per_image)
    hits_t2i, hits_i2t = [], []
    for _ in range(20):
        t2i, i2t = _ranks(unit(rng.normal(size=(len(truth), 64))), unit(rng.normal(size=(n_images, 64))), truth)
        hits_t2i.append((t2i <= 10).mean())
        hits_i2t.append((i2t <= 10).mean())
    chance = _chance_image_to_text(np.full(n_images, per_image), len(truth))
    assert abs(np.mean(hits_t2i) - 10 / n_images) < 0.01
    assert abs(np.mean(hits_i2t) - chance["R@10"]) < 0.015
    assert chance["R@10"] == pytest.approx(1 - np.prod([(995 - i) / (1000 - i) for i in range(10)]), rel=1e-9)


def test_eval_needs_linked_captions(tmp_path, tiny_checkpoint):
    (tmp_path / "plain.txt").write_text("a dog\n")
    result = clip("eval", tmp_path / "plain.txt", "--index", tmp_path / "idx", *tiny(tiny_checkpoint), code=2)
    assert "links no captions to images" in result.stderr
    assert default_index_name(tmp_path / "set" / "captions.jsonl") == "eval-set"


@pytest.mark.slow
def test_random_model_on_flickr8k_is_at_chance(tmp_path, tiny_checkpoint):
    dataset = shared("flickr8k-test1k", "captions.jsonl")
    report = as_json("eval", dataset, "--index", tmp_path / "idx", *tiny(tiny_checkpoint), "--workers", "1")
    assert report["images"] == 1000 and report["captions"] >= 4990
    for direction in ("text_to_image", "image_to_text"):
        measured, chance = report[direction]["recall"], report[direction]["chance"]
        assert chance["R@10"] == pytest.approx(0.01, abs=0.0005)
        assert abs(measured["R@10"] - chance["R@10"]) <= 0.02, (direction, measured, chance)
        assert measured["R@1"] <= 0.01
    assert report["text_to_image"]["mean_rank"] == pytest.approx(500.5, rel=0.15)
    again = clip("eval", dataset, "--index", tmp_path / "idx")  # nothing left to index or import: table only
    assert "text->image" in again.stdout and "image->text" in again.stdout
