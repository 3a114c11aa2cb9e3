"""Image-tower precision: bf16/fp16 vectors of real photos match fp32, forced choices are honoured, auto follows the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import clipsearch
from clipsearch import media
from clipsearch import model as model_room
from clipsearch.errors import ModelError
from clipsearch.model import ClipModel, ModelSpec, cpu_flags, resolve_precision
from conftest import TINY_MODEL, shared


def photo_batch(spec: media.PreprocessSpec, n: int = 6) -> np.ndarray:
    paths = sorted(media.iter_images(shared("photos")))[:n]
    return media.to_model_input(np.stack([media.load(p, spec).pixels for p in paths]), spec)


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoint):
    spec = ModelSpec(TINY_MODEL, str(tiny_checkpoint))
    return {p: ClipModel(spec, device="cpu", precision=p) for p in ("fp32", "bf16", "fp16")}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_vectors_of_real_photos_match_fp32(tiny_models, precision):
    x = photo_batch(tiny_models["fp32"].preprocess)
    reference = tiny_models["fp32"].encode_images(x)
    got = tiny_models[precision].encode_images(x)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert float((got * reference).sum(axis=1).min()) >= 0.999


def test_forced_precision_is_honoured_and_text_stays_fp32(tiny_models):
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    texts = ["a dog", "two cats on a sofa"]
    for precision, model in tiny_models.items():
        assert model.precision == precision
        assert {p.dtype for p in model._net.visual.parameters()} == {dtypes[precision]}
        assert model._net.token_embedding.weight.dtype == torch.float32
        assert np.array_equal(model.encode_texts(texts), tiny_models["fp32"].encode_texts(texts))


def test_identity_does_not_depend_on_precision(tiny_models):
    assert len({m.identity for m in tiny_models.values()}) == 1


def test_auto_follows_this_cpu(tiny_checkpoint):
    """bf16 exactly when the CPU has native bf16 instructions (on one without, bf16 is several times slower)."""
    native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu")
    assert model.precision == ("bf16" if native else "fp32")


@pytest.mark.parametrize("flags, device, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "cpu", "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "cpu", "bf16"),
    ({"avx2", "avx512f"}, "cpu", "fp32"),
    (set(), "cpu", "fp32"),
    ({"avx512_bf16"}, "cuda", "fp16"),
    ({"avx512_bf16"}, "cuda:1", "fp16"),
    ({"avx512_bf16"}, "mps", "fp32"),
])
def test_auto_rules(monkeypatch, flags, device, expected):
    monkeypatch.setattr(model_room, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", device) == expected
    assert resolve_precision("fp32", device) == "fp32" and resolve_precision("bf16", device) == "bf16"


@pytest.mark.parametrize("flags, precision, device, slow", [
    ({"avx512_bf16"}, "fp16", "cpu", True),  # this Zen 4: fp16 3.4 images/s against bf16 38.6
    ({"avx512_bf16", "avx512_fp16"}, "fp16", "cpu", False),
    ({"avx2"}, "bf16", "cpu", True),
    ({"amx_bf16"}, "bf16", "cpu", False),
    ({"avx2"}, "fp32", "cpu", False),
    ({"avx2"}, "fp16", "cuda", False),
])
def test_a_precision_this_cpu_emulates_is_named(monkeypatch, flags, precision, device, slow):
    monkeypatch.setattr(model_room, "cpu_flags", lambda: frozenset(flags))
    warning = model_room.precision_warning(precision, device)
    assert bool(warning) == slow and (not slow or precision in warning and "--precision auto" in warning)


def test_index_says_when_the_forced_precision_is_emulated(tmp_path, tiny_checkpoint, monkeypatch):
    """The run still happens at the precision asked for, with one line saying why it is slow."""
    from test_cli import clip, copy_photos, tiny

    monkeypatch.setattr(model_room, "cpu_flags", lambda: frozenset({"avx2"}))
    copy_photos(tmp_path / "photos", 2)
    result = clip("index", tmp_path / "photos", "--index", tmp_path / "idx", *tiny(tiny_checkpoint),
                  "--precision", "bf16", "--workers", "0")
    assert "no native bf16 math" in result.stderr
    with clipsearch.open(tmp_path / "idx", create=False) as idx:
        assert idx.store.get_meta("precision") == "bf16"


def test_unknown_precision_is_a_model_error(tiny_checkpoint):
    with pytest.raises(ModelError, match="unknown precision 'int4'"):
        ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu", precision="int4")


@pytest.mark.slow
def test_vit_b_32_bf16_matches_fp32_on_real_photos(vitb32_random, tmp_path):
    import torch

    net, _ = vitb32_random
    checkpoint = tmp_path / "vit-b-32.pt"
    torch.save(net.state_dict(), checkpoint)
    spec = ModelSpec("ViT-B-32", str(checkpoint))
    fp32 = ClipModel(spec, device="cpu", precision="fp32")
    x = photo_batch(fp32.preprocess, n=4)
    reference = fp32.encode_images(x)
    del fp32
    got = ClipModel(spec, device="cpu", precision="bf16").encode_images(x)
    assert float((got * reference).sum(axis=1).min()) >= 0.999


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_a_converted_image_tower_leaves_its_float32_pages_to_the_os(vitb32_random, tmp_path):
    """Converting the mapped float32 image tower reads all of it; those pages must not stay resident beside the bf16
    copy (ViT-B-32: they did, 350 MB more at every indexing run's peak). Releasing the image weights before the text
    export frees the bf16 copy too (the parameters go back to the file's float32 pages), and the next image forward
    converts again, to the same vectors."""
    import torch

    net, _ = vitb32_random
    checkpoint = tmp_path / "vit-b-32.pt"
    torch.save(net.state_dict(), checkpoint)
    code = ("import json, os, numpy as np, torch, open_clip; from clipsearch.model import ClipModel, ModelSpec; "
            "page = os.sysconf('SC_PAGE_SIZE'); rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page; "
            "before = rss(); "
            f"m = ClipModel(ModelSpec('ViT-B-32', {str(checkpoint)!r}), device='cpu', precision='bf16'); "
            "grew = rss() - before; x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32); "
            "first = m.encode_images(x); held = rss(); m.release_image_weights(); freed = held - rss(); "
            "again = m.encode_images(x); "
            "print(json.dumps({'grew': grew, 'freed': freed, 'same': bool(np.array_equal(first, again)), "
            "'dtype': str(next(m._net.visual.parameters()).dtype)}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    visual = sum(p.numel() * p.element_size() for p in net.visual.parameters())  # float32 bytes
    assert out["grew"] < 0.75 * visual, (out["grew"], visual)  # the bf16 copy is half of it; with the pages, 1.5x
    assert out["freed"] > 0.4 * visual, (out["freed"], visual)  # the bf16 copy, handed back
    assert out["same"] and out["dtype"] == "torch.bfloat16"
