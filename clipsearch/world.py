"""A generated world of captioned images, so that a model the project trains itself can be tested for meaning.

No pretrained weights can be downloaded where the tests run, so nothing could show that search returns the RIGHT
images. This module draws simple scenes (coloured shapes of two sizes at named positions, counts, left/right and
above/below relations, on four backgrounds), saves them as real PNG and JPEG files of assorted sizes (some JPEGs with
their pixels stored rotated under a non-default EXIF orientation), and writes Flickr-style ``captions.jsonl`` beside
them. Some colour+shape pairs (HELD_OUT) never appear in the training split, so tests measure generalisation.

Everything follows from the seed: the same (split, n, seed) gives byte-identical files. Pillow and numpy only, no torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .errors import BadInput

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 210, 40),
    "purple": (135, 55, 175),
    "orange": (245, 130, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "gray": (128, 128, 128),
    "black": (24, 24, 24),
    "striped": (215, 215, 215),  # light diagonal stripes around this grey
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.2, 0.26), "large": (0.38, 0.46)}
"""Object diameter as a fraction of the scene square (the centre crop the model sees)."""

POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "middle": (0.5, 0.5),
}
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("green", "triangle"), ("orange", "square"), ("yellow", "circle"), ("purple", "cross")}
)
"""Colour+shape pairs that never appear in the train split (in any object of any image) and are common in test."""

SPLITS = ("train", "test")
KINDS = ("single", "count", "relation")
KIND_WEIGHTS = (0.5, 0.25, 0.25)
TEST_HELD_OUT_RATE = 0.3
"""Share of test images drawn around a held-out pair, so that subset is large enough to measure on its own."""

_SUPERSAMPLE = 2  # draw at twice the size, then box-reduce: anti-aliased edges like a real picture's
_COUNT_WORDS = {2: "two", 3: "three"}
_POSITION_OF = {"left": "on the left side of", "right": "on the right side of", "top": "at the top of",
                "bottom": "at the bottom of", "middle": "in the middle of"}
_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "middle": "in the middle"}
# EXIF orientation -> the transpose that stores the displayed picture so that exif_transpose() shows it upright again.
_STORE_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
_MAX_TRIES = 1000


@dataclass(frozen=True)
class Thing:
    """One drawn object; geometry in pixels of the displayed picture."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    x: float
    y: float
    diameter: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and save one picture and to say what is in it."""

    kind: str
    width: int
    height: int
    background: str
    background_rgb: tuple[int, int, int]
    things: tuple[Thing, ...]
    captions: tuple[str, ...]
    attributes: dict[str, Any]
    format: str  # "png" or "jpeg"
    quality: int  # JPEG quality (unused for PNG)
    orientation: int  # EXIF orientation the JPEG is stored under (1 = none)

    @property
    def held_out(self) -> bool:
        return any((t.colour, t.shape) in HELD_OUT for t in self.things)

    def record(self, image: str, split: str) -> dict[str, Any]:
        """The captions.jsonl line: Flickr-style image + captions, then what a test needs to check or redraw it."""
        return {
            "image": image, "captions": list(self.captions), "split": split, "kind": self.kind,
            "held_out": self.held_out, "attributes": self.attributes, "width": self.width, "height": self.height,
            "background": self.background, "background_rgb": list(self.background_rgb),
            "things": [asdict(t) | {"rgb": list(t.rgb)} for t in self.things],
            "format": self.format, "quality": self.quality, "orientation": self.orientation,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Scene":
        """Rebuild a scene from its captions.jsonl line (to redraw it and compare with what a decoder shows)."""
        things = tuple(Thing(**(t | {"rgb": tuple(t["rgb"])})) for t in rec["things"])
        return cls(rec["kind"], rec["width"], rec["height"], rec["background"], tuple(rec["background_rgb"]), things,
                   tuple(rec["captions"]), rec["attributes"], rec["format"], rec["quality"], rec["orientation"])


# ------------------------------------------------------------------------------------------------------------ captions


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an orange star")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def _single_captions(size: str, colour: str, shape: str, pos: str, bg: str) -> list[str]:
    """The canonical (first) caption leaves the position out: a model this small, trained for 15 CPU minutes, tells
    left from middle poorly (it was the largest error class when the canonical caption named it), so the retrieval tests
    lean on colour, shape, size, background, count and relations; the other phrasings still name the position."""
    p = _POSITION[pos]
    return [
        f"a {size} {colour} {shape} on a {bg} background",
        f"{bg} background with a {size} {colour} {shape} {p}",
        f"a picture of a {size} {colour} {shape} {p} against a {bg} background",
        f"{_a(colour)} {shape}, {size}, {p}, on {bg}",
        f"one {size} {colour} {shape} {p}",
        f"a {size} {colour} {shape} {_POSITION_OF[pos]} a {bg} background",
        f"{_a(colour)} {shape} {p}",
        f"{_a(colour)} {shape}",
    ]


def _count_captions(count: int, size: str, colour: str, shape: str, bg: str) -> list[str]:
    n, shapes = _COUNT_WORDS[count], _plural(shape)
    return [
        f"{n} {size} {colour} {shapes} on a {bg} background",
        f"{bg} background with {n} {size} {colour} {shapes}",
        f"a picture of {n} {size} {colour} {shapes} against a {bg} background",
        f"{count} {colour} {shapes} on {bg}",
        f"{n} {colour} {shapes}",
        f"a group of {n} {size} {colour} {shapes}",
    ]


def _relation_captions(first: Thing, relation: str, second: Thing, bg: str) -> list[str]:
    a, b = _a(f"{first.colour} {first.shape}"), _a(f"{second.colour} {second.shape}")
    forward, backward = ("to the left of", "to the right of") if relation == "left of" else ("above", "below")
    return [
        f"{a} {forward} {b} on a {bg} background",
        f"{b} {backward} {a} on a {bg} background",
        f"{bg} background with {a} {forward} {b}",
        f"{a} {forward} {b}",
        f"{b} {backward} {a}",
        f"{a} and {b} on {bg}",
    ]


def _pick_captions(rng: np.random.Generator, captions: list[str], keep: int = 5) -> tuple[str, ...]:
    """The canonical caption first (it alone must say everything), then `keep - 1` of the other phrasings."""
    rest = [captions[i] for i in sorted(rng.choice(np.arange(1, len(captions)), size=keep - 1, replace=False))]
    return (captions[0], *rest)


# ------------------------------------------------------------------------------------------------------------ sampling


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))  # type: ignore[return-value]


def _pair(rng: np.random.Generator, split: str, want_held_out: bool,
          avoid: tuple[str, str] | None = None) -> tuple[str, str]:
    """A colour+shape pair: held-out ones only in test, and there on purpose when asked."""
    if want_held_out:
        pairs = sorted(HELD_OUT - {avoid} if avoid else HELD_OUT)
    else:
        pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT and (c, s) != avoid]
    return pairs[int(rng.integers(len(pairs)))]


class _Canvas:
    """The displayed picture's size and the centred square inside it that the model's centre crop keeps."""

    def __init__(self, rng: np.random.Generator) -> None:
        side = int(rng.integers(96, 321))
        other = int(np.clip(side * rng.uniform(0.6, 1.67), 96, 320)) if rng.random() < 0.7 else side
        self.width, self.height = (side, other) if rng.random() < 0.5 else (other, side)
        self.side = min(self.width, self.height)
        self.left = (self.width - self.side) / 2
        self.top = (self.height - self.side) / 2

    def thing(self, rng: np.random.Generator, colour: str, shape: str, fx: float, fy: float, fd: float) -> Thing:
        """A thing at (fx, fy) with diameter fd, all as fractions of the square."""
        angle = float(rng.uniform(-15, 15)) if shape != "circle" else 0.0
        return Thing(shape, colour, _jitter(rng, COLOURS[colour], 20), round(self.left + fx * self.side, 2),
                     round(self.top + fy * self.side, 2), round(fd * self.side, 2), round(angle, 2))


def _spread(rng: np.random.Generator, count: int, diameter: float) -> list[tuple[float, float]]:
    """`count` centres in the square whose objects neither overlap nor leave the square."""
    margin = diameter / 2 + 0.05
    for _ in range(_MAX_TRIES):
        points = [tuple(rng.uniform(margin, 1 - margin, 2)) for _ in range(count)]
        if all(math.dist(p, q) > diameter * 1.25 for i, p in enumerate(points) for q in points[i + 1:]):
            return points  # type: ignore[return-value]
    raise RuntimeError("cannot place objects without overlap")  # pragma: no cover - sizes are chosen so they fit


def _sample_scene(rng: np.random.Generator, split: str) -> Scene:
    kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
    held = split == "test" and rng.random() < TEST_HELD_OUT_RATE
    canvas = _Canvas(rng)
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    colour, shape = _pair(rng, split, held)
    if kind == "single":
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        pos = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        fx, fy = (v + rng.uniform(-0.04, 0.04) for v in POSITIONS[pos])
        things: tuple[Thing, ...] = (canvas.thing(rng, colour, shape, fx, fy, rng.uniform(*SIZES[size])),)
        captions = _single_captions(size, colour, shape, pos, bg)
        attributes: dict[str, Any] = {"size": size, "position": pos}
    elif kind == "count":
        count = 2 + int(rng.integers(2))
        size = "small" if count == 3 else list(SIZES)[int(rng.integers(len(SIZES)))]
        diameter = rng.uniform(*SIZES[size]) if size == "small" else rng.uniform(0.3, 0.34)
        things = tuple(canvas.thing(rng, colour, shape, fx, fy, diameter) for fx, fy in _spread(rng, count, diameter))
        captions = _count_captions(count, size, colour, shape, bg)
        attributes = {"size": size, "count": count}
    else:
        other = _pair(rng, split, held and rng.random() < 0.2, avoid=(colour, shape))
        relation = "left of" if rng.random() < 0.5 else "above"
        near, far = rng.uniform(0.22, 0.36), rng.uniform(0.64, 0.78)
        across = rng.uniform(0.3, 0.7, 2)
        if rng.random() < 0.5:  # which of the two is named first
            colour, shape, other = other[0], other[1], (colour, shape)
        sizes = rng.uniform(0.2, 0.27, 2)
        if relation == "left of":
            first = canvas.thing(rng, colour, shape, near, across[0], sizes[0])
            second = canvas.thing(rng, other[0], other[1], far, across[1], sizes[1])
        else:
            first = canvas.thing(rng, colour, shape, across[0], near, sizes[0])
            second = canvas.thing(rng, other[0], other[1], across[1], far, sizes[1])
        things = (first, second)
        captions = _relation_captions(first, relation, second, bg)
        attributes = {"relation": relation, "other_colour": other[0], "other_shape": other[1]}
    attributes = {"colour": colour, "shape": shape, **attributes}
    fmt = "jpeg" if rng.random() < 0.5 else "png"
    orientation = 1
    if fmt == "jpeg" and rng.random() < 0.4:
        orientation = int(rng.choice(sorted(_STORE_TRANSPOSE)))
    return Scene(kind, canvas.width, canvas.height, bg, _jitter(rng, BACKGROUNDS[bg], 8), things,
                 _pick_captions(rng, captions), attributes, fmt, int(rng.integers(80, 96)), orientation)


def sample_scenes(split: str, n: int, seed: int) -> list[Scene]:
    """The world's scenes, in order; in test, every first caption differs from every other one."""
    if split not in SPLITS:
        raise BadInput(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadInput(f"n must be a whole number of at least 1 (got {n!r})")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    scenes: list[Scene] = []
    seen: set[str] = set()
    misses = 0
    while len(scenes) < n:
        scene = _sample_scene(rng, split)
        if split == "test" and scene.captions[0] in seen:
            misses += 1
            if misses > _MAX_TRIES:  # consecutive: the world has (nearly) run out of distinct scenes
                raise BadInput(f"cannot make {n} test images with distinct first captions; ask for fewer")
            continue
        misses = 0
        seen.add(scene.captions[0])
        scenes.append(scene)
    return scenes


# ------------------------------------------------------------------------------------------------------------- drawing


def _polygon(thing: Thing, scale: float) -> list[tuple[float, float]]:
    r = thing.diameter * scale / 2
    if thing.shape == "square":
        corners = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif thing.shape == "triangle":
        corners = [(math.cos(math.radians(a)) * 1.05, math.sin(math.radians(a)) * 1.05 + 0.15) for a in (-90, 30, 150)]
    elif thing.shape == "star":
        corners = [(math.cos(math.radians(-90 + 36 * i)) * (1.05 if i % 2 == 0 else 0.45),
                    math.sin(math.radians(-90 + 36 * i)) * (1.05 if i % 2 == 0 else 0.45)) for i in range(10)]
    elif thing.shape == "cross":
        a, b = 0.3, 0.95
        corners = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                   (-a, -a)]
    else:  # pragma: no cover - circle is drawn as an ellipse
        raise ValueError(thing.shape)
    cos, sin = math.cos(math.radians(thing.angle)), math.sin(math.radians(thing.angle))
    cx, cy = thing.x * scale, thing.y * scale
    return [(cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)) for u, v in corners]


