"""A warm text query through the library at 100,000 images: text -> images with the index open and loaded.

    python bench/warm_query.py [--queries 200] [--images 100000] [--work /tmp/clipsearch-bench-query] [--torch]

Uses the index bench/cold_query.py builds (and caches under --work): a random-init ViT-B-32 model identity with its
ONNX text tower, 100,000 512-d vectors (FAISS kind from vectors.choose_plan). After a few warm-up queries it times, for
each of --queries distinct caption-like texts (Flickr8k captions when ../shared/data has them): `Index.search(text,
k=10)` (encode + search + SQLite rows: what a library caller gets), encode only (the index's text encoder itself:
`Index.encode_texts` would answer from the vectors it keeps for texts already asked), and search
only (the FAISS search of that query's vector). p50 and p95 of each, side by side, and the CPU time of the full query
(a busy machine inflates wall time far more than CPU time); with --torch also the torch text encoder on the same texts
(the model loaded and warm), for the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

CAPTIONS = REPO.parent / "shared" / "data" / "flickr8k-test1k" / "captions.jsonl"


def texts(count: int) -> list[str]:
    """Distinct caption-like queries: real captions when available, else sentences drawn from a small vocabulary."""
    found: list[str] = []
    if CAPTIONS.exists():
        for line in CAPTIONS.read_text().splitlines():
            found += json.loads(line)["captions"]
    found = list(dict.fromkeys(found))
    rng = random.Random(0)
    words = "a the dog cat child man woman red blue beach street snow bike ball running on in at with near".split()
    while len(found) < count:
        found.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))))
    rng.shuffle(found)
    return found[:count]


def percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(times), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def line(name: str, times: list[float]) -> str:
    p50, p95 = percentiles(times)
    return f"{name:46} p50 {p50 * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench-query"))
    parser.add_argument("--torch", action="store_true", help="also time the torch text encoder (loads the model)")
    args = parser.parse_args()
    from cold_query import build_index

    import clipsearch

    path = build_index(args.work, args.images)
    queries = texts(args.queries)
    with clipsearch.open(path, create=False) as idx:
        start = time.perf_counter()
        vectors = idx.vectors()
        loaded = time.perf_counter() - start
        for warm in ("warm up", "a dog", "two children playing on the beach"):
            idx.search(warm, k=10)
        encoder = idx.text_encoder() or idx.model  # what Index.encode_texts uses for a text it has not kept
        full, full_cpu, encode, search = [], [], [], []
        for text in queries:
            c0, t0 = time.process_time(), time.perf_counter()
            hits = idx.search(text, k=10)
            t1, c1 = time.perf_counter(), time.process_time()
            full_cpu.append(c1 - c0)
            vector = encoder.encode_texts([text])[0]
            t2 = time.perf_counter()
            vectors.search(vector, 10)
            t3 = time.perf_counter()
            assert len(hits) == 10
            full.append(t1 - t0)
            encode.append(t2 - t1)
            search.append(t3 - t2)
        torch_encode: list[float] = []
        if args.torch:
            model = idx.model
            for text in queries[:3]:
                model.encode_texts([text])
            for text in queries:
                t0 = time.perf_counter()
                model.encode_texts([text])
                torch_encode.append(time.perf_counter() - t0)
        load = os.getloadavg()
        print(f"index: {path} ({vectors.ntotal} vectors, {vectors.dim}-d, FAISS kind {vectors.kind}, loaded in "
              f"{loaded:.2f} s); text encoder: {idx.query_encoder} ({idx.info()['query_weights']} weights); "
              f"{len(queries)} queries; load average "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(line("Index.search(text, k=10): encode+search+rows", full))
    print(line("  the same, CPU time of the process (all threads)", full_cpu))
    print(line("  encode only (the text encoder)", encode))
    print(line("  search only (FAISS, k=10)", search))
    if torch_encode:
        ratio = percentiles(torch_encode)[0] / percentiles(encode)[0]
        print(line("  torch encode_texts (for comparison)", torch_encode) + f"   {ratio:.1f}x the ONNX encoder")
    p50 = percentiles(full)[0]
    print(f"target: p50 <= 20 ms -> {'met' if p50 <= 0.020 else 'NOT met'} ({p50 * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
