"""open_clip imported without timm and torch._dynamo, which it drags in and clipsearch does not use: each probe runs in
a new process, since this test process has imported both long ago."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from clipsearch.open_clip_import import stand_in

TIMM_TINY = {  # a timm vision tower small enough to build in a test; text tower as clipsearch-tiny-ViT-32's
    "embed_dim": 64,
    "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _probe(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loading_and_using_a_model_imports_neither_timm_nor_dynamo(tiny_checkpoint, tmp_path):
    """Load, encode images and texts, export the text tower: the whole of an indexing run's use of torch."""
    out = _probe(f"""
        import json, sys
        import numpy as np
        from clipsearch.model import ClipModel, ModelSpec
        from clipsearch.text_onnx import export_text_tower
        model = ClipModel(ModelSpec("clipsearch-tiny-ViT-32", {str(tiny_checkpoint)!r}), device="cpu")
        model.encode_images(np.zeros((2, 3, 224, 224), np.float32))
        model.encode_texts(["a dog"])
        export_text_tower(model, {str(tmp_path / "text.onnx")!r})
        print(json.dumps({{name: name in sys.modules for name in ("open_clip", "timm", "torch._dynamo")}}))
    """)
    assert out == {"open_clip": True, "timm": False, "torch._dynamo": False}


def test_what_was_deferred_still_works_when_asked_for():
    """torchvision's roi_align gets the real dynamo function on its first call; timm and dynamo import normally."""
    out = _probe("""
        import json, sys
        from clipsearch.open_clip_import import import_open_clip
        import_open_clip()
        roi_align = sys.modules["torchvision.ops.roi_align"]
        before = "torch._dynamo" in sys.modules
        answer = roi_align.is_compile_supported("cpu")
        from torch._dynamo.utils import is_compile_supported
        import timm
        print(json.dumps({"before": before, "answer": answer, "real": is_compile_supported("cpu"),
                          "module": type(sys.modules["torch._dynamo.utils"].__spec__).__name__,
                          "timm": bool(timm.__version__)}))
    """)
    assert out.pop("answer") == out.pop("real")
    assert out == {"before": False, "module": "ModuleSpec", "timm": True}


def test_a_version_that_needs_them_at_import_time_is_imported_as_it_comes():
    """Should open_clip (or what it imports) stop treating timm as optional, the import must still succeed."""
    out = _probe("""
        import importlib.abc, json, sys
        class NeedsTimm(importlib.abc.MetaPathFinder):  # open_clip.factory failing as if it imported timm bare
            tried = 0
            def find_spec(self, name, path=None, target=None):
                if name == "open_clip.factory" and sys.modules.get("timm", 0) is None:
                    NeedsTimm.tried += 1
                    raise ImportError("No module named 'timm'")
        sys.meta_path.insert(0, NeedsTimm())
        from clipsearch.open_clip_import import import_open_clip
        open_clip = import_open_clip()
        print(json.dumps({"tried": NeedsTimm.tried, "factory": hasattr(open_clip, "create_model"),
                          "held": "timm" in sys.modules and sys.modules["timm"] is None}))
    """)
    assert out == {"tried": 1, "factory": True, "held": False}


@pytest.mark.slow
@pytest.mark.parametrize("through", ["clipsearch", "open_clip"])
def test_a_timm_vision_tower_still_builds(tmp_path, through):
    """open_clip was imported without timm; building a model whose image tower is a timm one imports it first, through
    clipsearch or through open_clip directly (a library user's own models, in the same process)."""
    from clipsearch.open_clip_import import import_open_clip

    open_clip = import_open_clip()
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "timm-tiny.json").write_text(json.dumps(TIMM_TINY))
    open_clip.add_model_config(configs)
    torch.save(open_clip.create_model("timm-tiny", pretrained=None).state_dict(), tmp_path / "timm.pt")
    checkpoint = str(tmp_path / "timm.pt")
    build = {
        "clipsearch": f"ClipModel(ModelSpec('timm-tiny', {checkpoint!r}), device='cpu', precision='fp32')._net",
        "open_clip": "open_clip.create_model('timm-tiny', pretrained=None)",
    }[through]
    out = _probe(f"""
        import json, sys, torch
        from clipsearch.model import ClipModel, ModelSpec
        from clipsearch.open_clip_import import import_open_clip
        open_clip = import_open_clip()
        open_clip.add_model_config({str(configs)!r})
        timm_before = "timm" in sys.modules
        net = {build}
        print(json.dumps({{"timm_before": timm_before, "timm_after": "timm" in sys.modules,
                          "trunk": type(net.visual.trunk).__module__,
                          "shape": list(net.encode_image(torch.zeros(1, 3, 224, 224)).shape)}}))
    """)
    assert out == {"timm_before": False, "timm_after": True, "trunk": "timm.models.vision_transformer", "shape": [1, 64]}


def test_stand_in_imports_the_real_module_only_when_used(tmp_path, monkeypatch):
    (tmp_path / "heavy_for_test.py").write_text("LOADS = 1\ndef answer(x):\n    return x + LOADS\nCONSTANT = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "heavy_for_test", raising=False)
    with stand_in("heavy_for_test", ("answer",)):
        from heavy_for_test import answer  # what an importer binds while the stand-in holds the name

        assert not hasattr(sys.modules["heavy_for_test"], "__path__")  # an import-system probe is not a use
        assert sys.modules["heavy_for_test"].__spec__ is None
    assert "heavy_for_test" not in sys.modules  # gone once the import it covered is done
    assert answer(1) == 2  # the first call imports the real module
    real = sys.modules["heavy_for_test"]
    assert real.__spec__ is not None and real.answer(1) == 2

    monkeypatch.delitem(sys.modules, "heavy_for_test")
    with stand_in("heavy_for_test", ("answer",)) as module:
        assert module.CONSTANT == 7  # any other name imports the real module at once
        assert sys.modules["heavy_for_test"] is not module
    assert sys.modules["heavy_for_test"].CONSTANT == 7