def render(scene: Scene) -> Image.Image:
    """The picture as a person should see it (before any storage rotation)."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (scene.width * s, scene.height * s), scene.background_rgb)
    draw = ImageDraw.Draw(img)
    if scene.background == "striped":
        light = tuple(min(255, v + 25) for v in scene.background_rgb)
        step = max(4, round(min(scene.width, scene.height) * s / 12))
        span = (scene.width + scene.height) * s
        for x in range(-span, span, 2 * step):
            draw.polygon([(x, 0), (x + step, 0), (x + step + span, span), (x + span, span)], fill=light)
    for thing in scene.things:
        if thing.shape == "circle":
            r = thing.diameter * s / 2
            draw.ellipse([thing.x * s - r, thing.y * s - r, thing.x * s + r, thing.y * s + r], fill=thing.rgb)
        else:
            draw.polygon(_polygon(thing, s), fill=thing.rgb)
    return img.reduce(s)


def _save(job: tuple[Scene, str]) -> None:
    scene, path = job
    img = render(scene)
    if scene.format == "png":
        img.save(path, format="PNG", optimize=False)
        return
    exif = Image.Exif()
    if scene.orientation != 1:
        exif[0x0112] = scene.orientation
        img = img.transpose(_STORE_TRANSPOSE[scene.orientation])
    img.save(path, format="JPEG", quality=scene.quality, exif=exif.tobytes())


# --------------------------------------------------------------------------------------------------------------- files


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _save_many(jobs: Sequence[tuple[Scene, str]]) -> None:
    for job in jobs:
        _save(job)


def generate(out_dir: str | os.PathLike, split: str = "train", n: int = 1000, seed: int = 0,
             workers: int = 1) -> Path:
    """Write `n` pictures under OUT_DIR/images and their captions to OUT_DIR/captions.jsonl, which is returned.

    OUT_DIR must be absent or empty; captions.jsonl is written last, so its presence means the world is complete.
    `workers` > 1 draws in that many processes (the files are the same either way).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} is not an empty folder; the world needs one of its own")
    scenes = sample_scenes(split, n, seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = _names(scenes)
    jobs = [(scene, str(out / name)) for scene, name in zip(scenes, names)]
    if workers > 1 and n > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_save_many, list(_chunks(jobs, max(1, min(256, n // (4 * workers)))))))
    else:
        _save_many(jobs)
    jsonl = out / "captions.jsonl"
    partial = out / "captions.jsonl.partial"
    with partial.open("w", encoding="utf-8") as f:
        for scene, name in zip(scenes, names):
            f.write(_line(scene, name, split))
    partial.replace(jsonl)
    return jsonl


def matches(jsonl: str | os.PathLike, split: str, n: int, seed: int) -> bool:
    """Whether the world at `jsonl` is the one `generate` writes today for (split, n, seed). A world drawn with other
    settings, or by an earlier generator (other held-out pairs, say), must not be reused in its place."""
    try:
        lines = Path(jsonl).read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return False
    if len(lines) != n:
        return False
    scenes = sample_scenes(split, n, seed)
    return all(line == _line(scene, name, split) for line, scene, name in zip(lines, scenes, _names(scenes)))


def _names(scenes: list[Scene]) -> list[str]:
    width = max(4, len(str(len(scenes) - 1)))
    return [f"images/{i:0{width}d}.{'jpg' if s.format == 'jpeg' else 'png'}" for i, s in enumerate(scenes)]


def _line(scene: Scene, name: str, split: str) -> str:
    return json.dumps(scene.record(name, split), separators=(", ", ": ")) + "\n"


def read_records(jsonl: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a captions.jsonl, with `path` added: the image's absolute path."""
    jsonl = Path(jsonl)
    records = []
    with jsonl.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rec["path"] = str((jsonl.parent / rec["image"]).resolve())
                records.append(rec)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsearch.world", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="an absent or empty folder to write images/ and captions.jsonl into")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="drawing processes (default 1)")
    args = parser.parse_args(argv)
    try:
        jsonl = generate(args.out_dir, args.split, args.n, args.seed, args.workers)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BadInput.exit_code
    print(f"wrote {args.n} {args.split} images and {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
