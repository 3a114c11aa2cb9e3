"""Contrastive (CLIP) training of the project's tiny model on the generated world, on CPU, in minutes.

The checkpoint it writes (tests/assets/tiny-clip.safetensors) is what lets tests check that search returns the RIGHT
images, since no pretrained weights can be downloaded where they run. Images reach the model through the engine's own
path (media.load + media.to_model_input with the model's PreprocessSpec), so training sees exactly the pixels indexing
will. The saved file is a plain open_clip state_dict in float16 (to stay under 10 MB; the engine loads it into float32).

    python -m clipsearch.train --out tests/assets/tiny-clip.safetensors
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import media, world
from .errors import BadInput

MODEL_NAME = "clipsearch-tiny-clip"


@dataclass
class TrainConfig:
    """What a run depends on; recorded in the checkpoint's metadata so a file says how it was made."""

    steps: int = 1100
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    n_train: int = 12000
    seed: int = 0
    threads: int = 2
    workers: int = 2  # processes drawing and decoding the train world


@dataclass
class StepInfo:
    """Progress of a run, handed to the caller's callback (the library never prints)."""

    phase: str  # "world", "decode", "train"
    done: int
    total: int
    loss: float | None = None
    seconds: float = 0.0


@dataclass
class TrainReport:
    out: Path
    config: TrainConfig
    seconds: dict[str, float] = field(default_factory=dict)
    final_loss: float = float("nan")


