"""The everyday run on a big library: `clipsearch index` again over 80,000 files of which none changed, in a new
process, beside `python -c pass`.

    python bench/refresh_speed.py [--runs 5] [--copies 80] [--work /tmp/clipsearch-bench-refresh]

The library is the 1,000 Flickr8k test images hard-linked into `--copies` folders (80,000 files; links cost no disk),
indexed once with the project's tiny CLIP (tests/assets), which embeds fast; a refresh never loads the model, so
which model built the index does not matter to what is timed. Library and index are built under `--work` on the first
run and reused. Prints the median and p95 wall time of the refresh and the floor, interleaved.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench")]

from cold_query import summary, timed  # noqa: E402 - one way to time a new process and print its runs


def library(work: Path, images: Path, copies: int) -> Path:
    """`copies` folders of hard links to every image (copies where links cannot be made), built once."""
    root = work / f"library-{copies}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        sources = sorted(images.glob("*.jpg"))
        for n in range(copies):
            folder = root / f"f{n:03d}"
            folder.mkdir(parents=True)
            for source in sources:
                try:
                    os.link(source, folder / source.name)
                except OSError:
                    shutil.copy2(source, folder / source.name)
        done.touch()
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--copies", type=int, default=80)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipsearch-bench-refresh"))
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k-test1k" / "images")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"no folder {args.images} (the shared data sits beside the repository)")
    root = library(args.work, args.images, args.copies)
    index = args.work / f"index-{args.copies}"
    env = os.environ.copy()
    if not (index / "clipsearch.db").exists():
        print(f"indexing {root} once (tiny model) ...", flush=True)
        subprocess.run([sys.executable, "-m", "clipsearch", "index", str(root), "--index", str(index), "--model",
                        "clipsearch-tiny-clip", "--pretrained", str(REPO / "tests" / "assets" / "tiny-clip.safetensors")],
                       cwd=REPO, env=env, check=True, capture_output=True)
    refresh = [sys.executable, "-m", "clipsearch", "index", "--index", str(index)]
    timed(refresh, env)  # warm the OS file cache
    runs, floor = [], []
    for _ in range(args.runs):
        runs.append(timed(refresh, env))
        floor.append(timed([sys.executable, "-c", "pass"], env))
    files = sum(1 for _ in root.rglob("*.jpg"))
    print(f"{files} files in {args.copies} folders, none changed")
    print(summary("clipsearch index (refresh, nothing new)", runs))
    print(summary("python -c pass", floor))


if __name__ == "__main__":
    main()
