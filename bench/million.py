"""FAISS at a million images: build time, batch-1 latency, recall@10 against exact search, resident memory, and what
a new process pays to load the saved index and search once.

The collection is N seeded random unit vectors (512-d by default), the worst case for approximate search: no cluster
structure for a graph or a partition to exploit. Two kinds of query are timed: a random unit vector, and a stored vector
with noise added (what `similar` asks). The exact ground truth and the flat (exact) index's latency are measured in a
child process first, so the flat index's 2 GB never count towards the peak memory reported for the compressed index.

    python bench/million.py                      # N = 1,000,000, 200 queries of each kind (about 5 minutes on 2 cores)
    python bench/million.py --n 200000 --queries 100 --filtered

Prints medians; the machine's load average is printed beside them because a shared machine slows everything down.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from clipsearch.vectors import TRAIN_SAMPLE, VectorIndex, choose_plan

CHUNK = 20_000  # rows generated at a time: small, so the generator adds little to the peak memory


def chunk(seed: int, index: int, dim: int, rows: int = CHUNK) -> np.ndarray:
    """Rows [index * CHUNK, ...) of the collection: regenerated on demand, never all held at once."""
    x = np.random.default_rng([seed, index]).standard_normal((rows, dim), dtype=np.float32)
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # in place: no second copy of the chunk
    return x


def chunks(n: int, dim: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    for index, start in enumerate(range(0, n, CHUNK)):
        yield start, chunk(seed, index, dim, min(CHUNK, n - start))


def queries(n: int, dim: int, count: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(random unit vectors, stored vectors plus noise of norm `noise`, renormalised)."""
    rng = np.random.default_rng([seed, 999_999])
    random = rng.standard_normal((count, dim), dtype=np.float32)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    picks = np.sort(rng.choice(n, count, replace=False))
    similar = np.empty((count, dim), dtype=np.float32)
    for start, x in chunks(n, dim, seed):
        for row in np.flatnonzero((picks >= start) & (picks < start + len(x))):
            step = rng.standard_normal(dim).astype(np.float32)
            similar[row] = x[picks[row] - start] + noise * step / np.linalg.norm(step)
    similar /= np.linalg.norm(similar, axis=1, keepdims=True)
    return random, similar


def ids_of(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.int64) + 1  # SQLite row ids start at 1


def peak_rss_mb() -> float:
    """VmHWM: the most resident memory this process has held (MB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# exact side (child process) ---------------------------------------------------------------------------------------
def exact_side(args: argparse.Namespace, qs: np.ndarray, allowed_strides: list[int], out) -> None:
    """Ground truth top-10 for every query (and for each filter), and the flat index's batch-1 latency."""
    faiss.omp_set_num_threads(args.threads)
    k = 10
    best = np.full((len(qs), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(qs), k), dtype=np.int64)
    filtered = {s: (np.full((len(qs), k), -np.inf, np.float32), np.zeros((len(qs), k), np.int64)) for s in allowed_strides}
    flat = VectorIndex(args.dim)  # a flat index, searched exactly as the library searches it
    flat_n = min(args.flat_n, args.n)
    for start, x in chunks(args.n, args.dim, args.seed):
        scores = qs @ x.T
        rows = np.arange(start, start + len(x))
        merge(best, best_rows, scores, rows, k)
        for stride, (fs, fr) in filtered.items():
            keep = (ids_of(rows) % stride) == 0
            merge(fs, fr, scores[:, keep], rows[keep], k)
        if start < flat_n:
            flat.add(ids_of(rows[: flat_n - start]), x[: flat_n - start])
    timings = []
    for q in qs[: args.flat_queries]:
        t = time.perf_counter()
        flat.search(q, k)
        timings.append(time.perf_counter() - t)
    out.put({"truth": ids_of(best_rows), "filtered": {s: ids_of(fr) for s, (_fs, fr) in filtered.items()},
             "flat_n": flat_n, "flat_ms": np.array(timings) * 1e3, "flat_peak_mb": peak_rss_mb()})


def merge(best: np.ndarray, best_rows: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int) -> None:
    if not scores.shape[1]:
        return
    take = min(k, scores.shape[1])
    top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
    all_scores = np.concatenate([best, np.take_along_axis(scores, top, 1)], axis=1)
    all_rows = np.concatenate([best_rows, rows[top]], axis=1)
    order = np.argsort(-all_scores, axis=1)[:, :k]
    best[:] = np.take_along_axis(all_scores, order, 1)
    best_rows[:] = np.take_along_axis(all_rows, order, 1)


