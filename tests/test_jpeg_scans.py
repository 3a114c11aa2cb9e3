"""Progressive JPEGs without the scans a 1/8-scale decode never reads: the same picture, bit for bit, or no rewrite."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from clipsearch import jpeg_scans, media

from conftest import shared


def _jpeg(mode: str, size: tuple[int, int], **kwargs) -> bytes:
    rng = np.random.default_rng(sum(size))
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    arr = np.stack([128 + 100 * np.sin(x / 37) * np.cos(y / 23), 255 * x / size[0], 255 * y / size[1]], -1)
    arr += rng.normal(0, 20, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _eighth(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft(img.mode, (1, 1))  # the smallest DCT scale: 1/8
    return np.asarray(img)


LAYOUTS = [
    ("RGB", {"subsampling": 0}),  # 4:4:4: every component from its DC alone
    ("RGB", {"subsampling": 1}),  # 4:2:2: chroma upsampled, still DC alone
    ("RGB", {"subsampling": 2}),  # 4:2:0: chroma from a 2x2 IDCT, which reads AC
    ("L", {}),
    ("CMYK", {"subsampling": 2}),
    ("RGB", {"subsampling": 2, "restart_marker_blocks": 3}),
]


@pytest.mark.parametrize("mode,options", LAYOUTS)
@pytest.mark.parametrize("size", [(1203, 917), (917, 1203), (3001, 17), (8, 8)])
def test_a_progressive_jpeg_without_its_unread_scans_decodes_identically_at_an_eighth(mode, options, size):
    """Bit-identical at 1/8 for every layout. Merely dropping the AC scans fails this (libjpeg then smooths the blocks
    whose AC it never saw, moving their DC picture by up to 80 levels), and so does dropping a 4:2:0 file's chroma AC."""
    data = _jpeg(mode, size, progressive=True, quality=90, **options)
    lean = jpeg_scans.dc_only(data)
    assert lean is not None and len(lean) < len(data)
    assert np.array_equal(_eighth(lean), _eighth(data))


def test_the_rewrite_leaves_out_most_of_a_photo():
    """The point of it: at 1/8 the AC scans of the luma, most of the file, are never read."""
    data = _jpeg("RGB", (1600, 1200), progressive=True, quality=90, subsampling=2)
    assert len(jpeg_scans.dc_only(data)) < len(data) / 2


@pytest.mark.parametrize("case", ["baseline", "truncated", "no end marker", "not a jpeg", "empty", "header only"])
def test_anything_but_a_whole_progressive_jpeg_is_left_alone(case):
    """None means 'decode the original': a baseline file has nothing to drop, and a damaged one must fail (or not)
    exactly as it did before."""
    progressive = _jpeg("RGB", (640, 480), progressive=True, quality=90)
    data = {
        "baseline": _jpeg("RGB", (640, 480), quality=90),
        "truncated": progressive[: len(progressive) * 2 // 3],
        "no end marker": progressive[:-2],
        "not a jpeg": b"\x89PNG\r\n\x1a\n" + progressive[8:],
        "empty": b"",
        "header only": progressive[:200],
    }[case]
    assert jpeg_scans.dc_only(data) is None


def test_damaged_files_never_raise():
    """Whatever the bytes, the parser answers bytes or None: it runs before the decoder, which reports the damage."""
    data = _jpeg("RGB", (320, 240), progressive=True, quality=90)
    rng = random.Random(0)
    for _ in range(400):
        bad = bytearray(data)
        where = rng.randrange(len(bad))
        if rng.random() < 0.5:
            bad[where] = rng.randrange(256)
        else:
            del bad[where: where + rng.randrange(1, 300)]
        out = jpeg_scans.dc_only(bytes(bad))
        assert out is None or out.startswith(b"\xff\xd8") and out.endswith(b"\xff\xd9")


def test_load_reads_a_big_progressive_jpeg_through_the_rewrite(tmp_path, monkeypatch):
    """A 2700x2700 progressive JPEG is drafted to 1/8 for a 224 model, so `media.load` decodes the lean copy: the
    same pixels as the whole file, and a baseline one is not rewritten."""
    progressive = tmp_path / "big.jpg"
    progressive.write_bytes(_jpeg("RGB", (2700, 2700), progressive=True, quality=90))
    baseline = tmp_path / "base.jpg"
    baseline.write_bytes(_jpeg("RGB", (2700, 2700), quality=90))
    spec = media.PreprocessSpec(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    calls: list[int] = []
    real = jpeg_scans.dc_only
    monkeypatch.setattr(jpeg_scans, "dc_only", lambda data: calls.append(len(data)) or real(data))
    lean = media.load(progressive, spec).pixels
    media.load(baseline, spec)
    assert calls == [progressive.stat().st_size]
    monkeypatch.setattr(jpeg_scans, "dc_only", lambda data: None)
    assert np.array_equal(lean, media.load(progressive, spec).pixels)


def test_real_progressive_photos_load_to_the_same_pixels_with_and_without_the_rewrite(monkeypatch):
    """The shared photos hold four big progressive JPEGs decoded at 1/8 (a quarter of the folder's decoding time
    before the rewrite): each comes out pixel for pixel as from the whole file."""
    paths = [p for p in sorted(media.iter_images(shared("photos"))) if Image.open(p).info.get("progressive")]
    spec = media.PreprocessSpec(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    real = jpeg_scans.dc_only
    rewritten: list[bool] = []

    def spy(data: bytes) -> bytes | None:
        out = real(data)
        rewritten.append(out is not None)
        return out

    monkeypatch.setattr(jpeg_scans, "dc_only", spy)
    lean = [media.load(p, spec).pixels for p in paths]
    monkeypatch.setattr(jpeg_scans, "dc_only", lambda data: None)
    whole = [media.load(p, spec).pixels for p in paths]
    assert sum(rewritten) >= 4
    assert all(np.array_equal(a, b) for a, b in zip(lean, whole))
