"""Model speed, side by side in one run: image encoding in fp32 vs bf16, text encoding with torch vs ONNX, and what a
cold text query costs in a new process (imports, loading the ONNX text tower, the first query).

    python bench/model_speed.py [--runs 3] [--batch-size 32] [--skip-bf16]

Uses a seeded random-init ViT-B-32 (it costs exactly what the real weights cost). Prints medians and ratios; on a CPU
without native bf16 (no avx512_bf16 / amx_bf16 flag) a bf16 batch of 32 takes a minute or more.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUERY = "kids playing on a beach at sunset"
COLD_QUERY = """
import json, sys, time
t0 = time.perf_counter()
from clipsearch.text_onnx import OnnxTextEncoder
t1 = time.perf_counter()
encoder = OnnxTextEncoder(sys.argv[1])
t2 = time.perf_counter()
encoder.encode_texts([sys.argv[2]])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2, "torch": "torch" in sys.modules}))
"""


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_rates(checkpoint: Path, batch: int, runs: int, skip_bf16: bool) -> dict[str, float]:
    from clipsearch.model import ClipModel, ModelSpec

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    rates, vectors = {}, {}
    for precision in ("fp32",) if skip_bf16 else ("fp32", "bf16"):
        model = ClipModel(ModelSpec("ViT-B-32", str(checkpoint)), device="cpu", precision=precision)
        model.encode_images(x[:4])  # warm-up (kernels, allocator) on a small batch: a bf16 batch can take minutes
        rates[precision] = batch / median_time(lambda: vectors.__setitem__(precision, model.encode_images(x)), runs)
        del model
    if "bf16" in vectors:
        rates["min_cosine"] = float((vectors["fp32"] * vectors["bf16"]).sum(axis=1).min())
    return rates


def text_latencies(checkpoint: Path, onnx_path: Path, runs: int) -> dict[str, float]:
    from clipsearch.model import ClipModel, ModelSpec
    from clipsearch.text_onnx import OnnxTextEncoder, export_text_tower

    model = ClipModel(ModelSpec("ViT-B-32", str(checkpoint)), device="cpu", precision="fp32")
    start = time.perf_counter()
    export_text_tower(model, onnx_path)
    exported = time.perf_counter() - start
    encoder = OnnxTextEncoder(onnx_path, identity=model.identity)
    float32 = OnnxTextEncoder(export_text_tower(model, onnx_path.with_name("float32.onnx"), int8=False))
    captions = [f"a photo of {n} dogs playing in the snow near a red house" for n in range(64)]
    for fn in (model.encode_texts, encoder.encode_texts, float32.encode_texts):
        fn([QUERY])  # warm-up
    queries = [f"{n} dogs near a red house" for n in range(max(runs, 5) * 10)]  # distinct, alternating the two files
    timed: dict[str, list[float]] = {"int8": [], "float32": []}
    for i, query in enumerate(queries):
        pair = [("int8", encoder), ("float32", float32)]
        for name, one in pair if i % 2 else pair[::-1]:
            start = time.perf_counter()
            one.encode_texts([query])
            timed[name].append(time.perf_counter() - start)
    out = {
        "export_s": exported,
        "torch_query_ms": 1000 * median_time(lambda: model.encode_texts([QUERY]), max(runs, 5)),
        "onnx_query_ms": 1000 * median_time(lambda: encoder.encode_texts([QUERY]), max(runs, 5)),
        "torch_64_ms": 1000 * median_time(lambda: model.encode_texts(captions), runs),
        "onnx_64_ms": 1000 * median_time(lambda: encoder.encode_texts(captions), runs),
        "min_cosine": float((model.encode_texts(captions + [QUERY]) * encoder.encode_texts(captions + [QUERY])).sum(1).min()),
        "weights": encoder.weights, "int8_note": encoder.int8_note,
        "alternating_ms": {name: 1000 * statistics.median(times) for name, times in timed.items()},
    }
    return out


def new_process(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


def cold_query(onnx_path: Path, runs: int) -> dict[str, float]:
    walls, parts = [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", COLD_QUERY, str(onnx_path), QUERY], check=True,
                              capture_output=True, text=True, cwd=REPO)
        walls.append(time.perf_counter() - start)
        parts.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not any(p["torch"] for p in parts), "the ONNX query path imported torch"
    out = {key: statistics.median(p[key] for p in parts) for key in ("import", "load", "first")}
    out["wall"] = statistics.median(walls)
    out["python"] = statistics.median(new_process(["-c", "pass"]) for _ in range(runs))
    out["import torch"] = statistics.median(new_process(["-c", "import torch"]) for _ in range(runs))
    out["import open_clip"] = statistics.median(new_process(["-c", "import open_clip"]) for _ in range(runs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-bf16", action="store_true", help="only fp32 images (bf16 is slow without native bf16)")
    args = parser.parse_args()

    from clipsearch.model import cpu_flags, resolve_precision

    with tempfile.TemporaryDirectory() as tmp:
        import open_clip
        import torch

        torch.manual_seed(0)
        checkpoint = Path(tmp) / "vit-b-32-random.pt"
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), checkpoint)
        onnx_path = Path(tmp) / "text.onnx"
        text = text_latencies(checkpoint, onnx_path, args.runs)
        cold = cold_query(onnx_path, args.runs)
        images = image_rates(checkpoint, args.batch_size, args.runs, args.skip_bf16)

    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or ["none"]
    print(f"CPU: torch capability {torch.backends.cpu.get_cpu_capability()}, native bf16 flags: {', '.join(native)}; "
          f"precision 'auto' picks {resolve_precision('auto', 'cpu')}; torch threads {torch.get_num_threads()}")
    print(f"encode_image, random-init ViT-B-32, batch {args.batch_size}, median of {args.runs}:")
    line = f"  fp32 {images['fp32']:.2f} img/s"
    if "bf16" in images:
        line += (f"   bf16 {images['bf16']:.2f} img/s   bf16/fp32 = {images['bf16'] / images['fp32']:.2f}x"
                 f"   min cosine {images['min_cosine']:.5f}")
    print(line)
    print(f"text, one query ({QUERY!r}): torch {text['torch_query_ms']:.1f} ms   ONNX {text['onnx_query_ms']:.1f} ms"
          f"   torch/ONNX = {text['torch_query_ms'] / text['onnx_query_ms']:.1f}x")
    print(f"text, 64 captions: torch {text['torch_64_ms']:.0f} ms   ONNX {text['onnx_64_ms']:.0f} ms"
          f"   torch/ONNX = {text['torch_64_ms'] / text['onnx_64_ms']:.1f}x   min cosine {text['min_cosine']:.6f}")
    print(f"ONNX export of the text tower: {text['export_s']:.1f} s; its weights: {text['weights']} "
          f"({text['int8_note']})")
    alternating = text["alternating_ms"]
    print(f"text, one query at a time, the int8 and float32 ONNX files alternating: int8 {alternating['int8']:.1f} ms"
          f"   float32 {alternating['float32']:.1f} ms   float32/int8 = "
          f"{alternating['float32'] / alternating['int8']:.2f}x")
    print(f"cold text query in a new process, median of {args.runs}: wall {cold['wall']:.3f} s "
          f"(bare python {cold['python']:.3f} s; import clipsearch.text_onnx + onnxruntime {cold['import']:.3f} s, "
          f"load {cold['load']:.3f} s, first query {cold['first']:.3f} s); no torch imported")
    print(f"for comparison, new process: import torch {cold['import torch']:.2f} s, "
          f"import open_clip {cold['import open_clip']:.2f} s")


if __name__ == "__main__":
    main()
