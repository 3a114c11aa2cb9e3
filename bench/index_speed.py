"""Indexing speed of `clipsearch index` on the real photo folder, side by side in one run with the naive loop most tools
use and with the model-only throughput, with a random-init ViT-B-32 checkpoint (it costs exactly what the real weights
cost). Also the peak memory of the `clipsearch index` process tree (issue 5, targets 1 and 5).

    python bench/index_speed.py [--runs 3] [--folder ../shared/data/photos] [--workers N] [--precision auto]
                                [--device cuda]

- ours: `clipsearch index FOLDER` in a new process, fresh index each run; its own reported rate (scan to last commit,
  model load excluded) and the whole-process rate (imports and model load included).
- naive: Pillow full decode -> open_clip `preprocess` in a torch DataLoader (`--naive-workers`, default 0: the
  DataLoader default) -> float32 `encode_image`, batch 32; model load excluded, so it compares with ours' reported rate.
- model only: `encode_image` on ready tensors, same batch size and precision as ours, two ways: one batch at a time
  on torch's threads (as the naive loop runs the model), and each batch split over `EncodeStreams` (as ours runs it).
- decode: one pass of our own decoding over the folder in this process (CPU seconds per file). With the model-only
  rate it gives the ceiling: on C cores no pipeline beats C / (C / model-only + decode) images/s, since decoding and
  the model need the same cores; printed with ours' share of it.
- device: all three run the model on `--device` (default: clipsearch's own choice, cuda when available, else cpu), so
  on a GPU machine they compare like with like; there the ceiling is what the cores can decode, or the model-only rate.
- refresh: after each timed run, `clipsearch index` again over the same folder and index, which finds nothing new
  and so never loads the model; its whole-process seconds, beside `python -c pass`.
- memory: one more `clipsearch index` run (not timed, the first, before this process imports torch) has its process
  tree (decode workers included) sampled every 20 ms; printed are the peak of the summed VmRSS (pages shared between
  processes counted once per process: an upper bound) and of the summed PSS (shared pages split between the
  processes sharing them, so a process of this bench holding torch would have taken a share of torch's libraries).

Prints medians and the ratios ours/naive and ours/model-only; the targets are >= 2.5 and >= 0.85.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "vit-b-32-random.pt"
sys.path[:0] = [str(REPO / "bench")]

from cold_query import timed  # noqa: E402 - one way to time a new process: wall and CPU seconds

from clipsearch import media  # noqa: E402 - imports no torch
from clipsearch.cores import usable_cores  # noqa: E402 - the cores the index itself uses


def make_checkpoint(directory: Path) -> Path:
    import open_clip
    import torch

    torch.manual_seed(0)
    net = open_clip.create_model("ViT-B-32", pretrained=None)
    path = directory / CHECKPOINT_NAME
    torch.save(net.state_dict(), path)
    return path


def checkpoint_in_child(directory: Path) -> Path:
    """`make_checkpoint`, written by a child process, so that the caller imports no torch: a bench process holding
    torch's libraries takes a share of their pages from the PSS it measures, and pays 3 s and 700 MB for nothing."""
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                    f"from pathlib import Path; from index_speed import make_checkpoint; "
                    f"make_checkpoint(Path({str(directory)!r}))"], check=True, capture_output=True)
    return directory / CHECKPOINT_NAME


def model_only_runner(checkpoint: Path, batch: int, precision: str, device: str):
    """Load the model once; return (a function timing `batches` batches of encode_image on ready tensors, two ways:
    (one batch at a time on torch's threads, as the naive loop runs it; through EncodeStreams, as `clipsearch index`
    runs it), in images/s; the precision used; the preprocessing)."""
    import numpy as np

    from clipsearch.model import ClipModel, EncodeStreams, ModelSpec

    model = ClipModel(ModelSpec("ViT-B-32", str(checkpoint)), device=device, precision=precision)
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    model.encode_images(x)  # warm-up

    def plain(batches: int) -> float:
        start = time.perf_counter()
        for _ in range(batches):
            model.encode_images(x)
        return batch * batches / (time.perf_counter() - start)

    def streamed(batches: int) -> float:
        streams = EncodeStreams(model)
        try:
            streams.submit(x[:streams.count])()  # warm-up: the streams' threads and their kernels
            start = time.perf_counter()
            waits = [streams.submit(x) for _ in range(batches)]  # the indexer keeps two queued; all here: no gaps
            for wait in waits:
                wait()
            return batch * batches / (time.perf_counter() - start)
        finally:
            streams.close()

    def run(batches: int = 3) -> tuple[float, float]:
        return plain(batches), streamed(batches)

    return run, model.precision, model.preprocess


