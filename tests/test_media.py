"""The media room: scanning, decoding, and preprocessing that must equal open_clip's own, image for image."""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from clipsearch import media
from clipsearch.media import MediaError, PreprocessSpec

from conftest import REPO, SHARED_DATA, shared

CLIP_SPEC = PreprocessSpec(
    size=(224, 224),
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
)
COSINE_MIN = 0.999


# ------------------------------------------------------------------------------------------------------------ helpers


def _spec(model) -> PreprocessSpec:
    return PreprocessSpec.from_open_clip(model.visual.preprocess_cfg)


def _embed(model, inputs: list[np.ndarray], batch: int = 32) -> np.ndarray:
    """Unit embeddings of (3, H, W) float32 inputs, several at a time."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            x = torch.from_numpy(np.stack(inputs[i:i + batch]))
            out.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy())
    return np.concatenate(out)


def _reference_image(path: Path) -> Image.Image:
    """What a careful open_clip user would feed preprocess: full decode, EXIF orientation, our mode normalisation
    only where the mode is not plain RGB/L (so the comparison checks geometry, draft decoding and normalisation)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
    if im.mode not in ("RGB", "L") or im.has_transparency_data:
        im = media.to_rgb(im)
    return im


def _draft_shrinks(path: Path, spec: PreprocessSpec) -> bool:
    """Whether JPEG draft decoding can scale this file down while keeping DRAFT_FACTOR x the input size (header only)."""
    want = math.ceil(media.DRAFT_FACTOR * max(spec.size))
    with Image.open(path) as im:
        before = im.size
        im.draft("RGB", (want, want))
        return im.size != before


