"""The ONNX text tower: same vectors as the torch path, no torch on the query side, refuses files of other models."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from clipsearch import text_onnx
from clipsearch.errors import ModelError, ModelMismatch
from clipsearch.model import ClipModel, ModelSpec
from clipsearch.text_onnx import OnnxTextEncoder, export_text_tower
from clipsearch.tokenizer import UnsupportedTokenizer
from conftest import TINY_MODEL

WORDS = ("a an the dog cat child kids beach sunset red blue bicycle mountain snow two three playing running on in at "
         "with near under man woman street city night photo of café 東京 🐶 &amp; it's don't 42 3.5").split()


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Short queries, caption-like sentences, empty and overlong texts, unicode and html entities."""
    rng = random.Random(seed)
    texts = ["", "a", "a dog", "x " * 120, "kids on a beach at sunset", "<start_of_text> <end_of_text>"]
    while len(texts) < n:
        texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 4, 8, 15, 30, 90]))))
    return texts


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    return export_text_tower(tiny_model, tmp_path_factory.mktemp("onnx") / "text.onnx")


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())


def test_onnx_vectors_equal_torch_vectors(tiny_model, tiny_onnx):
    encoder = OnnxTextEncoder(tiny_onnx, identity=tiny_model.identity)
    texts = sample_texts(300)
    got = encoder.encode_texts(texts)
    assert got.dtype == np.float32 and got.shape == (300, tiny_model.dim) and encoder.dim == tiny_model.dim
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert min_cosine(got, tiny_model.encode_texts(texts)) >= 0.999
    assert encoder.context_length == 77 and encoder.identity == tiny_model.identity


def test_padding_is_cut_and_batches_equal_single_texts(tiny_model, tiny_onnx):
    """The trimmed graph runs short texts on a few positions; batched with a long text, each row is the same."""
    encoder = OnnxTextEncoder(tiny_onnx)
    assert encoder._trim
    texts = ["a dog", "x " * 120, "two cats on a red sofa", *sample_texts(20, seed=4)]  # runs of 8, sorted by length
    batched = encoder.encode_texts(texts)
    single = np.concatenate([encoder.encode_texts([t]) for t in texts])
    assert min_cosine(batched, single) >= 0.99999
    assert encoder.encode_texts([]).shape == (0, tiny_model.dim)
    server_side = OnnxTextEncoder(tiny_onnx, long_lived=True, threads=1)  # other session options, same vectors
    assert min_cosine(server_side.encode_texts(texts), batched) >= 0.99999


def test_untrimmed_export_when_the_tower_is_not_plain(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(text_onnx, "_trimmable", lambda net: False)
    path = export_text_tower(tiny_model, tmp_path / "full.onnx")
    encoder = OnnxTextEncoder(path)
    assert not encoder._trim
    texts = sample_texts(40, seed=1)
    assert min_cosine(encoder.encode_texts(texts), tiny_model.encode_texts(texts)) >= 0.999


def test_export_leaves_the_live_model_untouched(tiny_model, tiny_onnx):
    import torch

    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in tiny_model._net.transformer.resblocks)


def test_query_side_imports_no_torch(tiny_model, tiny_onnx):
    code = (
        "import json, sys; from clipsearch.text_onnx import OnnxTextEncoder; "
        f"e = OnnxTextEncoder({str(tiny_onnx)!r}); v = e.encode_texts(['a dog', 'café &amp; 🐶 東京']); "
        "print(json.dumps({'torch': [m for m in ('torch', 'open_clip', 'onnx') if m in sys.modules], 'v': v.tolist()}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] == []
    assert min_cosine(np.array(out["v"], np.float32), tiny_model.encode_texts(["a dog", "café &amp; 🐶 東京"])) >= 0.999


def test_a_file_of_another_model_is_refused(tiny_model, tiny_onnx):
    other = json.dumps({**json.loads(tiny_model.identity), "pretrained": "file:other"}, sort_keys=True)
    with pytest.raises(ModelMismatch, match="another model"):
        OnnxTextEncoder(tiny_onnx, identity=other)
    with pytest.raises(ModelMismatch, match="context length"):
        OnnxTextEncoder(tiny_onnx, context_length=64)
    assert OnnxTextEncoder(tiny_onnx, context_length=77, identity=tiny_model.identity).dim == tiny_model.dim


def test_missing_damaged_or_foreign_files_are_model_errors(tiny_onnx, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        OnnxTextEncoder(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file" * 100)
    with pytest.raises(ModelError, match="cannot load"):
        OnnxTextEncoder(garbage)
    import onnx

    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["tokens"], ["features"])], "g",
                                   [onnx.helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, [1, 77])],
                                   [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.INT64, [1, 77])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(ModelError, match="not a clipsearch text encoder"):
        OnnxTextEncoder(foreign)


