"""An offline demo: generate the world, index it with the project's own tiny CLIP, and run queries a person can judge.

Real photo search uses the default ViT-B-32 weights, downloaded on first use; this demo needs no network because the
tiny model (tests/assets/tiny-clip.safetensors, trained by `python -m clipsearch.train`) ships with the repository. It
loads through the same `--model/--pretrained` path as any open_clip model, so it exercises the whole engine: decoding
PNG and JPEG files (some EXIF-rotated), indexing, caption import, text->image, image->caption and a mixed query.

    python -m clipsearch.demo [--out indexes/demo]      (or: make demo)

Every result is printed next to the true description of the picture it names, so you can see whether it is right.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import world
from .errors import BadInput, ClipsearchError, ModelMismatch
from .index import Index

MODEL = "clipsearch-tiny-clip"
CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-clip.safetensors"
TEXT_QUERIES = (
    "a large red star",  # red+star never appears in the training pictures
    "a small yellow circle on a black background",  # nor does yellow+circle
    "an orange square",  # nor orange+square
    "a green circle on a striped background",
)
COLLECTION = "world"


def run(out: Path, checkpoint: Path = CHECKPOINT, n: int = 300, seed: int = 1,
        say: Callable[[str], None] = print) -> None:
    """Generate a test world into `out/world`, index it into `out/index` and print example queries."""
    if not checkpoint.is_file():
        raise ClipsearchError(f"the tiny model is missing: {checkpoint} (train it: python -m clipsearch.train "
                              f"--out {checkpoint})")
    started = time.perf_counter()
    jsonl, made = _world(out / "world", n, seed)
    records = {str(Path(r["path"]).resolve()): r for r in world.read_records(jsonl)}
    say(f"{'generated' if made else 'using the'} {len(records)} captioned pictures in {jsonl.parent} "
        f"({time.perf_counter() - started:.1f} s)")
    with _demo_index(out / "index", checkpoint, say) as idx:
        report = idx.index([jsonl.parent])
        captions = idx.add_captions(jsonl, collection=COLLECTION)
        say(f"indexed {report.added} new pictures and {captions.added} new captions into {idx.path} "
            f"({time.perf_counter() - started:.1f} s so far)\n")
        for text in TEXT_QUERIES:
            say(f'text -> image: "{text}"')
            for hit in idx.search(text, k=3):
                say(f"   {hit.score:.3f}  {_short(hit.path)}  which shows: {_truth(records, hit.path)}")
        held_out = [r for r in records.values() if r["held_out"] and r["kind"] == "single"][:2]
        for rec in held_out:
            say(f"\nimage -> caption: {_short(rec['path'])}, which shows: {rec['captions'][0]}")
            for hit in idx.search_captions(image=rec["path"], k=3, collection=COLLECTION):
                say(f"   {hit.score:.3f}  \"{hit.text}\"")
        red_circle = _first(records.values(), colour="red", shape="circle")
        if red_circle is not None:
            say(f"\nmixed: the picture {_short(red_circle['path'])} ({red_circle['captions'][0]}) + \"blue\" - \"red\"")
            for hit in idx.search("blue", image=red_circle["path"], not_="red", k=3):
                say(f"   {hit.score:.3f}  {_short(hit.path)}  which shows: {_truth(records, hit.path)}")
    say(f"\ndone in {time.perf_counter() - started:.1f} s. Try your own: clipsearch search \"two purple crosses\" "
        f"--index {out / 'index'}")


def _demo_index(folder: Path, checkpoint: Path, say: Callable[[str], None]) -> Index:
    """The demo's own index; one built with earlier weights of the tiny model (a retrained checkpoint) is derived
    data only the demo uses, so it is rebuilt rather than refused."""
    try:
        return Index(folder, model=MODEL, pretrained=str(checkpoint))
    except ModelMismatch:  # refused on opening, before anything was loaded or written
        say(f"{folder} was built with other weights of the tiny model: rebuilding it")
        shutil.rmtree(folder)
        return Index(folder, model=MODEL, pretrained=str(checkpoint))


def _world(folder: Path, n: int, seed: int) -> tuple[Path, bool]:
    """The world's captions.jsonl, generated unless the same one is there (it is deterministic: same files again).
    Drawn into a temporary folder and renamed, so an interrupted demo leaves no half world behind; one drawn by an
    earlier generator is the demo's own derived data and is replaced."""
    jsonl = folder / "captions.jsonl"
    if jsonl.is_file() and world.matches(jsonl, "test", n, seed):
        return jsonl, False
    if folder.exists() and not jsonl.is_file():
        raise BadInput(f"{folder} exists but holds no generated world: remove it, or pass another --out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".world-") as tmp:
        world.generate(Path(tmp) / "world", "test", n, seed)
        if folder.exists():
            folder.rename(Path(tmp) / "stale")  # removed with the temporary folder
        (Path(tmp) / "world").rename(folder)
    return jsonl, True


def _truth(records: dict[str, dict[str, Any]], path: str) -> str:
    rec = records.get(str(Path(path).resolve()))
    return rec["captions"][0] if rec else "(not a world picture)"


def _short(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def _first(records: Any, **attributes: str) -> dict[str, Any] | None:
    return next((r for r in records if r["kind"] == "single"
                 and all(r["attributes"].get(k) == v for k, v in attributes.items())), None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsearch.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="indexes/demo", help="folder for the generated world and its index")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT), help="the tiny model's weights")
    parser.add_argument("--n", type=int, default=300, help="pictures to generate")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        run(Path(args.out), Path(args.checkpoint), args.n, args.seed)
    except ClipsearchError as exc:
        print(f"clipsearch demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