def _near(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _noise_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth gradients, a few shapes, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / width * 6.0) * np.cos(y / height * 4.0)
    g = 255 * x / width
    b = 255 * (1 - y / height)
    arr = np.stack([r, g, b], -1)
    arr[height // 4: height // 2, width // 5: width // 3] = (250, 20, 30)
    arr[height // 2: height * 3 // 4, width // 2: width * 4 // 5] = (10, 10, 10)
    arr += rng.normal(0, 12, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------- 1. preprocessing equals open_clip's own


def test_preprocessing_matches_open_clip_on_real_photos(vitb32_random, record_property):
    model, preprocess = vitb32_random
    spec = _spec(model)
    assert spec == CLIP_SPEC
    files = sorted(p for folder in ("photos", "named") for p in shared(folder).rglob("*") if p.is_file())

    manifest = {}  # EXIF capture dates recorded by the data's publisher, "YYYY:MM:DD HH:MM:SS"
    for line in (shared("photos") / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        date = (row.get("exif_datetime") or "").strip("\x00 ")
        if date[:4].isdigit() and date[:4] != "0000":
            manifest[shared("photos") / row["image"]] = date.replace(":", "-", 2).replace(" ", "T")

    names, refs, ours, drafted = [], [], [], []
    for path in files:
        try:
            ref_img = _reference_image(path)
        except Exception:  # noqa: BLE001 - not decodable by Pillow (labels, manifests, not-an-image.txt)
            continue
        decoded = media.load(path, spec)  # everything Pillow decodes, we decode
        assert (decoded.width, decoded.height) == ref_img.size, path
        if path in manifest:
            assert decoded.taken == manifest[path], path
        names.append(str(path.relative_to(SHARED_DATA)))
        refs.append(preprocess(ref_img).numpy())
        ours.append(media.to_model_input(decoded.pixels[None], spec)[0])
        drafted.append(decoded.format in ("JPEG", "MPO") and _draft_shrinks(path, spec))
    assert len(names) >= 190, f"only {len(names)} decodable files in photos/ and named/"
    assert sum(drafted) >= 30  # the big camera JPEGs really went through draft decoding
    assert len(manifest) >= 100

    # Raw tensors: bit-identical where no draft was involved (PNG, GIF, small JPEGs...), so their embeddings are the
    # reference's exactly (cosine 1); close where draft decoding was used, and those go through the model.
    for name, ref, our, was_drafted in zip(names, refs, ours, drafted):
        diff = np.abs(ref - our)
        if was_drafted:
            assert diff.mean() < 0.1, (name, float(diff.mean()))
        else:
            assert diff.max() == 0.0, (name, float(diff.max()))

    idx = [i for i, was_drafted in enumerate(drafted) if was_drafted]
    cos = np.sum(_embed(model, [refs[i] for i in idx]) * _embed(model, [ours[i] for i in idx]), axis=1)
    order = np.argsort(cos)
    worst = [(names[idx[i]], round(float(cos[i]), 6)) for i in order[:3]]
    record_property("worst_cosine", worst)
    print(f"\n{len(names)} images ({len(idx)} drafted), worst cosine vs open_clip: {worst}")
    assert cos.min() >= COSINE_MIN, worst


@pytest.mark.parametrize(
    "size,resize_mode,interpolation,fill",
    [
        (224, "shortest", "bicubic", 0),
        (224, "shortest", "bilinear", 0),
        ((224, 320), "shortest", "bilinear", 0),  # open_clip's ResizeKeepRatio path (always bicubic)
        ((256, 192), "shortest", "bicubic", 0),
        (224, "longest", "bicubic", 0),
        ((256, 192), "longest", "bilinear", 128),
        (224, "squash", "bicubic", 0),
        ((192, 256), "squash", "bilinear", 0),
    ],
)
def test_preprocess_pixels_equals_open_clip_transform(size, resize_mode, interpolation, fill):
    from open_clip.transform import image_transform

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = image_transform(size, is_train=False, mean=mean, std=std, resize_mode=resize_mode,
                                interpolation=interpolation, fill_color=fill)
    spec = PreprocessSpec.from_open_clip({"size": size, "mean": mean, "std": std, "interpolation": interpolation,
                                          "resize_mode": resize_mode, "fill_color": fill})
    for i, (w, h) in enumerate([(300, 200), (200, 300), (224, 224), (100, 50), (999, 37), (37, 999), (257, 255)]):
        img = _noise_photo(w, h, seed=i)
        ref = transform(img).numpy()
        ours = media.to_model_input(media.preprocess_pixels(img, spec)[None], spec)[0]
        assert ours.shape == ref.shape == (3, *spec.size)
        assert np.abs(ours - ref).max() <= 1e-6, (w, h)


def test_extreme_panorama_is_close_without_the_huge_intermediate():
    from open_clip.transform import image_transform

    img = _noise_photo(20000, 50)  # open_clip would resize this to 89600 x 224 first
    ref = image_transform(224, is_train=False)(img).numpy()
    ours = media.to_model_input(media.preprocess_pixels(img, CLIP_SPEC)[None], CLIP_SPEC)[0]
    assert np.abs(ours - ref).mean() < 0.01
    assert np.abs(ours - ref).max() < 0.1  # a few 8-bit steps at most


def test_spec_from_open_clip_config():
    spec = PreprocessSpec.from_open_clip({"size": 336, "mode": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                          "interpolation": "random", "resize_mode": "squash", "fill_color": 7})
    assert spec == PreprocessSpec((336, 336), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "squash", 7)
    assert PreprocessSpec.from_open_clip({"size": (256, 320)}).size == (256, 320)
    with pytest.raises(ValueError):
        PreprocessSpec((224, 224), (0, 0, 0), (1, 1, 1), interpolation="lanczos")


def test_to_model_input_layout_and_values():
    batch = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    batch[1, 0, 0] = (255, 0, 51)
    x = media.to_model_input(batch, CLIP_SPEC)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert x[1, 0, 0, 0] == pytest.approx((1.0 - CLIP_SPEC.mean[0]) / CLIP_SPEC.std[0])
    assert x[1, 2, 0, 0] == pytest.approx((0.2 - CLIP_SPEC.mean[2]) / CLIP_SPEC.std[2])
    assert x[0, 1, 3, 4] == pytest.approx(-CLIP_SPEC.mean[1] / CLIP_SPEC.std[1])


@pytest.mark.parametrize("mean, std", [(CLIP_SPEC.mean, CLIP_SPEC.std), ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_to_model_input_equals_torchvision_bit_for_bit_at_every_level(mean, std):
    """The lookup table must reproduce ToTensor + Normalize exactly, for all 256 levels of each channel."""
    from torchvision.transforms import functional as F

    spec = PreprocessSpec((16, 48), mean, std)
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = np.stack([np.tile(levels, (1, 3)), np.tile(levels.T, (1, 3)), np.tile(255 - levels, (1, 3))], axis=-1)
    ours = media.to_model_input(img, spec)[0]
    ref = F.normalize(F.to_tensor(img), mean, std).numpy()
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref)
    with pytest.raises(TypeError, match="uint8"):  # a float array would index the table with nonsense
        media.to_model_input(img.astype(np.float32), spec)


# -------------------------------------------------------------------------------------------------- 2. broken files


def test_every_broken_file_is_a_media_error_with_a_short_reason():
    folder = shared("broken")
    entries = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert len(entries) >= 80
    for entry in entries:
        path = folder / entry["image"]
        with pytest.raises(MediaError) as info:
            media.load(path, CLIP_SPEC)
        reason = str(info.value)
        assert reason and "\n" not in reason and len(reason) <= 200 and str(folder) not in reason, (path, reason)
        out_path, decoded, why = media.decode(str(path), CLIP_SPEC)
        assert (out_path, decoded, why) == (str(path), None, reason)


@pytest.mark.parametrize("kind,expected", [
    ("empty", "0-byte file"),
    ("directory", "is a directory"),
    ("missing", "file not found"),
    ("text", "not an image (cannot identify image file)"),
    ("truncated", "truncated JPEG (image file is truncated)"),
    ("fifo", "not a regular file"),
])
def test_bad_inputs_have_clear_reasons(tmp_path, kind, expected):
    path = tmp_path / "x.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is definitely not an image")
    elif kind == "truncated":
        buf = io.BytesIO()
        _noise_photo(300, 200).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(path)
    with pytest.raises(MediaError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        media.load(path, CLIP_SPEC)
    assert media.decode(str(path), CLIP_SPEC) == (str(path), None, expected)


def test_unreadable_file_is_permission_denied(tmp_path):
    path = _save(_noise_photo(40, 30), tmp_path / "locked.png")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod cannot make a file unreadable")
        assert media.decode(str(path), CLIP_SPEC)[2] == "permission denied"
    finally:
        path.chmod(0o644)


def test_permission_denied_reason_even_as_root(tmp_path, monkeypatch):
    path = _save(_noise_photo(40, 30), tmp_path / "locked.png")

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(media, "open", refuse, raising=False)  # shadows the builtin inside media only
    assert media.decode(str(path), CLIP_SPEC) == (str(path), None, "permission denied")


def _small_samples() -> dict[str, bytes]:
    out = {}
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        _noise_photo(24, 16).save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


SAMPLES = _small_samples()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(SAMPLES)), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6))
def test_decode_never_raises_on_damaged_files(tmp_path, fmt, cut, flips):
    data = bytearray(SAMPLES[fmt])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = data[: max(1, int(len(data) * cut))] if cut < 0.999 else data
    path = tmp_path / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(data))
    out_path, decoded, reason = media.decode(str(path), CLIP_SPEC)
    assert out_path == str(path)
    assert (decoded is None) != (reason is None)
    if decoded is not None:
        assert decoded.pixels.shape == (224, 224, 3) and decoded.pixels.dtype == np.uint8
    else:
        assert reason and "\n" not in reason


# ------------------------------------------------------------------------------------------- 3. synthetic images


def test_palette_png_with_transparency_goes_on_white(tmp_path):
    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    img.paste(1, (4, 0, 8, 2))
    img.paste(2, (4, 2, 8, 4))
    path = _save(img, tmp_path / "p.png", transparency=bytes([0, 255, 128]))
    out = media.open_image(path)
    assert out.mode == "RGB" and out.size == (8, 4)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent index -> white, not black
    assert out.getpixel((6, 0)) == (255, 0, 0)
    assert _near(out.getpixel((6, 3)), (127, 127, 255), 2)  # half-transparent blue over white


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30])
    out = media.open_image(_save(img, tmp_path / "p.gif"))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (10, 200, 30)


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (6, 2), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (2, 0, 4, 2))
    img.paste((255, 0, 0, 128), (4, 0, 6, 2))
    out = media.open_image(_save(img, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 0)) == (0, 0, 255)
    assert _near(out.getpixel((5, 1)), (255, 127, 127), 2)