# approximate side -------------------------------------------------------------------------------------------------
def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def time_queries(index: VectorIndex, qs: np.ndarray, repeats: int, allowed: np.ndarray | None = None):
    """Batch-1 searches, each query `repeats` times; (wall ms, cpu ms, results of the first pass)."""
    return time_interleaved(index, [qs], repeats, allowed)[0]


def time_interleaved(index: VectorIndex, kinds: list[np.ndarray], repeats: int,
                     allowed: np.ndarray | None = None):
    """Like time_queries for several kinds of query at once, alternating query by query, so that a machine slowing
    down or speeding up during the run weighs on every kind alike. Timed one kind after the other, the second
    (similar) came out 20-27% slower than random in two runs, while alternating both took 4.5-4.9 ms. One (wall ms,
    cpu ms, results of the first pass) per kind."""
    for q in kinds[0][:5]:
        index.search(q, 10, allowed)  # warm the caches and FAISS's worker threads
    timed = [([], [], []) for _ in kinds]
    for repeat in range(repeats):
        for i in range(max(len(qs) for qs in kinds)):
            for qs, (wall, cpu, found) in zip(kinds, timed):
                if i >= len(qs):
                    continue
                t, c = time.perf_counter(), cpu_seconds()
                result = index.search(qs[i], 10, allowed)
                wall.append(time.perf_counter() - t)
                cpu.append(cpu_seconds() - c)
                if repeat == 0:
                    found.append(result.ids)
    return [(np.array(wall) * 1e3, np.array(cpu) * 1e3, found) for wall, cpu, found in timed]


_COLD = """
import json, sys, time
import numpy as np
from clipsearch.vectors import VectorIndex
start = time.perf_counter()
index = VectorIndex.load(sys.argv[1])
loaded = time.perf_counter()
index.search(np.array(json.loads(sys.argv[2]), np.float32), 10)
searched = time.perf_counter()
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps([(loaded - start) * 1e3, (searched - loaded) * 1e3, peak / 1024]))
"""


