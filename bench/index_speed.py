"""Indexing speed of `clipsearch index` on the real photo folder, with a random-init ViT-B-32 checkpoint
(it costs exactly what the real weights cost), next to the model-only throughput measured in the same run.

    python bench/index_speed.py [--runs 3] [--folder ../shared/data/photos] [--workers N]

Prints the median images/s of full CLI runs (fresh index each time, new process each time) and their ratio to the
model-only rate (encode_image on ready tensors, same batch size), so the number is comparable across noisy machines.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(directory: Path) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    net = open_clip.create_model("ViT-B-32", pretrained=None)
    path = directory / "vit-b-32-random.pt"
    torch.save(net.state_dict(), path)
    return path


def model_only_rate(checkpoint: Path, batch: int, batches: int = 4) -> float:
    import numpy as np

    from clipsearch.model import ClipModel, ModelSpec

    model = ClipModel(ModelSpec("ViT-B-32", str(checkpoint)), device="cpu")
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    model.encode_images(x)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        model.encode_images(x)
    return batch * batches / (time.perf_counter() - start)


def index_rate(checkpoint: Path, folder: Path, extra: list[str]) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "clipsearch", "index", str(folder), "--index", f"{tmp}/idx",
                               "--model", "ViT-B-32", "--pretrained", str(checkpoint), *extra],
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
    embedded = int(proc.stdout.split()[0])
    reported = float(proc.stdout.split("(")[1].split()[0])
    return embedded / wall, reported, embedded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=REPO.parent / "shared" / "data" / "photos")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    extra = ["--batch-size", str(args.batch_size)] + (["--workers", str(args.workers)] if args.workers is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        model_rate = model_only_rate(checkpoint, args.batch_size)
        runs = [index_rate(checkpoint, args.folder, extra) for _ in range(args.runs)]
    wall = statistics.median(r[0] for r in runs)
    inner = statistics.median(r[1] for r in runs)
    print(f"folder: {args.folder} ({runs[0][2]} images embedded per run), {args.runs} runs")
    print(f"model only (encode_image, batch {args.batch_size}, fp32): {model_rate:.1f} images/s")
    print(f"clipsearch index, whole process (imports, model load, scan, decode, embed, commit): median {wall:.1f} images/s")
    print(f"clipsearch index, as reported by the run (scan to last commit):               median {inner:.1f} images/s")
    print(f"ratio of reported run rate to model-only rate: {inner / model_rate:.2f}")


if __name__ == "__main__":
    main()