def load_world(jsonl: str | Path, spec: media.PreprocessSpec, workers: int = 1,
               progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(records, uint8 (N, H, W, 3) model pixels): every image decoded exactly as the indexer decodes it."""
    records = world.read_records(jsonl)
    paths = [rec["path"] for rec in records]
    pixels = np.empty((len(records), *spec.size, 3), dtype=np.uint8)
    chunks = [paths[i:i + 250] for i in range(0, len(paths), 250)]
    if workers > 1 and len(chunks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(media.decode_many, chunks, [spec] * len(chunks))
    else:
        pool, results = None, (media.decode_many(chunk, spec) for chunk in chunks)
    try:
        done = 0
        for chunk in results:
            for path, decoded, reason in chunk:
                if decoded is None:
                    raise BadInput(f"cannot decode world image {path}: {reason}")
                pixels[done] = decoded.pixels
                done += 1
            if progress is not None:
                progress(done, len(paths))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return records, pixels


def _param_groups(net: Any, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's recipe: no decay on gains, biases and the temperature."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def save_checkpoint(net: Any, out: Path, metadata: dict[str, str]) -> None:
    """A plain state_dict in float16, as safetensors (the engine's --pretrained FILE path reads it)."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in net.state_dict().items()}
    tmp = out.with_name(out.name + ".partial")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)


def train(out: str | Path, cfg: TrainConfig, world_dir: str | Path | None = None,
          progress: Callable[[StepInfo], None] | None = None) -> TrainReport:
    """Train the tiny CLIP on a train world (generated into a temp folder unless `world_dir` holds one) and save it."""
    if cfg.steps < 1 or cfg.batch_size < 2 or cfg.n_train < cfg.batch_size:
        raise BadInput("need steps >= 1, batch size >= 2 and at least batch-size train images")
    out = Path(out)
    report = TrainReport(out, cfg)
    tell = progress or (lambda info: None)
    with tempfile.TemporaryDirectory(prefix="clipsearch-world-") as tmp:
        started = time.perf_counter()
        if world_dir is not None and (Path(world_dir) / "captions.jsonl").is_file():
            jsonl = Path(world_dir) / "captions.jsonl"
            if not world.matches(jsonl, "train", cfg.n_train, cfg.seed):
                raise BadInput(f"{world_dir} holds a world drawn with other settings or by an earlier generator than "
                               f"this run's (n {cfg.n_train}, seed {cfg.seed}): remove it, or pass another --world")
        else:
            tell(StepInfo("world", 0, cfg.n_train))
            jsonl = world.generate(world_dir or Path(tmp) / "train", "train", cfg.n_train, cfg.seed, cfg.workers)
        report.seconds["world"] = time.perf_counter() - started
        report.final_loss = _fit(out, cfg, jsonl, tell, report)
    return report


def _fit(out: Path, cfg: TrainConfig, jsonl: Path, tell: Callable[[StepInfo], None], report: TrainReport) -> float:
    import torch

    from .model import register_project_configs
    from .open_clip_import import import_open_clip

    register_project_configs()
    open_clip = import_open_clip()

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = open_clip.create_model(MODEL_NAME, pretrained=None)
    spec = media.PreprocessSpec.from_open_clip(net.visual.preprocess_cfg)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)

    started = time.perf_counter()
    records, pixels = load_world(jsonl, spec, cfg.workers, lambda done, total: tell(StepInfo("decode", done, total)))
    per_image = min(len(r["captions"]) for r in records)
    tokens = tokenizer([c for r in records for c in r["captions"][:per_image]]).view(len(records), per_image, -1)
    report.seconds["decode"] = time.perf_counter() - started

    net.train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    started = time.perf_counter()
    order = rng.permutation(len(records))
    cursor, smoothed = 0, float("nan")
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = rng.permutation(len(records)), 0
        batch = order[cursor:cursor + cfg.batch_size]
        cursor += cfg.batch_size
        images = torch.from_numpy(media.to_model_input(pixels[batch], spec))
        texts = tokens[torch.from_numpy(batch), torch.from_numpy(rng.integers(per_image, size=len(batch)))]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        image_features, text_features, logit_scale = net(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        value = float(loss.detach())
        smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
        tell(StepInfo("train", step + 1, cfg.steps, smoothed, time.perf_counter() - started))
    report.seconds["train"] = time.perf_counter() - started
    net.eval()
    metadata = {k: str(v) for k, v in vars(cfg).items()} | {"model": MODEL_NAME, "final_loss": f"{smoothed:.4f}"}
    save_checkpoint(net, out, metadata)
    return smoothed


# ---------------------------------------------------------------------------------------------------------- evaluation


def evaluate(model: Any, jsonl: str | Path, batch_size: int = 256) -> dict[str, Any]:
    """Recall@1 of a loaded `ClipModel` on a (test) world, by the first caption of each image.

    text->image: each first caption against every image; image->caption: each image against every first caption.
    Reported overall, per kind (single/count/relation) and on the held-out colour+shape subset.
    """
    records, pixels = load_world(jsonl, model.preprocess)
    images = np.concatenate([model.encode_images(media.to_model_input(pixels[i:i + batch_size], model.preprocess))
                             for i in range(0, len(records), batch_size)])
    texts = model.encode_texts([r["captions"][0] for r in records])
    sims = texts @ images.T
    truth = np.arange(len(records))
    t2i = sims.argmax(axis=1) == truth
    i2t = sims.argmax(axis=0) == truth
    groups: dict[str, np.ndarray] = {"all": np.ones(len(records), dtype=bool)}
    for kind in world.KINDS:
        groups[kind] = np.array([r["kind"] == kind for r in records])
    groups["held_out"] = np.array([r["held_out"] for r in records])
    return {name: {"n": int(mask.sum()), "text_to_image": float(t2i[mask].mean()) if mask.any() else float("nan"),
                   "image_to_caption": float(i2t[mask].mean()) if mask.any() else float("nan")}
            for name, mask in groups.items()}


def format_recall(result: dict[str, Any]) -> str:
    lines = [f"{'subset':<10} {'n':>5} {'text->image R@1':>16} {'image->caption R@1':>19}"]
    for name, row in result.items():
        lines.append(f"{name:<10} {row['n']:>5} {row['text_to_image']:>16.3f} {row['image_to_caption']:>19.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m clipsearch.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the .safetensors checkpoint")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="train world size")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes drawing and decoding the train world")
    parser.add_argument("--world", default=None, help="train world folder: used if it holds one, else written there")
    parser.add_argument("--eval-n", type=int, default=200, help="test world size for the final recall (0: skip)")
    parser.add_argument("--eval-seed", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, args.steps),
                      n_train=args.n_train, seed=args.seed, threads=args.threads, workers=args.workers)
    every = max(1, cfg.steps // 30)

    def show(info: StepInfo) -> None:
        if info.phase == "train" and (info.done % every == 0 or info.done == info.total):
            print(f"step {info.done}/{info.total}  loss {info.loss:.3f}  {info.seconds:.0f}s", flush=True)
        elif info.phase != "train" and info.done in (0, info.total):
            print(f"{info.phase} {info.done}/{info.total}", flush=True)

    started = time.perf_counter()
    try:
        report = train(args.out, cfg, args.world, show)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BadInput.exit_code
    total = time.perf_counter() - started
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items())
    print(f"wrote {report.out} ({report.out.stat().st_size / 1e6:.1f} MB); {timing}; total {total:.0f}s")
    if args.eval_n > 0:
        from .model import ClipModel, ModelSpec

        with tempfile.TemporaryDirectory(prefix="clipsearch-test-world-") as tmp:
            jsonl = world.generate(Path(tmp) / "test", "test", args.eval_n, args.eval_seed)
            model = ClipModel(ModelSpec(MODEL_NAME, str(report.out)), device="cpu")
            print(format_recall(evaluate(model, jsonl)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
