"""`make demo` (python -m clipsearch.demo): the offline demo runs end to end, and survives a retrained tiny model."""
from __future__ import annotations

from clipsearch import demo, world


def test_demo_runs_and_rebuilds_its_index_for_new_weights(tmp_path):
    lines: list[str] = []
    demo.run(tmp_path / "demo", n=40, say=lines.append)
    text = "\n".join(lines)
    assert "generated 40 captioned pictures" in text and 'text -> image: "an orange square"' in text
    assert "image -> caption" in text and "done in" in text

    from safetensors.torch import load_file, save_file

    retrained = tmp_path / "retrained.safetensors"  # same tensors, another file: other weights to the index
    save_file(load_file(demo.CHECKPOINT), retrained, metadata={"note": "retrained"})
    lines.clear()
    demo.run(tmp_path / "demo", checkpoint=retrained, n=40, say=lines.append)
    text = "\n".join(lines)
    assert "using the 40 captioned pictures" in text and "rebuilding it" in text
    assert "indexed 40 new pictures" in text and "done in" in text


def test_demo_replaces_a_world_drawn_by_an_earlier_generator(tmp_path, monkeypatch):
    lines: list[str] = []
    demo.run(tmp_path / "demo", n=20, say=lines.append)
    monkeypatch.setattr(world, "HELD_OUT", world.HELD_OUT - {("red", "star")})  # the generator changes ...
    lines.clear()
    demo.run(tmp_path / "demo", n=20, say=lines.append)  # ... so the demo draws its world again
    assert "generated 20 captioned pictures" in lines[0]
    assert world.matches(tmp_path / "demo" / "world" / "captions.jsonl", "test", 20, 1)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["index", "world"]  # no stale copy left