def test_vocabulary_is_read_beside_the_session_load(tiny_onnx, monkeypatch):
    """The BPE merges are read in a thread while onnxruntime loads the session; the encoder waits for it (no second
    read, no thread left running), and a vocabulary that cannot be read is the tokenizer's ModelError, raised in the
    caller's thread."""
    import threading

    from clipsearch import tokenizer

    path = tokenizer.bpe_vocab_path()
    tokenizer._merge_ranks.cache_clear()
    reads = []
    monkeypatch.setattr(tokenizer, "bpe_vocab_path", lambda: reads.append(threading.current_thread().name) or path)
    encoder = OnnxTextEncoder(tiny_onnx)
    assert reads[0] == "clipsearch-vocabulary" and tokenizer._merge_ranks.cache_info().misses == 1
    assert not any(t.name == "clipsearch-vocabulary" for t in threading.enumerate())
    assert encoder.encode_texts(["a dog"]).shape == (1, encoder.dim)

    def unreadable():
        raise ModelError("open_clip's bpe_simple_vocab_16e6.txt.gz not found")

    tokenizer._merge_ranks.cache_clear()
    monkeypatch.setattr(tokenizer, "bpe_vocab_path", unreadable)
    with pytest.raises(ModelError, match="not found"):
        OnnxTextEncoder(tiny_onnx)
    tokenizer._merge_ranks.cache_clear()


def test_export_again_replaces_the_weights_file_atomically(tiny_model, tmp_path):
    path = tmp_path / "text.onnx"
    export_text_tower(tiny_model, path)
    first = {p.name for p in tmp_path.iterdir()}
    export_text_tower(tiny_model, path)
    second = {p.name for p in tmp_path.iterdir()}
    assert len(first) == len(second) == 2 and first != second  # graph + one weights file, a new one each time
    assert "text.onnx" in second and OnnxTextEncoder(path).encode_texts(["a dog"]).shape == (1, tiny_model.dim)
    assert os.stat(path).st_mode & 0o777 == os.stat(next(tmp_path.glob("text.onnx.*.data"))).st_mode & 0o777


def test_export_refuses_a_tokenizer_without_torch_free_twin(tiny_model, tmp_path, monkeypatch):
    from open_clip.tokenizer import SimpleTokenizer

    monkeypatch.setattr(tiny_model, "_tokenizer", SimpleTokenizer(clean="canonicalize"))
    with pytest.raises(UnsupportedTokenizer):
        export_text_tower(tiny_model, tmp_path / "text.onnx")
    assert not list(tmp_path.iterdir())