def test_la_is_composited_on_white(tmp_path):
    img = Image.new("LA", (3, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (0, 255))
    img.putpixel((2, 0), (0, 128))
    out = media.open_image(_save(img, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)
    assert _near(out.getpixel((2, 0)), (127, 127, 127), 2)


def test_cmyk_jpeg_colours(tmp_path):
    img = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red
    img.paste((255, 0, 0, 0), (16, 0, 32, 16))  # cyan
    path = _save(img, tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = media.open_image(path)
    assert _near(out.getpixel((4, 8)), (255, 0, 0))
    assert _near(out.getpixel((28, 8)), (0, 255, 255))
    assert media.load(path, CLIP_SPEC).format == "JPEG"


def test_16_bit_grayscale_keeps_its_value_range(tmp_path):
    arr = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = media.open_image(_save(img, tmp_path / "g16.png"))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]
    tiff = media.open_image(_save(Image.fromarray(np.full((4, 4), 32768, np.uint16)), tmp_path / "g16.tif"))
    assert tiff.getpixel((1, 1)) == (128, 128, 128)


def test_high_bit_depth_modes_by_value_range():
    big_endian = Image.frombytes("I;16B", (2, 2), np.full((2, 2), 32768, ">u2").tobytes())  # e.g. TIFF from a Mac
    assert media.to_rgb(big_endian).getpixel((0, 0)) == (128, 128, 128)
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    assert [media.to_rgb(as_int).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [media.to_rgb(unit_float).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_one_bit_image(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((1, 0), 1)
    out = media.open_image(_save(img, tmp_path / "bw.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("ext", [".gif", ".webp", ".png"])
def test_animation_uses_first_frame(tmp_path, ext):
    red, blue = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    kwargs = {"lossless": True} if ext == ".webp" else {}
    path = _save(red, tmp_path / f"anim{ext}", save_all=True, append_images=[blue], duration=100, loop=0, **kwargs)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 2
    out = media.open_image(path)
    assert _near(out.getpixel((10, 5)), (255, 0, 0), 4)
    decoded = media.load(path, CLIP_SPEC)
    assert _near(decoded.pixels[112, 112], (255, 0, 0), 4)


# Where the stored top-left corner ends up once displayed (EXIF orientation semantics), for a 64x32 stored image.
ORIENTATIONS = {1: ("tl", False), 2: ("tr", False), 3: ("br", False), 4: ("bl", False),
                5: ("tl", True), 6: ("tr", True), 7: ("br", True), 8: ("bl", True)}


def _marker_jpeg(path: Path, orientation: int, size=(64, 32)) -> Path:
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[274] = orientation
    return _save(img, path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation(tmp_path, orientation):
    corner, swapped = ORIENTATIONS[orientation]
    path = _marker_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    out = media.open_image(path)
    w, h = out.size
    assert (w, h) == ((32, 64) if swapped else (64, 32))
    points = {"tl": (4, 4), "tr": (w - 5, 4), "bl": (4, h - 5), "br": (w - 5, h - 5)}
    for name, xy in points.items():
        expected = (255, 0, 0) if name == corner else (0, 0, 255)
        assert _near(out.getpixel(xy), expected, 40), (orientation, name, out.getpixel(xy))
    decoded = media.load(path, CLIP_SPEC)
    assert (decoded.width, decoded.height) == (w, h)


def _dated_jpeg(path: Path, original=None, digitized=None, ifd0=None) -> Path:
    exif = Image.Exif()
    if ifd0 is not None:
        exif[306] = ifd0
    sub = exif.get_ifd(0x8769)
    if original is not None:
        sub[36867] = original
    if digitized is not None:
        sub[36868] = digitized
    return _save(_noise_photo(40, 30), path, exif=exif)


@pytest.mark.parametrize("tags,taken", [
    ({"original": "2019:07:14 10:20:30", "ifd0": "2020:01:01 00:00:00"}, "2019-07-14T10:20:30"),
    ({"original": "0000:00:00 00:00:00"}, None),
    ({"original": "    :  :     :  :  ", "digitized": "2018:02:03 04:05:06"}, "2018-02-03T04:05:06"),
    ({"ifd0": "2017:12:31 23:59:59"}, "2017-12-31T23:59:59"),
    ({"original": "2019:13:45 10:20:30"}, None),
    ({}, None),
])
def test_taken_date(tmp_path, tags, taken):
    path = _dated_jpeg(tmp_path / "d.jpg", **tags)
    assert media.load(path, CLIP_SPEC).taken == taken


def test_heic(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    if not pillow_heif.libheif_info().get("HEIF"):
        pytest.skip("this libheif build cannot encode HEIC")
    assert ".heic" in media.IMAGE_EXTENSIONS and ".heif" in media.IMAGE_EXTENSIONS
    img = Image.new("RGB", (64, 48), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    path = tmp_path / "x.heic"
    img.save(path, format="HEIF", quality=95)
    decoded = media.load(path, CLIP_SPEC)
    assert decoded.format == "HEIF" and (decoded.width, decoded.height) == (64, 48)
    out = media.open_image(path)
    assert _near(out.getpixel((4, 4)), (255, 0, 0), 30) and _near(out.getpixel((60, 40)), (0, 0, 255), 30)


@pytest.mark.parametrize("ext,fmt,kwargs", [
    (".webp", "WEBP", {"lossless": True}),
    (".bmp", "BMP", {}),
    (".tif", "TIFF", {}),
    (".tiff", "TIFF", {"compression": "tiff_lzw"}),
    (".png", "PNG", {}),
    (".avif", "AVIF", {"quality": 95}),
])
def test_other_formats(tmp_path, ext, fmt, kwargs):
    if ext not in media.IMAGE_EXTENSIONS:
        pytest.skip(f"{fmt} cannot be decoded here")
    img = Image.new("RGB", (50, 30), (20, 200, 40))
    path = tmp_path / f"x{ext}"
    try:
        img.save(path, format=fmt, **kwargs)
    except (KeyError, OSError) as exc:
        pytest.skip(f"Pillow cannot write {fmt} here: {exc}")
    decoded = media.load(path, CLIP_SPEC)
    assert decoded.format == fmt and (decoded.width, decoded.height) == (50, 30)
    assert _near(decoded.pixels[100, 100], (20, 200, 40), 10)


def test_image_extensions():
    exts = media.IMAGE_EXTENSIONS
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"} <= exts
    assert all(e == e.lower() and e.startswith(".") for e in exts)
    assert exts <= {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}


# ------------------------------------------------------------------------------------ 4. draft mode and bombs


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    return _save(_noise_photo(4000, 3000, seed=7), tmp_path_factory.mktemp("big") / "big.jpg", quality=92)


def test_draft_decoding_is_smaller_and_stays_faithful(big_jpeg, vitb32_random):
    model, preprocess = vitb32_random
    spec = _spec(model)
    small = media.open_image(big_jpeg, spec.size)
    assert small.size[0] < 4000 and small.size[1] < 3000  # DCT-scaled
    assert min(small.size) >= media.DRAFT_FACTOR * 224  # ... but never below the factor
    assert media.open_image(big_jpeg).size == (4000, 3000)
    decoded = media.load(big_jpeg, spec)
    assert (decoded.width, decoded.height) == (4000, 3000)  # the real size, not the draft's

    with Image.open(big_jpeg) as im:
        ref = preprocess(im.convert("RGB")).numpy()
    ours = media.to_model_input(decoded.pixels[None], spec)[0]
    a, b = _embed(model, [ref, ours])
    assert float(a @ b) >= COSINE_MIN


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize("size", [(1773, 1181), (1181, 1773), (3001, 2001)])
def test_draft_keeps_the_full_images_geometry(tmp_path, size):
    """A side that is not a multiple of the DCT scale is rounded up by libjpeg (1181 rows at 1/2 give 591): sizes and
    crops are still the full image's, so the shapes' edges land where a full decode puts them (from the scaled size,
    edges moved by up to 69 levels: 40.7-45.0 dB)."""
    path = _save(_noise_photo(*size, seed=3), tmp_path / "odd.jpg", quality=95)
    assert media.open_image(path, CLIP_SPEC.size).size != size  # drafted
    full = media.preprocess_pixels(media.open_image(path), CLIP_SPEC)
    drafted = media.load(path, CLIP_SPEC).pixels
    assert np.abs(drafted.astype(int) - full).max() <= 12 and _psnr(drafted, full) >= 48


def test_draft_geometry_on_a_real_photo_with_an_odd_side():
    """Canon EOS D60, 1772x1181, decoded at 1/2: 28.8 dB against a full decode when the geometry came from the 886x591
    draft, 53.6 dB now."""
    path = next(shared("photos").rglob("Canon EOS D60.jpg"))
    full = media.preprocess_pixels(media.open_image(path), CLIP_SPEC)
    assert _psnr(media.load(path, CLIP_SPEC).pixels, full) >= 45


def test_draft_box_is_the_region_holding_the_full_picture(tmp_path):
    """The box Pillow's draft returns: 886 x 590.5 for 1772x1181 at 1/2 (its last row half padding), the whole image
    at an exact scale, none for a full decode or a file that is not drafted."""
    odd = _save(_noise_photo(1772, 1181), tmp_path / "odd.jpg", quality=90)
    exact = _save(_noise_photo(4000, 3000), tmp_path / "exact.jpg", quality=90)
    png = _save(_noise_photo(1772, 1181), tmp_path / "odd.png")
    assert media._decode_file(odd, CLIP_SPEC.size).box == (0, 0, 886.0, 590.5)
    assert media._decode_file(exact, CLIP_SPEC.size).box == (0, 0, 500.0, 375.0)
    assert media._decode_file(odd, None).box is None  # full size
    assert media._decode_file(png, CLIP_SPEC.size).box is None  # not a JPEG: its own size is the geometry


def test_a_drafted_image_is_resized_over_the_kept_region_only(tmp_path, monkeypatch):
    """A draft-decoded image is not bit-identical to torchvision's anyway, so only the centre crop is resampled (no
    298-wide intermediate for a 4:3 photo), and the result stays within a few levels of resizing it all."""
    path = _save(_noise_photo(4000, 3000, seed=5), tmp_path / "wide.jpg", quality=90)
    opened = media._decode_file(path, CLIP_SPEC.size)
    assert opened.box is not None  # drafted
    sizes: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def spy(self: Image.Image, size: tuple[int, int], *args, **kwargs) -> Image.Image:
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    cropped = media.preprocess_pixels(opened.image, CLIP_SPEC, full_size=opened.full_size, box=opened.box)
    assert sizes == [(224, 224)]
    whole = resize(opened.image, (298, 224), Image.Resampling.BICUBIC, box=opened.box).crop((37, 0, 261, 224))
    assert np.abs(cropped.astype(int) - np.asarray(whole)).max() <= 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_geometry_holds_for_every_exif_orientation(tmp_path, orientation):
    """Turning or flipping a draft-decoded image upright moves the half-padding row or column from the end to the
    start: the box follows it (taken as at the end, orientations 2-4 and 6-8 came out at 40.7-44.0 dB, edges moved by
    up to 53 levels)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_noise_photo(1773, 1181, seed=3), tmp_path / "turned.jpg", quality=95, exif=exif)
    full = media.preprocess_pixels(media.open_image(path), CLIP_SPEC)
    drafted = media.load(path, CLIP_SPEC).pixels
    assert np.abs(drafted.astype(int) - full).max() <= 12 and _psnr(drafted, full) >= 48


def test_draft_respects_rotation(tmp_path):
    """Draft scales the stored image: for orientations 5-8 the requested sides must be swapped."""
    path = _marker_jpeg(tmp_path / "rot.jpg", 6, size=(4000, 2000))
    min_h, min_w = 224, 448
    out = media.open_image(path, (min_h, min_w))
    w, h = out.size
    assert h > w  # displayed portrait
    assert w >= media.DRAFT_FACTOR * min_w and h >= media.DRAFT_FACTOR * min_h
    assert w * h < 2000 * 4000
    assert _near(out.getpixel((w - 5, 5)), (255, 0, 0), 40)  # stored top-left -> displayed top-right


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))  # 30 GB of RGB if anyone tried
    start = time.perf_counter()
    reason = media.decode(str(path), CLIP_SPEC)[2]
    assert reason is not None and reason.startswith("too large")
    assert time.perf_counter() - start < 2


def test_pixel_limit_applies_after_draft(tmp_path, big_jpeg, monkeypatch):
    monkeypatch.setattr(media, "MAX_PIXELS", 1_000_000)
    png = _save(_noise_photo(2000, 1000), tmp_path / "wide.png")
    assert media.decode(str(png), CLIP_SPEC)[2] == "too large: 2000x1000 pixels"
    with pytest.raises(MediaError, match="too large: 4000x3000 pixels"):
        media.open_image(big_jpeg)  # no draft asked for: the full size counts
    assert media.load(big_jpeg, CLIP_SPEC).width == 4000  # draft brings it to 1000x750


def test_pillows_limit_and_its_warning_refuse_other_formats_but_not_a_drafted_jpeg(tmp_path, big_jpeg, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # warns above 1 MP, refuses above 2 MP
    warn_band = _save(_noise_photo(1200, 1000), tmp_path / "warn.png")
    error_band = _save(_noise_photo(2000, 1500), tmp_path / "error.png")
    assert media.decode(str(warn_band), CLIP_SPEC)[2] == "too large: 1200000 pixels"  # the warning is an error
    assert media.decode(str(error_band), CLIP_SPEC)[2] == "too large: 3000000 pixels"
    # A JPEG far over Pillow's limit: its header is read directly and draft decoding keeps the cost small.
    assert media.decode(str(big_jpeg), CLIP_SPEC)[2] is None
    assert Image.MAX_IMAGE_PIXELS == 1_000_000  # nothing global was changed behind our back


# ---------------------------------------------------------------------------------------------------- 5. scanning


def _touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def photo_tree(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "photos"
    outside = tmp_path / "elsewhere"
    wanted = [
        "a.jpg", "a.b.jpg", "a/z.jpg", "B.JPG", "c.Png", "e.jpeg", "f.WEBP", "sub/deep/g.gif", "sub/h.tif",
        "x.jpg/inner.png", "Ünïcode café.heic", "sub/deep/deeper/i.bmp",
    ]
    for rel in wanted:
        _touch(root / rel)
    for rel in ["d.txt", "README", "noext", ".hidden.jpg", "._x.jpg", ".hiddendir/h.jpg", "@eaDir/i.jpg",
                "$RECYCLE.BIN/j.jpg", "System Volume Information/k.jpg", "#recycle/l.jpg", ".Trash-1000/m.jpg",
                "lost+found/n.jpg", "__MACOSX/o.jpg", ".thumbnails/t.jpg", "sub/@eaDir/SYNOFILE_THUMB_M.jpg",
                "sub/thumbs.db"]:
        _touch(root / rel)
    _touch(outside / "linked.jpg")
    _touch(outside / "dir" / "r.jpg")
    (root / "link_file.jpg").symlink_to(outside / "linked.jpg")
    (root / "link_dir").symlink_to(outside / "dir", target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a link to an ancestor
    (root / "sub" / "deep" / "loop2").symlink_to(root / "sub", target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "nope.jpg")
    (root / "x.jpg" / "again").symlink_to(root / "a", target_is_directory=True)  # a second path to a/
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.jpg")
    wanted += ["link_file.jpg", "link_dir/r.jpg"]
    return root, sorted(str(root / rel) for rel in wanted)


def test_iter_images_finds_each_image_once_in_sorted_order(photo_tree):
    root, expected = photo_tree
    errors: list[tuple[str, str]] = []
    found = list(media.iter_images(root, on_error=lambda p, why: errors.append((p, why))))
    assert found == expected
    assert found == sorted(found)
    assert errors == []


def test_iter_images_paths_are_absolute_but_not_resolved(photo_tree, tmp_path, monkeypatch):
    root, expected = photo_tree
    monkeypatch.chdir(tmp_path)
    assert list(media.iter_images("photos")) == expected
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert list(media.iter_images(alias)) == [p.replace(str(root), str(alias), 1) for p in expected]


def test_iter_images_root_that_is_a_file(photo_tree):
    root, _ = photo_tree
    assert list(media.iter_images(root / "B.JPG")) == [str(root / "B.JPG")]
    assert list(media.iter_images(root / "d.txt")) == []
    assert list(media.iter_images(root / "x.jpg")) == [str(root / "x.jpg" / "again" / "z.jpg"),
                                                      str(root / "x.jpg" / "inner.png")]


def test_iter_images_missing_root_is_an_error_not_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(media.iter_images(tmp_path / "unplugged"))


def test_iter_images_reports_unreadable_folders(photo_tree, monkeypatch):
    root, expected = photo_tree
    blocked = str(root / "sub")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    errors: list[tuple[str, str]] = []
    found = list(media.iter_images(root, on_error=lambda p, why: errors.append((p, why))))
    assert errors == [(blocked, "permission denied")]
    assert found == [p for p in expected if not p.startswith(blocked + os.sep)]


def test_iter_images_unreadable_folder_for_real(tmp_path):
    root = tmp_path / "r"
    _touch(root / "ok.jpg")
    _touch(root / "locked" / "secret.jpg")
    (root / "locked").chmod(0)
    try:
        if os.access(root / "locked", os.R_OK):
            pytest.skip("running as root: chmod cannot make a folder unreadable")
        errors: list[tuple[str, str]] = []
        assert list(media.iter_images(root, on_error=lambda p, why: errors.append((p, why)))) == [str(root / "ok.jpg")]
        assert errors == [(str(root / "locked"), "permission denied")]
    finally:
        (root / "locked").chmod(0o755)


# ------------------------------------------------------------------------------------------------- 6. fingerprint


def test_fingerprint_recognises_copies_and_changes(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 1_000_000, dtype=np.uint8).tobytes()
    original = tmp_path / "a.jpg"
    original.write_bytes(data)
    copy = tmp_path / "sub" / "renamed.jpeg"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    fp = media.fingerprint(original)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert media.fingerprint(copy) == fp

    def changed(at: int) -> str:
        edited = bytearray(data)
        edited[at] ^= 0x01
        path = tmp_path / f"edit{at}.jpg"
        path.write_bytes(bytes(edited))
        return media.fingerprint(path)

    for at in (0, 65535, len(data) // 2, len(data) - 1):  # head, end of head, middle, tail
        assert changed(at) != fp, at
    assert changed(200_000) == fp  # between the sampled chunks: the price of reading only 192 KiB
    (tmp_path / "longer.jpg").write_bytes(data + b"\0")
    assert media.fingerprint(tmp_path / "longer.jpg") != fp


def test_fingerprint_small_and_empty_files(tmp_path):
    small = tmp_path / "s.png"
    small.write_bytes(bytes(range(256)) * 700)  # 179 KB: hashed whole
    fp = media.fingerprint(small)
    small.write_bytes(bytes(range(256)) * 350 + b"\xff" + (bytes(range(256)) * 350)[1:])
    assert media.fingerprint(small) != fp
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    other_empty = tmp_path / "f.jpg"
    other_empty.write_bytes(b"")
    assert media.fingerprint(empty) == media.fingerprint(other_empty)
    assert len(media.fingerprint(empty)) == 32


def test_fingerprint_of_a_huge_file_is_quick(tmp_path):
    path = tmp_path / "huge.tif"
    with open(path, "wb") as f:
        f.truncate(8 * 1024**3)  # sparse: 8 GiB that costs nothing on disk
    start = time.perf_counter()
    fp = media.fingerprint(path)
    assert time.perf_counter() - start < 1.0
    with open(path, "r+b") as f:
        f.seek(4 * 1024**3 - 10)
        f.write(b"\x01")
    assert media.fingerprint(path) != fp


# ------------------------------------------------------------------------------------- 7. workers and imports


def test_decode_works_in_spawned_worker_processes(tmp_path):
    good = _save(_noise_photo(300, 200), tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    paths = [str(good), str(bad), str(good)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = list(pool.map(media.decode, paths, [CLIP_SPEC] * len(paths)))
    assert [r[0] for r in results] == paths
    assert results[1][1] is None and results[1][2] == "not an image (cannot identify image file)"
    local = media.load(good, CLIP_SPEC)
    for _path, decoded, reason in (results[0], results[2]):
        assert reason is None
        assert np.array_equal(decoded.pixels, local.pixels) and decoded.width == 300


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process niceness on this platform")
def test_a_worker_told_to_yield_drops_to_the_lowest_priority_for_good(tmp_path):
    """Chunks sent while the model still loads decode at full priority; the first sent beside a CPU model lowers the
    worker, which stays low (it could not come back up) and decodes exactly as before."""
    good = str(_save(_noise_photo(300, 200), tmp_path / "good.jpg"))
    own = os.getpriority(os.PRIO_PROCESS, 0)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        def priority() -> int:
            return pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result()

        first = pool.submit(media.decode_many, [good], CLIP_SPEC, False).result()
        assert priority() == own
        lowered = pool.submit(media.decode_many, [good], CLIP_SPEC, True).result()
        assert priority() == media.YIELDING_NICENESS
        pool.submit(media.decode_many, [good], CLIP_SPEC, False).result()
        assert priority() == media.YIELDING_NICENESS
    assert np.array_equal(first[0][1].pixels, lowered[0][1].pixels)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own


def test_importing_media_does_not_import_torch():
    code = ("import sys, clipsearch.media; "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