def cold_loads(index: VectorIndex, query: np.ndarray, runs: int) -> np.ndarray:
    """Save the index, then load it and search once in `runs` new processes (what a cold query does with it):
    rows of (load ms, FAISS import included; first search ms; the process's peak RSS MB)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "images.faiss"
        index.save(path)
        out = [json.loads(subprocess.run([sys.executable, "-c", _COLD, str(path), json.dumps(query.tolist())],
                                         check=True, capture_output=True, text=True).stdout)
               for _ in range(runs)]
    return np.array(out)


def line(name: str, wall: np.ndarray, cpu: np.ndarray | None = None, extra: str = "") -> None:
    text = f"  {name:<34} p50 {np.median(wall):7.2f} ms   p95 {np.percentile(wall, 95):7.2f} ms"
    if cpu is not None:
        text += f"   cpu p50 {np.median(cpu):6.2f} ms"
    print(text + (f"   {extra}" if extra else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200, help="queries of each kind")
    parser.add_argument("--repeats", type=int, default=3, help="times each query is timed")
    parser.add_argument("--noise", type=float, default=0.5, help="norm of the noise added to stored vectors")
    parser.add_argument("--flat-n", type=int, default=1_000_000, help="vectors in the flat index timed for comparison")
    parser.add_argument("--flat-queries", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2, help="faiss.omp_set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--filtered", action="store_true", help="also time filtered searches (exact vs scan path)")
    parser.add_argument("--pq-m", type=int, help="override the plan's PQ sub-quantizers (e.g. 128 = 64-byte codes)")
    parser.add_argument("--candidates", type=float, help="override the plan's candidates per sqrt(N)")
    parser.add_argument("--cold-runs", type=int, default=3, help="new processes that load the saved index and "
                        "search once (0: skip)")
    parser.add_argument("--sweep", default="", help="also time these candidates-per-sqrt(N) factors on the same "
                        "index, comma-separated (e.g. 0.25,0.5)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    print(f"N={args.n:,} dim={args.dim} queries={args.queries} x2 kinds, repeats={args.repeats}, "
          f"threads={args.threads}, load average {os.getloadavg()[0]:.1f}", flush=True)

    random_qs, similar_qs = queries(args.n, args.dim, args.queries, args.seed, args.noise)
    strides = [1000, 100, 20, 4] if args.filtered else []
    t = time.perf_counter()
    channel = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=exact_side, args=(args, np.concatenate([random_qs, similar_qs]), strides, channel))
    child.start()
    exact = channel.get()
    child.join()
    truth = exact["truth"]
    print(f"exact ground truth + flat index (child process): {time.perf_counter() - t:.1f} s; "
          f"flat over {exact['flat_n']:,} vectors held {exact['flat_peak_mb']:.0f} MB peak", flush=True)

    plan = choose_plan(args.n, args.dim)
    plan = dataclasses.replace(plan, pq_m=args.pq_m or plan.pq_m, candidates=args.candidates or plan.candidates)
    print(f"plan: {plan}  (estimated {plan.memory(args.n, args.dim) / 1e6:.0f} MB)", flush=True)
    t = time.perf_counter()
    rng = np.random.default_rng([args.seed, 7])
    per_chunk = -(-TRAIN_SAMPLE // -(-args.n // CHUNK))
    sample = np.concatenate([x[np.sort(rng.choice(len(x), min(per_chunk, len(x)), replace=False))]
                             for _start, x in chunks(args.n, args.dim, args.seed)])
    sampled = time.perf_counter() - t
    t = time.perf_counter()
    index = VectorIndex.build_streaming(args.dim, ((ids_of(np.arange(s, s + len(x))), x)
                                                   for s, x in chunks(args.n, args.dim, args.seed)),
                                        generation=1, plan=plan, sample=sample, n=args.n)
    del sample
    build = time.perf_counter() - t
    print(f"build: {build:.1f} s (train + encode + add; drawing the training sample took {sampled:.1f} s more); "
          f"RSS after build {rss_mb():.0f} MB", flush=True)

    print(f"batch-1 search, k=10 (load average {os.getloadavg()[0]:.1f}):", flush=True)
    line(f"flat over {exact['flat_n']:,} (exact, random q)", exact["flat_ms"])
    kinds = {"random": (random_qs, truth[: len(random_qs)]), "similar": (similar_qs, truth[len(random_qs):])}
    timed = time_interleaved(index, [qs for qs, _gt in kinds.values()], args.repeats)
    for (name, (_qs, gt)), (wall, cpu, found) in zip(kinds.items(), timed):
        line(f"{plan.kind} ({name} q, interleaved)", wall, cpu, f"recall@10 {recall(found, gt):.3f}")
    for factor in [float(f) for f in args.sweep.split(",") if f.strip()]:
        if plan.kind == "flat-ip":
            break
        index.engine.plan = dataclasses.replace(plan, candidates=factor)
        wall, cpu, found = time_queries(index, random_qs, args.repeats)
        line(f"candidates {factor:g} x sqrt(N) = {index.engine.candidates(10, index.ntotal)} (random q)", wall, cpu,
             f"recall@10 {recall(found, truth[: len(random_qs)]):.3f}")
        index.engine.plan = plan

    if args.cold_runs:
        cold = cold_loads(index, random_qs[0], args.cold_runs)
        print(f"saved, then loaded and searched once in {args.cold_runs} new processes (medians): load "
              f"{np.median(cold[:, 0]):.0f} ms (FAISS import included), first search {np.median(cold[:, 1]):.1f} ms, "
              f"peak RSS {np.median(cold[:, 2]):.0f} MB", flush=True)

    if args.filtered:
        print("filtered search (ids % stride == 0), random queries:", flush=True)
        for stride in strides:
            allowed = ids_of(np.arange(args.n))
            allowed = allowed[allowed % stride == 0]
            gt = exact["filtered"][stride][: len(random_qs)]
            wall, cpu, found = time_queries(index, random_qs, 1, allowed)
            outside = sum(int(np.isin(f, allowed, invert=True).sum()) for f in found)
            line(f"allowed {len(allowed):,} (chosen path)", wall, cpu,
                 f"recall@10 {recall(found, gt):.3f}, ids outside the filter {outside}")
            if plan.kind != "flat-ip":  # both paths forced, shard after shard, to place the crossover
                parts = [(shard, shard.rows(allowed)) for shard in index.engine.shards]
                budget = index.engine.candidates(10, len(allowed)) // len(parts)
                exact_ms, scan_ms = [], []
                for q in random_qs[:20]:
                    t = time.perf_counter()
                    for shard, rows in parts:
                        shard.rescore(q[None], rows, 10)
                    exact_ms.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    for shard, rows in parts:
                        selector = faiss.IDSelectorBatch(shard.row_ids[rows])
                        _, found = shard.scan.search(q[None], budget,
                                                     params=faiss.SearchParametersIVF(nprobe=1, sel=selector))
                        shard.rescore(q[None], shard.rows(np.sort(found[0][found[0] >= 0])), 10)
                    scan_ms.append(time.perf_counter() - t)
                line(f"allowed {len(allowed):,} (exact path forced)", np.array(exact_ms) * 1e3)
                line(f"allowed {len(allowed):,} (scan path forced)", np.array(scan_ms) * 1e3)
    print(f"peak resident memory (VmHWM) of this process: {peak_rss_mb():.0f} MB; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
