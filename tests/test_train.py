"""The training script stays runnable: a few steps end to end, and what it saves loads through the engine's own path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipsearch import train, world
from clipsearch.errors import BadInput
from clipsearch.model import ClipModel, ModelSpec


def test_script_trains_saves_and_evaluates_a_checkpoint_the_engine_loads(tmp_path, capsys):
    out = tmp_path / "ckpt" / "tiny.safetensors"
    code = train.main(["--out", str(out), "--steps", "3", "--batch-size", "8", "--n-train", "16", "--warmup", "1",
                       "--workers", "1", "--world", str(tmp_path / "world"), "--eval-n", "8", "--seed", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "text->image R@1" in printed and "held_out" in printed
    assert (tmp_path / "world" / "captions.jsonl").is_file()  # --world keeps the train world for the next run
    assert out.is_file() and not out.with_name(out.name + ".partial").exists()

    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert meta["model"] == train.MODEL_NAME and meta["steps"] == "3" and meta["seed"] == "4"
    assert {str(d) for d in dtypes} == {"torch.float16"}

    model = ClipModel(ModelSpec(train.MODEL_NAME, str(out)), device="cpu")
    assert model.preprocess.size == (64, 64)
    vectors = model.encode_texts(["a small red circle in the middle of a gray background", "two blue stars"])
    assert vectors.shape == (2, model.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_loss_falls_when_fitting_a_small_world(tmp_path):
    """Guards the recipe itself (loss, optimiser, schedule, data pairing): a few dozen steps must fit 32 pictures."""
    losses: list[float] = []
    cfg = train.TrainConfig(steps=60, batch_size=32, lr=2e-3, warmup=5, n_train=32, seed=0, threads=2, workers=1)
    report = train.train(tmp_path / "t.safetensors", cfg, tmp_path / "w",
                         lambda info: losses.append(info.loss) if info.phase == "train" else None)
    assert len(losses) == 60
    assert report.final_loss == losses[-1]
    assert np.log(32) - 0.2 < losses[0]  # chance level at the start ...
    assert losses[-1] < 0.75 * losses[0]  # ... and well below it after fitting (the loss is smoothed: it lags)


def test_training_reuses_a_given_world_and_rejects_nonsense(tmp_path):
    jsonl = world.generate(tmp_path / "w", "train", 8, seed=1)
    before = jsonl.read_bytes()
    train.train(tmp_path / "a.safetensors", train.TrainConfig(steps=1, batch_size=4, n_train=8, workers=1, warmup=1, seed=1),
                tmp_path / "w")
    assert jsonl.read_bytes() == before
    with pytest.raises(BadInput, match="other settings"):  # a world of another seed is not silently trained on
        train.train(tmp_path / "c.safetensors", train.TrainConfig(steps=1, batch_size=4, n_train=8, seed=2),
                    tmp_path / "w")
    assert jsonl.read_bytes() == before and not (tmp_path / "c.safetensors").exists()
    with pytest.raises(BadInput):
        train.train(tmp_path / "b.safetensors", train.TrainConfig(steps=0, n_train=8, batch_size=4))
    assert not Path(tmp_path / "b.safetensors").exists()
