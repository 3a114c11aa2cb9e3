"""Shared fixtures: real data from ../shared/data and small random-init open_clip models saved as checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_MODEL = "clipsearch-tiny-ViT-32"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test when the shared data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (../shared/data sits beside the repo on CI)")
    return path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test away from the user's real index home and from the network."""
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded random-init tiny open_clip model saved as a plain state_dict (the --pretrained FILE path)."""
    import torch

    from clipsearch import model as model_room

    model_room.register_project_configs()
    import open_clip

    torch.manual_seed(0)
    net = open_clip.create_model(TINY_MODEL, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vitb32_random():
    """A seeded random-init ViT-B-32 (model, open_clip preprocess): costs what the real one costs."""
    import open_clip
    import torch

    torch.manual_seed(0)
    net, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    net.eval()
    return net, preprocess