def decode_runner(paths: list[str], spec):
    """A function timing one pass of our decoding over the folder in this process, as the workers do it (draft
    decode, EXIF, preprocessing to the model's pixels): CPU seconds per file. With the model-only rate it gives the
    most any pipeline can reach on these cores: decoding and the model need the same cores, so even with no gap
    between them each image costs its model time plus its decode time."""
    def run() -> float:
        start = time.process_time()
        for path in paths:
            media.decode(path, spec)
        return (time.process_time() - start) / len(paths)

    return run


# the naive loop ---------------------------------------------------------------------------------------------------
class _Files:
    """A torch Dataset: full Pillow decode, then open_clip's preprocess (what most tools do); None when unreadable."""

    def __init__(self, paths: list[str], preprocess) -> None:
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as image:
                return self.preprocess(image.convert("RGB"))
        except Exception:  # noqa: BLE001 - a naive loop skips what it cannot read
            return None


def _collate(items):
    import torch

    kept = [item for item in items if item is not None]
    return torch.stack(kept) if kept else None


def naive_runner(checkpoint: Path, paths: list[str], batch: int, workers: int, device: str):
    """Load the model once; return a function that runs the naive loop over the folder: (images/s, images)."""
    import open_clip
    import torch

    net, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(checkpoint))
    net.eval().to(device)

    def run() -> tuple[float, int]:
        loader = torch.utils.data.DataLoader(_Files(paths, preprocess), batch_size=batch, num_workers=workers,
                                             collate_fn=_collate)
        done = 0
        start = time.perf_counter()
        with torch.no_grad():
            for pixels in loader:
                if pixels is not None:
                    features = net.encode_image(pixels.to(device))
                    features = (features / features.norm(dim=-1, keepdim=True)).cpu()
                    done += len(features)
        return done / (time.perf_counter() - start), done

    return run


# ours ---------------------------------------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo += [int(child) for child in f.read().split()]
        except OSError:
            pass
    return pids


