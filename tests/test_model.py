"""The model room: local checkpoints, the Hugging Face cache layout offline, and clear errors, all without network."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch

from clipsearch.cores import usable_cores
from clipsearch.errors import ModelError
from clipsearch.model import ClipModel, ModelSpec
from conftest import TINY_MODEL


def reference_text_vectors(checkpoint, texts):
    import open_clip

    net = open_clip.create_model(TINY_MODEL, pretrained=None)
    net.load_state_dict(torch.load(checkpoint))
    net.eval()
    with torch.no_grad():
        out = net.encode_text(open_clip.get_tokenizer(TINY_MODEL)(texts)).float()
    return (out / out.norm(dim=-1, keepdim=True)).numpy()


def test_local_state_dict_checkpoint_loads(tiny_checkpoint):
    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu")
    texts = ["a red bicycle", "two dogs on a beach"]
    got = model.encode_texts(texts)
    assert got.dtype == np.float32 and got.shape == (2, 64)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.allclose(got, reference_text_vectors(tiny_checkpoint, texts), atol=1e-5)
    assert model.dim == 64 and model.preprocess.size == (224, 224)


@pytest.mark.parametrize("layout", ["safetensors", "wrapped"])
def test_safetensors_and_wrapped_checkpoints_load(tiny_checkpoint, tmp_path, layout):
    state = torch.load(tiny_checkpoint)
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "tiny-wrapped.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    model = ClipModel(ModelSpec(TINY_MODEL, str(path)), device="cpu")
    assert np.allclose(model.encode_texts(["a cat"]), reference_text_vectors(tiny_checkpoint, ["a cat"]), atol=1e-5)


def test_half_precision_checkpoint_loads_as_float32_and_torch_is_left_as_it_was(tiny_checkpoint, tmp_path):
    """Weights are handed to the model rather than copied, so a float16 file must still give float32 parameters,
    and the loading hook must not outlive the load."""
    from safetensors.torch import save_file

    path = tmp_path / "tiny-fp16.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in torch.load(tiny_checkpoint).items()},
              path)
    before = torch.nn.Module.load_state_dict
    model = ClipModel(ModelSpec(TINY_MODEL, str(path)), device="cpu", precision="fp32")  # auto: bf16 on some CPUs
    assert torch.nn.Module.load_state_dict is before
    assert {p.dtype for p in model._net.parameters()} == {torch.float32}
    reference = reference_text_vectors(tiny_checkpoint, ["a cat"])
    assert float((model.encode_texts(["a cat"]) * reference).sum()) > 0.999


def test_weights_from_a_checkpoint_are_never_drawn_at_random(tiny_checkpoint, tmp_path, monkeypatch):
    """open_clip's random initialisation is skipped when a checkpoint replaces every weight (the memory it would
    touch is never resident); the hooks are gone afterwards, and a checkpoint that lacks a weight is refused."""
    drawn = []
    normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: drawn.append(1) or normal(tensor, *a, **k))
    before = torch.nn.Module.load_state_dict
    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu")
    assert not drawn and torch.nn.Module.load_state_dict is before
    assert np.allclose(model.encode_texts(["a cat"]), reference_text_vectors(tiny_checkpoint, ["a cat"]), atol=1e-5)
    torch.nn.init.normal_(torch.empty(2))
    assert drawn  # the tracer is back in place, not a no-op left behind

    state = torch.load(tiny_checkpoint)
    del state["ln_final.weight"]
    lacking = tmp_path / "lacking.pt"
    torch.save(state, lacking)
    with pytest.raises(ModelError, match="ln_final.weight"):
        ClipModel(ModelSpec(TINY_MODEL, str(lacking)), device="cpu")
    import open_clip.factory

    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *args, **kwargs: None)  # weights never arrive
    with pytest.raises(ModelError, match="loaded no weights"):
        ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu")
    assert torch.nn.Module.load_state_dict is before


def test_checkpoint_hooks_act_only_in_the_loading_thread_and_leave_nothing_behind():
    """An indexing run loads its model in a background thread. While it does, another thread building a model must
    get torch's real initialisation, and two loads that overlap (the first ends before the second) must not leave
    the skipping hooks installed: that would build every later model from uninitialised memory (NaN vectors)."""
    import threading

    from clipsearch import model as model_room

    originals = {name: getattr(torch.nn.init, name) for name in model_room._INIT_FUNCTIONS
                 if hasattr(torch.nn.init, name)}
    load, load_state_dict = torch.load, torch.nn.Module.load_state_dict
    skipped: dict[str, bool] = {}

    def loader(name: str, inside: threading.Event, leave: threading.Event) -> None:
        with contextlib.suppress(RuntimeError):  # "loaded no weights": nothing is loaded here
            with model_room._checkpoint_loading(torch, in_place=True):
                tensor = torch.zeros(3)
                torch.nn.init.ones_(tensor)
                skipped[name] = not tensor.any()
                inside.set()
                leave.wait(10)

    events = {name: (threading.Event(), threading.Event()) for name in ("first", "second")}
    threads = {name: threading.Thread(target=loader, args=(name, *pair)) for name, pair in events.items()}
    threads["first"].start()
    assert events["first"][0].wait(10)
    threads["second"].start()
    assert events["second"][0].wait(10)
    tensor = torch.zeros(3)
    torch.nn.init.ones_(tensor)  # this thread is not loading: real initialisation
    assert tensor.tolist() == [1.0, 1.0, 1.0]
    for name in ("first", "second"):  # the first ends while the second still loads
        events[name][1].set()
        threads[name].join(10)
    assert skipped == {"first": True, "second": True}
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals
    assert torch.load is load and torch.nn.Module.load_state_dict is load_state_dict


def test_identity_follows_content_not_location(tiny_checkpoint, tmp_path):
    moved = tmp_path / "elsewhere.pt"
    moved.write_bytes(tiny_checkpoint.read_bytes())
    a = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu")
    b = ClipModel(ModelSpec(TINY_MODEL, str(moved)), device="cpu")
    assert a.identity == b.identity


@pytest.mark.parametrize("spec, needle", [
    (ModelSpec("ViT-Nope-99", "openai"), "unknown model"),
    (ModelSpec("ViT-B-32", "no_such_tag"), "laion2b_s34b_b79k"),
    (ModelSpec("ViT-B-32", "/no/such/file.safetensors"), "checkpoint file not found"),
])
def test_bad_model_arguments_are_clear(spec, needle):
    with pytest.raises(ModelError, match=needle):
        ClipModel(spec, device="cpu")


def test_checkpoint_of_another_architecture_is_a_model_error(tiny_checkpoint):
    with pytest.raises(ModelError, match="cannot load"):
        ClipModel(ModelSpec("RN50", str(tiny_checkpoint)), device="cpu")


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("model", "offline", "hint"), [
    ([], {"HF_HUB_OFFLINE": "1"}, "--pretrained"),
    ([], {"HF_ENDPOINT": "http://127.0.0.1:9"}, "--pretrained"),
    (["--model", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"], {"HF_ENDPOINT": "http://127.0.0.1:9"},
     "once with network"),
], ids=["HF_HUB_OFFLINE", "hub-unreachable", "hf-hub-model-unreachable"])
def test_offline_without_cached_weights_says_what_to_do(tmp_path, model, offline, hint):
    """Offline without HF_HUB_OFFLINE too (a hub that refuses connections), the error is one line at once:
    huggingface_hub's own retries took about 50 s and printed forty lines of warnings first."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), **offline)
    photos = tmp_path / "p"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(photos / "a.png")
    proc = subprocess.run([sys.executable, "-m", "clipsearch", "index", str(photos), "--index", str(tmp_path / "i"),
                           *model], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == ModelError.exit_code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and hint in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_default_tag_found_in_hugging_face_cache_offline(tmp_path, vitb32_random):
    """A checkpoint in the HF cache layout open_clip looks up for ViT-B-32/laion2b_s34b_b79k loads with HF_HUB_OFFLINE=1."""
    from safetensors.torch import save_file

    net, _ = vitb32_random
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    code = ("import json, resource, torch, open_clip; from clipsearch.model import ClipModel, ModelSpec; "
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; before = peak(); "
            "m = ClipModel(ModelSpec(), device='cpu'); "
            "print(json.dumps({'v': m.encode_texts(['a dog'])[0].tolist(), 'id': m.identity, 'grew': peak() - before}))")
    proc = _run_python(code, env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The file's pages become the weights (mapped + assigned) instead of being copied into the random-init ones:
    # loading costs about one copy of the weights, not two (it grew by 2.0x before).
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    assert out["grew"] < 1.35 * weights, (out["grew"], weights)
    import open_clip

    with torch.no_grad():
        ref = net.encode_text(open_clip.get_tokenizer("ViT-B-32")(["a dog"]))[0].float()
    ref = (ref / ref.norm()).numpy()
    assert np.allclose(out["v"], ref, atol=1e-4)
    assert json.loads(out["id"])["pretrained"] == "laion2b_s34b_b79k"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_image_weights_handed_back_to_the_os_come_back_unchanged(tiny_checkpoint):
    """An indexing run releases the image tower's pages before the text export; a later forward reads them again."""
    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu", precision="fp32")
    pixels = np.random.default_rng(0).standard_normal((2, 3, *model.preprocess.size)).astype(np.float32)
    before = model.encode_images(pixels)
    weights = sum(p.numel() * p.element_size() for p in model._net.visual.parameters())
    assert model.release_image_weights() >= weights // 2
    assert np.array_equal(model.encode_images(pixels), before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_only_pages_a_file_holds_are_handed_back(tmp_path):
    """A mapped checkpoint's pages come back from the file; anonymous memory (a converted copy) would only go to swap,
    so it is never advised."""
    from clipsearch.model import _page_out

    anonymous = torch.randn(512, 1024)
    torch.save({"w": anonymous}, tmp_path / "w.pt")
    mapped = torch.load(tmp_path / "w.pt", mmap=True)["w"]
    assert _page_out([anonymous]) == 0
    assert _page_out([mapped]) >= anonymous.numel() * anonymous.element_size() - 2 * 4096
    assert torch.equal(mapped, anonymous)  # read again from the file


def _spy_on_encode(model, monkeypatch) -> list[tuple[int, str, int]]:
    """Record each encode_images call: (images, thread name, torch threads it ran with)."""
    import threading

    calls, encode = [], model.encode_images

    def spy(batch):
        calls.append((len(batch), threading.current_thread().name, torch.get_num_threads()))
        return encode(batch)
    monkeypatch.setattr(model, "encode_images", spy)
    return calls


def test_encode_streams_split_each_batch_over_single_threaded_streams_in_order(tiny_checkpoint, monkeypatch):
    """The indexer's image tower: a batch of 5 runs as 3 + 2 images, one stream each with its share of the cores;
    the vectors come back in the batch's order, as one call on the whole batch gives them."""
    from clipsearch.model import EncodeStreams

    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu", precision="fp32")
    pixels = np.random.default_rng(0).standard_normal((5, 3, *model.preprocess.size)).astype(np.float32)
    whole = model.encode_images(pixels)
    calls = _spy_on_encode(model, monkeypatch)
    streams = EncodeStreams(model, streams=2)
    try:
        got = streams.submit(pixels)()
        single = streams.submit(pixels[3:4])()  # fewer images than streams: one part
    finally:
        streams.close()
    np.testing.assert_allclose(got, whole, atol=1e-5)
    np.testing.assert_allclose(single, whole[3:4], atol=1e-5)
    assert sorted(n for n, _name, _threads in calls) == [1, 2, 3]
    assert all(name.startswith("clipsearch-encode") for _n, name, _threads in calls)
    assert {threads for _n, _name, threads in calls} == {max(1, usable_cores() // 2)}


def test_encode_streams_leave_torch_threads_as_they_found_them(tiny_checkpoint):
    """torch hands a new thread the thread count last set anywhere: after the streams (one thread each on 2 cores),
    the caller and threads started later get the count from before."""
    import threading

    from clipsearch.model import EncodeStreams

    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu", precision="fp32")
    before = torch.get_num_threads()
    streams = EncodeStreams(model, streams=before)  # one torch thread per stream
    streams.submit(np.zeros((before, 3, *model.preprocess.size), np.float32))()
    streams.close()
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert torch.get_num_threads() == before and seen == [before]


@pytest.mark.parametrize("cores, count, threads", [(1, 1, 1), (2, 2, 1), (8, 2, 4)])
def test_encode_streams_on_the_cpu_are_two_when_there_are_cores_for_them(tiny_checkpoint, monkeypatch, cores,
                                                                         count, threads):
    from clipsearch import model as model_room

    monkeypatch.setattr(model_room, "usable_cores", lambda: cores)
    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu", precision="fp32")
    streams = model_room.EncodeStreams(model)
    streams.close()
    assert (streams.count, streams._threads) == (count, threads)


def test_encode_streams_say_whether_a_batch_is_still_encoding(tiny_checkpoint):
    """The indexer tells a model waiting for decoding from a busy one by this (Indexer._starved)."""
    from clipsearch.model import EncodeStreams

    model = ClipModel(ModelSpec(TINY_MODEL, str(tiny_checkpoint)), device="cpu", precision="fp32")
    streams = EncodeStreams(model, streams=2)
    try:
        assert not streams.busy
        gate = threading.Event()
        encode = model.encode_images
        model.encode_images = lambda batch: (gate.wait(), encode(batch))[1]  # held until the gate opens
        pixels = np.zeros((4, 3, *model.preprocess.size), np.float32)
        result = streams.submit(pixels)
        assert streams.busy
        gate.set()
        assert result().shape == (4, model.dim)
        assert not streams.busy
    finally:
        streams.close()


def test_the_preprocessing_a_config_implies_is_the_loaded_models_and_needs_no_torch(tiny_checkpoint):
    """What lets a new index decode while its model loads (model.config_preprocess): read from the config alone, it
    equals what the built model uses, for our configs and open_clip's (an int or a pair for the size), and for a
    pretrained tag whose preprocessing is the default; it is None where it cannot tell. It imports no torch."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    from clipsearch.media import PreprocessSpec
    from clipsearch.model import config_preprocess, register_project_configs

    register_project_configs()
    for name in (TINY_MODEL, "clipsearch-tiny-clip", "ViT-B-32", "RN50"):
        net = open_clip.create_model(name, pretrained=None).eval()
        built = PreprocessSpec.from_open_clip(net.visual.preprocess_cfg)
        with torch.inference_mode():
            dim = net.encode_image(torch.zeros(1, 3, *built.size)).shape[-1]
        assert config_preprocess(ModelSpec(name, str(tiny_checkpoint))) == (built, dim), name
    tag = ModelSpec("ViT-B-32", "laion2b_s34b_b79k")  # the default: its preprocessing is open_clip's default one
    expected = merge_preprocess_dict(asdict(PreprocessCfg()), open_clip.get_pretrained_cfg(tag.name, tag.pretrained))
    assert config_preprocess(tag)[0] == PreprocessSpec.from_open_clip({**expected, "size": 224})
    for unknown in (ModelSpec("hf-hub:someone/some-clip", ""), ModelSpec("local-dir:/models/x", ""),
                    ModelSpec("ViT-Nope-99", "openai"), ModelSpec("ViT-B-32", "/no/such/file.safetensors")):
        assert config_preprocess(unknown) is None, unknown
    code = ("import sys; from clipsearch.model import ModelSpec, config_preprocess; "
            "assert config_preprocess(ModelSpec('ViT-L-14-336', 'openai'))[0].size == (336, 336); "
            "print(sorted({'torch', 'open_clip'} & set(sys.modules)))")
    assert _run_python(code, dict(os.environ)).stdout.strip() == "[]"
