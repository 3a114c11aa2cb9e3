"""Indexing speed on a busy machine: `clipsearch index` of the real photo folder alone and beside other programs that
keep cores busy, interleaved in one run, with a random-init ViT-B-32 checkpoint (it costs what the real weights cost).

    python bench/busy_index.py [--runs 3] [--busy 1,2] [--folder ../shared/data/photos]

Someone indexing a photo library keeps using the machine. Each level N starts N busy loops (pure Python, at this
bench's own priority, so the scheduler weighs them like the index's own processes) before `clipsearch index` runs over
a fresh index, and stops them after. Prints, per level, the medians of the rate the run reports (scan to last commit,
model load excluded) and of the whole-process rate, and their ratio to the idle runs.

Decode workers lowered to nice 19 beside a model on the CPU, and left there, starved beside two busy loops on 2 cores:
1.6-1.7 images/s against 16.0-16.8 at equal priority. The indexer now replaces them when the model sits idle waiting
for them (indexer.STARVED_AFTER); this bench shows whether that works.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench")]

from index_speed import checkpoint_in_child, index_run  # noqa: E402 - one way to run and read `clipsearch index`

from clipsearch.cores import usable_cores  # noqa: E402


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy", default="1,2", help="comma-separated numbers of busy loops beside the index")
    parser.add_argument("--folder", type=Path, default=REPO.parent / "shared" / "data" / "photos")
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"no folder {args.folder} (the shared data sits beside the repository)")
    levels = [0, *(int(n) for n in args.busy.split(",") if n.strip())]
    results: dict[int, list[dict]] = {level: [] for level in levels}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = checkpoint_in_child(Path(tmp))
        for run in range(args.runs):
            for level in levels:
                loops = busy_loops(level)
                try:
                    results[level].append(index_run(checkpoint, args.folder, []))
                finally:
                    for loop in loops:
                        loop.kill()
                        loop.wait()
                last = results[level][-1]
                print(f"run {run + 1}, {level} busy: {last['reported']:.1f} images/s reported, "
                      f"{last['wall']:.1f} whole process", flush=True)
    print(f"folder {args.folder}, {args.runs} runs, {usable_cores()} cores")
    idle = statistics.median(r["reported"] for r in results[0])
    idle_wall = statistics.median(r["wall"] for r in results[0])
    for level in levels:
        reported = statistics.median(r["reported"] for r in results[level])
        wall = statistics.median(r["wall"] for r in results[level])
        print(f"{level} busy loops: median {reported:.1f} images/s reported ({reported / idle:.2f} of idle), "
              f"{wall:.1f} whole process ({wall / idle_wall:.2f} of idle)")


if __name__ == "__main__":
    main()