def _field_kb(path: str, name: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed VmRSS and PSS of a process and its descendants until stopped; keeps the peaks (MB)."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_pss = 0.0
        self.peak_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = _tree(self.pid)
            rss = sum(_field_kb(f"/proc/{p}/status", "VmRSS:") for p in pids) / 1024
            pss = sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def index_run(checkpoint: Path, folder: Path, extra: list[str], sample_memory: bool = False) -> dict:
    """One `clipsearch index` in a new process over a fresh index. Memory is sampled only when asked: reading
    smaps_rollup of the tree every 20 ms costs enough CPU on 2 cores to slow the run it measures (4.3 against
    7.8 images/s), so timed runs go unsampled and one extra run measures memory."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "index", str(folder), "--index", f"{tmp}/idx",
                                 "--model", "ViT-B-32", "--pretrained", str(checkpoint), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        memory = TreeMemory(proc.pid)
        if sample_memory:
            memory.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        if sample_memory:
            memory.stop()
        if proc.returncode:
            raise SystemExit(f"clipsearch index failed ({proc.returncode}): {err.strip()[-500:]}")
        # the everyday case: the same folder again, nothing new in it
        refresh, _cpu = timed([sys.executable, "-m", "clipsearch", "index", str(folder.resolve()),
                               "--index", f"{tmp}/idx"], os.environ.copy())
        info = json.loads(subprocess.run([sys.executable, "-m", "clipsearch", "info", "--index", f"{tmp}/idx", "--json"],
                                         capture_output=True, text=True, check=True).stdout)
        if info["last_run"]["unchanged"] != info["images"]:
            raise SystemExit(f"the refresh run found something to do: {info['last_run']}")
    embedded = int(out.split()[0])
    reported = float(out.split("(")[1].split()[0])
    return {"wall": embedded / wall, "reported": reported, "embedded": embedded, "rss": memory.peak_rss,
            "pss": memory.peak_pss, "processes": memory.peak_processes, "precision": info.get("precision"),
            "refresh": refresh}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=REPO.parent / "shared" / "data" / "photos")
    parser.add_argument("--workers", type=int, default=None, help="clipsearch index --workers (default: its own)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--naive-workers", type=int, default=0, help="DataLoader num_workers of the naive loop")
    parser.add_argument("--device", default=None, help="torch device of all three (default: clipsearch's own choice)")
    args = parser.parse_args()
    args.folder = args.folder.resolve()  # the refresh run names it resolved: one root, not two
    extra = ["--batch-size", str(args.batch_size), "--precision", args.precision] + \
        (["--workers", str(args.workers)] if args.workers is not None else []) + \
        (["--device", args.device] if args.device else [])
    print(f"folder {args.folder}, {args.runs} runs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = checkpoint_in_child(Path(tmp))
        # Memory first, while this process has imported no torch: PSS splits a page among the processes that map it,
        # and torch's libraries would be mapped here too once the naive loop loads, which took 150-160 MB off the
        # figure (1389 against 1538-1555 MB, the same code).
        assert "torch" not in sys.modules, "the memory run must come before this process imports torch"
        memory = index_run(checkpoint, args.folder, extra, sample_memory=True)
        from clipsearch.model import default_device

        device = args.device or default_device()  # what `clipsearch index` picks, unless told
        ours, naive, model = [], [], []
        paths = sorted(media.iter_images(args.folder))  # what the naive loop and the decode pass read
        naive_loop = naive_runner(checkpoint, paths, args.batch_size, args.naive_workers, device)
        model_only, model_precision, spec = model_only_runner(checkpoint, args.batch_size, args.precision, device)
        decode_pass = decode_runner(paths, spec)
        decode_pass()  # warm-up: the first pass also pays Pillow's plugin imports
        decode = []
        for run in range(args.runs):  # interleaved, so a change in machine load hits every column alike
            ours.append(index_run(checkpoint, args.folder, extra))
            naive.append(naive_loop())
            model.append(model_only())
            decode.append(decode_pass())
            print(f"run {run + 1}: ours {ours[-1]['reported']:.1f} images/s, naive {naive[-1][0]:.1f}, model only "
                  f"{model[-1][0]:.1f} / {model[-1][1]:.1f} (plain / streams), decoding {1e3 * decode[-1]:.1f} ms per "
                  f"file", flush=True)
    precision = ours[0]["precision"]
    ours_rate = statistics.median(r["reported"] for r in ours)
    naive_rate = statistics.median(r[0] for r in naive)
    plain_rate = statistics.median(r[0] for r in model)
    streams_rate = statistics.median(r[1] for r in model)
    print(f"device {device}; images per run: ours {ours[0]['embedded']}, naive {naive[0][1]}")
    print(f"model only (encode_image on ready tensors, batch {args.batch_size}, {model_precision}): one batch at a time "
          f"on torch's threads, median {plain_rate:.1f} images/s; each batch split over EncodeStreams as clipsearch "
          f"index runs it, median {streams_rate:.1f} images/s")
    print(f"naive loop (Pillow full decode -> preprocess in a DataLoader, num_workers={args.naive_workers} -> "
          f"fp32 encode_image, batch {args.batch_size}): median {naive_rate:.1f} images/s")
    print(f"clipsearch index ({precision}), as reported by the run (scan to last commit, the model's load excluded; "
          f"what decoded during the load counts, so a small folder exceeds the steady state): median {ours_rate:.1f} "
          f"images/s")
    print(f"clipsearch index, whole process (imports, model load, scan, decode, embed, commit, ONNX export): "
          f"median {statistics.median(r['wall'] for r in ours):.1f} images/s")
    floor = statistics.median(timed([sys.executable, "-c", "pass"], os.environ.copy())[0] for _ in range(5))
    print(f"clipsearch index again, nothing new (whole process; the model is not loaded): median "
          f"{statistics.median(r['refresh'] for r in ours):.2f} s (`python -c pass`: {floor:.2f} s)")
    print(f"ratio ours / naive:      {ours_rate / naive_rate:.2f}   (target >= 2.5)")
    print(f"ratio ours / model-only: {ours_rate / plain_rate:.2f} against one batch at a time, "
          f"{ours_rate / streams_rate:.2f} against the streams   (target >= 0.85)")
    cores = usable_cores()
    decode_cpu = statistics.median(decode)
    model_rate = max(plain_rate, streams_rate)
    import torch

    if torch.device(device).type == "cpu":
        ceiling = cores / (cores / model_rate + decode_cpu)
        print(f"ceiling on {cores} cores: the model's {1e3 * cores / model_rate:.1f} ms of CPU per image (the faster "
              f"model only) plus decoding's {1e3 * decode_cpu:.1f} ms (one process, median) with no gap between them "
              f"= {ceiling:.1f} images/s: {ceiling / naive_rate:.2f} x naive, {ceiling / model_rate:.2f} x that "
              f"model-only; ours reaches {ours_rate / ceiling:.2f} of it")
    else:  # the model takes no CPU: every core can decode, and the slower of the two sets the pace
        ceiling = min(model_rate, cores / decode_cpu)
        print(f"ceiling beside a {device} model: {cores} cores decoding at {1e3 * decode_cpu:.1f} ms of CPU per image "
              f"(one process, median) make {cores / decode_cpu:.1f} images/s, the model alone {model_rate:.1f}: "
              f"{ceiling:.1f} images/s; ours reaches {ours_rate / ceiling:.2f} of it")
    print(f"peak memory of the clipsearch index process tree (one more run, first, sampled every 20 ms, up to "
          f"{memory['processes']} processes): summed VmRSS {memory['rss']:.0f} MB, summed PSS {memory['pss']:.0f} MB "
          f"(target <= 1536 MB)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
