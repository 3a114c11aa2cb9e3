"""Filtered search: the allow-list from SQLite, searched inside FAISS, equals an exact filtered brute force."""
from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest

from clipsearch.errors import BadInput
from clipsearch.query import Filters, parse_date, search_images
from clipsearch.store import Store
from clipsearch.vectors import VectorIndex

DIM = 32
FORMATS = ["JPEG", "PNG", "MPO", "WEBP", "TIFF"]


@pytest.fixture()
def world(tmp_path):
    """400 random unit vectors with random folders, dates (EXIF or only file time) and formats."""
    rng = np.random.default_rng(7)
    folders = [tmp_path / "photos" / name for name in ("2019", "2020", "2020/summer", "phone")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    store = Store(tmp_path / "index", create=True)
    vectors = rng.normal(size=(400, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    with store.transaction():
        store.set_meta({"dim": str(DIM)})
        for n, vector in enumerate(vectors):
            folder = folders[rng.integers(len(folders))]
            when = dt.datetime(2018, 1, 1) + dt.timedelta(seconds=int(rng.integers(0, 4 * 365 * 86400)))
            taken = when.strftime("%Y-%m-%dT%H:%M:%S") if rng.random() < 0.7 else None
            mtime_ns = int(when.timestamp() * 1e9)
            row = {"path": str(folder / f"img{n:04d}.x"), "root": str(tmp_path / "photos"), "size": 1,
                   "mtime_ns": mtime_ns, "fingerprint": None, "width": 1, "height": 1, "taken": taken,
                   "format": FORMATS[rng.integers(len(FORMATS))], "status": "ok", "error": None}
            row["id"] = store.put_image(row, vector)
            row["when"] = taken or when.strftime("%Y-%m-%dT%H:%M:%S")
            rows.append(row)
        store.bump_generation()
    index = VectorIndex.from_source(DIM, store)
    yield store, index, rows, vectors, tmp_path / "photos"
    store.close()


def brute_force(rows, vectors, query, k, keep):
    chosen = [n for n, row in enumerate(rows) if keep(row)]
    scores = vectors[chosen] @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [rows[chosen[i]]["id"] for i in order]


@pytest.mark.parametrize("case", range(6))
def test_filtered_search_equals_exact_filtered_brute_force(world, case):
    store, index, rows, vectors, photos = world
    rng = np.random.default_rng(100 + case)
    query = rng.normal(size=DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    settings = [
        dict(under=[str(photos / "2020")]),
        dict(under=[str(photos / "2019"), str(photos / "phone")], types="png,webp"),
        dict(after="2019-06", before="2020-03-15"),
        dict(types="jpg"),
        dict(after="2020", types=["tif", "png"], under=[str(photos)]),
        dict(before="2018-02-01T12:00"),
    ][case]
    filters = Filters.build(**settings)

    def keep(row):
        if filters.under and not any(row["path"].startswith(f + "/") for f in filters.under):
            return False
        if filters.after and row["when"] < filters.after:
            return False
        if filters.before and row["when"] > filters.before:
            return False
        return not filters.formats or row["format"] in filters.formats

    for k in (1, 10, 400):
        hits = search_images(store, index, query, k, filters=filters)
        expected = brute_force(rows, vectors, query, k, keep)
        assert [h.id for h in hits] == expected
        assert expected  # every case selects something, so the comparison means something


def test_threshold_and_exclusion_inside_the_filter(world):
    store, index, rows, vectors, photos = world
    query = vectors[0]
    hits = search_images(store, index, query, 50, filters=Filters.build(under=[str(photos)]), threshold=0.1,
                         exclude=[rows[0]["id"]])
    assert rows[0]["id"] not in [h.id for h in hits]
    assert hits and all(h.score >= 0.1 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_dates_name_whole_periods_inclusively():
    assert parse_date("2019", end=False) == "2019-01-01T00:00:00"
    assert parse_date("2019", end=True) == "2019-12-31T23:59:59"
    assert parse_date("2020-02", end=True) == "2020-02-29T23:59:59"
    assert parse_date("2020-02-03 04:05", end=True) == "2020-02-03T04:05:59"
    for bad in ("yesterday", "2019-13", "2019-02-30", "2019-01-01T25:00", "", "19-01-01"):
        with pytest.raises(BadInput, match="invalid date"):
            parse_date(bad, end=False)


def test_filter_input_is_checked(tmp_path):
    with pytest.raises(BadInput, match="unknown image type 'raw'"):
        Filters.build(types="jpg,raw")
    with pytest.raises(BadInput, match="folder not found"):
        Filters.build(under=[str(tmp_path / "nope")])
    with pytest.raises(BadInput, match="later than"):
        Filters.build(after="2021", before="2020")
    assert Filters.build(types="JPG, .png").formats == ("JPEG", "MPO", "PNG")
    assert not Filters.build().active
    assert Filters.build(under=os.fspath(tmp_path)).under == (str(tmp_path),)