def test_weights_are_written_by_us_folded_and_aligned(tiny_onnx):
    """Every weight is an initializer in the data file; torch Linear's transposes are already applied (no load-time
    folding for a cold query), and big tensors sit at 64 KiB offsets onnxruntime can map."""
    import onnx

    proto = onnx.load(str(tiny_onnx), load_external_data=False)
    initializers = {t.name: t for t in proto.graph.initializer}
    assert [i.name for i in proto.graph.input] == ["tokens"]
    assert not [n for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    assert initializers and all(t.data_location == onnx.TensorProto.EXTERNAL for t in initializers.values())
    spans = sorted((int(e["offset"]), int(e["length"])) for e in
                   ({kv.key: kv.value for kv in t.external_data} for t in initializers.values()))
    assert all(end <= start for (start, _), end in zip(spans[1:], [a + b for a, b in spans]))  # no overlaps
    assert all(offset % 65536 == 0 for offset, length in spans if length > 1 << 20)
    data = next(tiny_onnx.parent.glob(f"{tiny_onnx.name}.*.data"))
    assert data.stat().st_size == max(a + b for a, b in spans)


EXPORT_MEMORY = """
import json, sys
from clipsearch.model import ClipModel, ModelSpec
from clipsearch.text_onnx import export_text_tower
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024
model = ClipModel(ModelSpec("ViT-B-32", sys.argv[1]), device="cpu", precision="fp32")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM, the kernel's own peak: no sampler can miss a spike
before = status("VmRSS")
path = export_text_tower(model, sys.argv[2])
text = sum(p.numel() * 4 for name, p in model._net.named_parameters() if not name.startswith("visual."))
print(json.dumps({"growth": status("VmHWM") - before, "weights": text}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets VmHWM through /proc")
def test_export_holds_about_one_copy_of_the_text_weights(vitb32_random, tmp_path):
    """Letting torch serialise the weights into the protobuf grew the process by 870-900 MB (3.5x the ViT-B-32 text
    tower's 242 MiB of float32 weights) at its peak. Written tensor by tensor: 1.87-1.92x (4 runs), two copies that
    are inherent and file-backed (the checkpoint's text weights, first touched by the trace, and the written file,
    mapped by onnxruntime's check session), so the bound leaves room above 2x. The int8 twin, written and checked
    after that, does not raise the peak."""
    import torch

    net, _ = vitb32_random
    checkpoint = tmp_path / "vit-b-32.pt"
    torch.save(net.state_dict(), checkpoint)
    out = subprocess.run([sys.executable, "-c", EXPORT_MEMORY, str(checkpoint), str(tmp_path / "text.onnx")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["growth"] <= 2.5 * measured["weights"], measured


@pytest.mark.slow
def test_torch_export_exporter_gives_the_same_vectors(tiny_model, tmp_path):
    """The fallback exporter (torch.export / dynamo), used when the TorchScript one is unavailable."""
    encoder = OnnxTextEncoder(export_text_tower(tiny_model, tmp_path / "text.onnx", dynamo=True))
    assert encoder._trim
    texts = sample_texts(60, seed=2)
    assert min_cosine(encoder.encode_texts(texts), tiny_model.encode_texts(texts)) >= 0.999


def test_tiny_towers_keep_float32_weights(tiny_onnx):
    """Its two blocks are the ones int8 leaves in float32: there is nothing to quantize, and the file says so."""
    encoder = OnnxTextEncoder(tiny_onnx)
    assert encoder.weights == "float32" and encoder.int8_note == "no matrix to quantize"


def int8_export(tiny_model, path, monkeypatch, bar: float):
    """Export with every block of the tiny tower quantizable and the int8 agreement bar at ``bar``."""
    from clipsearch import text_int8

    monkeypatch.setattr(text_int8, "FLOAT_BLOCKS", 0)
    monkeypatch.setattr(text_onnx, "_INT8_CHECK_COSINE", bar)
    return export_text_tower(tiny_model, path)


def test_int8_twin_replaces_the_float32_file_when_it_agrees(tiny_model, tmp_path, monkeypatch):
    import onnx

    path = int8_export(tiny_model, tmp_path / "text.onnx", monkeypatch, bar=0.99)
    encoder = OnnxTextEncoder(path, identity=tiny_model.identity)
    assert encoder.weights == "int8" and encoder.int8_note.startswith("cosine 0.99")
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "text.onnx" and len(list(tmp_path.iterdir())) == 2
    proto = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 8  # 2 blocks x (qkv, out, fc, proj); the projection stays float
    assert {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
    texts = sample_texts(60, seed=5)
    reference = tiny_model.encode_texts(texts)
    assert min_cosine(encoder.encode_texts(texts), reference) >= 0.99
    singly = np.concatenate([encoder.encode_texts([t]) for t in texts])
    assert min_cosine(singly, reference) >= 0.99


@pytest.mark.parametrize("bar, written", [(0.99, ["int8"]), (1.01, ["int8", "float32"])])
def test_the_float32_weights_are_written_only_when_no_twin_replaces_them(tiny_model, tmp_path, monkeypatch, bar,
                                                                         written):
    """The twin reads the float32 arrays from the module, so an export that keeps it never writes the float32 weights
    (ViT-B-32: 255 MB, 0.7 s of the export); one that turns it down writes them after, and commits them checked."""
    opened: list[str] = []  # weight files written, in order
    real_enter = text_onnx.WeightsFile.__enter__

    def note(self):
        if getattr(self, "write", True):
            opened.append(str(self.path))
        return real_enter(self)

    monkeypatch.setattr(text_onnx.WeightsFile, "__enter__", note)
    path = int8_export(tiny_model, tmp_path / "text.onnx", monkeypatch, bar=bar)
    encoder = OnnxTextEncoder(path)
    assert encoder.weights == written[-1]
    kept = next(tmp_path.glob("text.onnx.*.data"))
    assert len(opened) == len(written) and opened[-1] == str(kept)  # the file committed is the last one written
    texts = sample_texts(30, seed=8)
    assert min_cosine(encoder.encode_texts(texts), tiny_model.encode_texts(texts)) >= (0.99 if bar < 1 else 0.9999)


def test_int8_twin_that_disagrees_is_discarded(tiny_model, tmp_path, monkeypatch):
    path = int8_export(tiny_model, tmp_path / "text.onnx", monkeypatch, bar=1.01)
    encoder = OnnxTextEncoder(path)
    assert encoder.weights == "float32" and encoder.int8_note.startswith("int8 cosine 0.9")
    assert len(list(tmp_path.iterdir())) == 2  # no twin left behind
    texts = sample_texts(30, seed=6)
    assert min_cosine(encoder.encode_texts(texts), tiny_model.encode_texts(texts)) >= 0.9999


def test_int8_failure_costs_only_speed(tiny_model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr("clipsearch.text_int8.write_int8", broken)
    encoder = OnnxTextEncoder(export_text_tower(tiny_model, tmp_path / "text.onnx"))
    assert encoder.weights == "float32" and encoder.int8_note == "int8 failed: quantizer exploded"
    assert len(list(tmp_path.iterdir())) == 2


def test_a_failure_after_the_twin_passed_commits_the_float32_file(tiny_model, tmp_path, monkeypatch):
    """Saving the passing twin's note fails: the float32 graph, not the twin's, must be what is written and committed."""
    import onnx

    real_save = onnx.save_model

    def save_model(proto, path, *args, **kwargs):
        if str(path).endswith(".int8") and any(p.key == "clipsearch.int8" for p in proto.metadata_props):
            raise OSError("disk full")
        return real_save(proto, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", save_model)
    path = int8_export(tiny_model, tmp_path / "text.onnx", monkeypatch, bar=0.9)
    encoder = OnnxTextEncoder(path)
    assert encoder.weights == "float32" and encoder.int8_note == "int8 failed: disk full"
    assert len(list(tmp_path.iterdir())) == 2
    texts = sample_texts(20, seed=7)
    assert min_cosine(encoder.encode_texts(texts), tiny_model.encode_texts(texts)) >= 0.9999


def test_interrupted_int8_check_keeps_the_previous_file(tiny_model, tmp_path, monkeypatch):
    path = export_text_tower(tiny_model, tmp_path / "text.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_onnx, "_int8_agreement", interrupted)
    with pytest.raises(KeyboardInterrupt):
        int8_export(tiny_model, path, monkeypatch, bar=0.9)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert OnnxTextEncoder(path).encode_texts(["a dog"]).shape == (1, tiny_model.dim)


@pytest.mark.slow
def test_random_init_vit_b_32(vitb32_random, tmp_path):
    import torch

    net, _ = vitb32_random
    checkpoint = tmp_path / "vit-b-32.pt"
    torch.save(net.state_dict(), checkpoint)
    model = ClipModel(ModelSpec("ViT-B-32", str(checkpoint)), device="cpu", precision="fp32")
    encoder = OnnxTextEncoder(export_text_tower(model, tmp_path / "text.onnx"), identity=model.identity)
    assert encoder._trim and encoder.dim == 512
    assert encoder.weights == "int8", encoder.int8_note  # ~1.5x faster queries, checked against torch at export
    texts = sample_texts(100, seed=3)
    reference = model.encode_texts(texts)
    assert min_cosine(encoder.encode_texts(texts), reference) >= 0.999
    singly = np.concatenate([encoder.encode_texts([t]) for t in texts[:30]])
    assert min_cosine(singly, reference[:30]) >= 0.999


@pytest.mark.parametrize("int8", [False, True])
def test_a_float32_file_that_disagrees_with_torch_is_never_committed(tiny_model, tmp_path, monkeypatch, int8):
    """Kept as float32 (asked for, or the tiny tower's int8 had nothing to quantize), a file that answers unlike torch
    is a ModelError, and the previous file stays as it was."""
    path = export_text_tower(tiny_model, tmp_path / "text.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(text_onnx, "_FILE_CHECK_COSINE", 1.01)
    with pytest.raises(ModelError, match="disagrees with torch"):
        export_text_tower(tiny_model, path, int8=int8)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert OnnxTextEncoder(path).encode_texts(["a dog"]).shape == (1, tiny_model.dim)


def test_a_twin_that_agrees_with_torch_spares_the_float32_run(tiny_model, tmp_path, monkeypatch):
    """The int8 twin is checked against torch on 96 texts; running the float32 file it replaces as well only cost
    time (0.35 s of a ViT-B-32 export)."""
    monkeypatch.setattr(text_onnx, "_FILE_CHECK_COSINE", 1.01)  # would fail, were it run
    path = int8_export(tiny_model, tmp_path / "text.onnx", monkeypatch, bar=0.99)
    assert OnnxTextEncoder(path).weights == "int8"
