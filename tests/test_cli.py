"""End to end through the CLI on real files (../shared/data), with a small seeded random-init model."""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clipsearch import errors
from clipsearch.cli import cli
from conftest import TINY_MODEL, shared


def clip(*args: str, code: int = 0):
    """Run the CLI in-process; assert the exit code; errors must be one line with no traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, (result.stdout, result.stderr)
    if code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(("clipsearch: ", "Error:", "Usage:")) or "Usage:" in result.stderr
        assert "Traceback" not in result.stderr
    return result


def as_json(*args: str):
    return json.loads(clip(*args, "--json").stdout)


def tiny(checkpoint: Path) -> list[str]:
    return ["--model", TINY_MODEL, "--pretrained", str(checkpoint)]


def copy_photos(target: Path, count: int) -> list[Path]:
    source = sorted(shared("photos", "exif-samples").glob("*.jpg"))[:count]
    target.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(p, target / p.name)) for p in source]


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, tiny_checkpoint):
    photos = shared("photos")
    idx = tmp_path_factory.mktemp("photo-index") / "idx"
    result = clip("index", photos, "--index", idx, *tiny(tiny_checkpoint), "--workers", "1")
    return idx, photos, result


def test_index_real_photo_folder(photo_index):
    idx, photos, result = photo_index
    manifest = [json.loads(line) for line in (photos / "manifest.jsonl").read_text().splitlines()]
    data = as_json("info", "--index", idx)
    assert data["images"] == len(manifest) and data["errors"] == 0
    assert data["model"] == TINY_MODEL and data["dim"] == 64 and data["pretrained"].endswith("tiny.pt")
    assert data["last_run"]["added"] == len(manifest) and data["size_bytes"] > 0
    assert f"{len(manifest)} embedded" in result.stdout


def test_metadata_is_stored(photo_index):
    idx, photos, _ = photo_index
    import sqlite3

    manifest = {json.loads(l)["image"]: json.loads(l) for l in (photos / "manifest.jsonl").read_text().splitlines()}
    rows = {r[0]: r[1:] for r in sqlite3.connect(idx / "clipsearch.db").execute(
        "SELECT path, width, height, taken FROM images")}
    for rel, entry in manifest.items():
        width, height, taken = rows[str(photos / rel)]
        rotated = entry.get("exif_orientation") in (5, 6, 7, 8)
        assert (width, height) == ((entry["height"], entry["width"]) if rotated else (entry["width"], entry["height"]))
        if re.match(r"[12]\d{3}:", entry.get("exif_datetime") or ""):
            assert taken and taken[:4] == entry["exif_datetime"][:4]


def test_search_and_similar(photo_index):
    idx, photos, _ = photo_index
    hits = as_json("search", "a red bicycle", "--index", idx, "-k", "7")
    assert len(hits) == 7 and all({"id", "path", "score"} <= h.keys() for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["path"].startswith(str(photos)) for h in hits)
    probe = hits[0]["path"]
    similar = as_json("similar", probe, "--index", idx, "-k", "5")
    assert len(similar) == 5 and probe not in [h["path"] for h in similar]
    table = clip("search", "a red bicycle", "--index", idx, "-k", "3").stdout.splitlines()
    assert len(table) == 3 and table[0].split()[2] == hits[0]["path"]


def test_k_up_to_index_size(photo_index):
    idx, _, _ = photo_index
    total = as_json("info", "--index", idx)["images"]
    assert len(as_json("search", "anything", "--index", idx, "-k", str(total + 50))) == total


def test_verify_and_incremental_rerun(photo_index):
    idx, photos, _ = photo_index
    assert "agree" in clip("verify", "--index", idx).stdout
    again = clip("index", photos, "--index", idx, "--workers", "0")  # the index remembers its model
    assert again.stdout.startswith("0 embedded")
    assert as_json("info", "--index", idx)["last_run"]["unchanged"] == as_json("info", "--index", idx)["images"]


def test_broken_files_are_recorded_and_do_not_stop_the_run(tmp_path, tiny_checkpoint):
    broken = shared("broken")
    manifest = [json.loads(line) for line in (broken / "manifest.jsonl").read_text().splitlines()]
    idx = tmp_path / "idx"
    clip("index", broken, "--index", idx, *tiny(tiny_checkpoint))
    recorded = {row["path"]: row["error"] for row in as_json("errors", "--index", idx)}
    for entry in manifest:
        assert recorded.get(str(broken / entry["image"])), entry["image"]
    assert as_json("info", "--index", idx)["errors"] == len(manifest)


def test_moves_renames_copies_changes_and_deletions(tmp_path, tiny_checkpoint):
    lib = tmp_path / "lib"
    files = copy_photos(lib, 6)
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, *tiny(tiny_checkpoint), "--workers", "0")
    before = {h["path"]: h["id"] for h in as_json("search", "x", "--index", idx, "-k", "100")}

    (lib / "sub").mkdir()
    files[0].rename(lib / "sub" / "moved.jpg")           # moved
    files[1].rename(lib / "renamed.JPG")                  # renamed
    files[2].unlink()                                     # deleted
    shutil.copy2(files[3], lib / "copy.jpg")              # duplicated
    from PIL import Image

    Image.new("RGB", (300, 200), "blue").save(files[4])   # changed in place
    out = clip("index", lib, "--index", idx, "--workers", "0").stdout
    assert out.startswith("1 embedded") and "1 updated, 2 moved, 1 copied, 1 removed" in out

    after = {h["path"]: h["id"] for h in as_json("search", "x", "--index", idx, "-k", "100")}
    assert after[str(lib / "sub" / "moved.jpg")] == before[str(files[0])]
    assert after[str(lib / "renamed.JPG")] == before[str(files[1])]
    assert str(files[2]) not in after and len(after) == 6
    clip("verify", "--index", idx)


def test_missing_or_empty_root_deletes_nothing_and_returning_files_are_found(tmp_path, tiny_checkpoint):
    lib = tmp_path / "drive" / "photos"
    copy_photos(lib, 4)
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, *tiny(tiny_checkpoint), "--workers", "0")

    lib.rename(tmp_path / "unplugged")                         # the drive is gone
    result = clip("index", "--index", idx)                     # no PATH: refresh every known folder
    assert "missing" in result.stderr and as_json("info", "--index", idx)["images"] == 4

    lib.mkdir()                                                # an empty mount point
    result = clip("index", lib, "--index", idx)
    assert "nothing was deleted" in result.stderr and as_json("info", "--index", idx)["images"] == 4

    lib.rmdir()
    (tmp_path / "unplugged").rename(lib)                       # it comes back: nothing to embed
    assert clip("index", "--index", idx).stdout.startswith("0 embedded")
    assert as_json("info", "--index", idx)["images"] == 4


def test_renamed_root_folder_reuses_every_vector(tmp_path, tiny_checkpoint):
    old = tmp_path / "Photos"
    copy_photos(old, 5)
    idx = tmp_path / "idx"
    clip("index", old, "--index", idx, *tiny(tiny_checkpoint), "--workers", "0")
    old.rename(tmp_path / "Pictures")
    out = clip("index", tmp_path / "Pictures", "--index", idx).stdout
    assert out.startswith("0 embedded") and "5 moved" in out
    assert {Path(h["path"]).parent.name for h in as_json("search", "x", "--index", idx, "-k", "10")} == {"Pictures"}


def test_other_model_is_refused(tmp_path, tiny_checkpoint):
    lib = tmp_path / "lib"
    copy_photos(lib, 2)
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, *tiny(tiny_checkpoint), "--workers", "0")
    clip("index", lib, "--index", idx, "--model", "ViT-B-32", code=errors.ModelMismatch.exit_code)
    other = tmp_path / "other.pt"
    import torch

    state = torch.load(tiny_checkpoint)
    torch.save({k: v + 1 for k, v in state.items()}, other)
    clip("index", lib, "--index", idx, "--pretrained", other, code=errors.ModelMismatch.exit_code)
    assert as_json("info", "--index", idx)["images"] == 2


def test_bare_index_name_lives_under_the_index_home(tmp_path, tiny_checkpoint):
    lib = tmp_path / "lib"
    copy_photos(lib, 2)
    clip("index", lib, "--index", "holiday", *tiny(tiny_checkpoint), "--workers", "0")
    assert (Path(os.environ["CLIPSEARCH_HOME"]) / "indexes" / "holiday" / "clipsearch.db").exists()
    assert as_json("info", "--index", "holiday")["images"] == 2


@pytest.mark.parametrize("args, code", [
    (["search", "dog", "--index", "{missing}"], errors.IndexMissing.exit_code),
    (["info", "--index", "{notindex}"], errors.NotAnIndex.exit_code),
    (["index", "{tmp}/no/such/folder", "--index", "{tmp}/i"], errors.BadInput.exit_code),
    (["search", "dog", "-k", "0", "--index", "{missing}"], 2),
    (["search", "dog", "-k", "many", "--index", "{missing}"], 2),
    (["index", "{tmp}", "--index", "{tmp}/i", "--model", "ViT-Nope"], errors.ModelError.exit_code),
    (["index", "{tmp}", "--index", "{tmp}/i", "--pretrained", "nope_tag"], errors.ModelError.exit_code),
])
def test_bad_input_is_one_line_and_a_distinct_exit_code(tmp_path, args, code):
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "clipsearch.db").write_text("hello")
    subs = {"missing": str(tmp_path / "missing"), "notindex": str(tmp_path / "notindex"), "tmp": str(tmp_path)}
    clip(*[a.format(**subs) for a in args], code=code)


def test_query_errors_on_a_real_index(photo_index, tmp_path):
    idx, _, _ = photo_index
    clip("search", "   ", "--index", idx, code=errors.BadInput.exit_code)
    clip("similar", tmp_path / "nope.jpg", "--index", idx, code=errors.BadInput.exit_code)
    (tmp_path / "notes.jpg").write_text("not an image")
    clip("similar", tmp_path / "notes.jpg", "--index", idx, code=errors.BadInput.exit_code)


def test_python_dash_m_and_console_script(photo_index):
    idx, _, _ = photo_index
    proc = subprocess.run([sys.executable, "-m", "clipsearch", "info", "--index", str(idx), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["images"] > 0
    script = shutil.which("clipsearch")
    assert script, "the clipsearch console script is installed"
    proc = subprocess.run([script, "search", "", "--index", str(idx)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == errors.BadInput.exit_code and "Traceback" not in proc.stderr


def test_writing_commands_end_without_the_interpreter_teardown_and_keep_everything(tmp_path, tiny_checkpoint):
    """`index` and `captions add` end the process once their index is closed (torch's teardown took 1.2 s after
    ViT-B-32): the summary still reaches a pipe, and what they wrote is all there."""
    copy_photos(tmp_path / "photos", 3)
    (tmp_path / "caps.txt").write_text("a dog\na red bicycle\n")
    idx = tmp_path / "idx"
    probe = ("import atexit, sys; atexit.register(lambda: print('teardown ran', file=sys.stderr)); "
             "from clipsearch.cli import main; sys.argv[0] = 'clipsearch'; main()")
    for args, says in ((["index", str(tmp_path / "photos")], "3 embedded"),
                       (["captions", "add", str(tmp_path / "caps.txt")], "2 added")):
        proc = subprocess.run([sys.executable, "-c", probe, *args, "--index", str(idx), *tiny(tiny_checkpoint)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and says in proc.stdout, (proc.stdout, proc.stderr)
        assert "teardown ran" not in proc.stderr
    info = as_json("info", "--index", idx)
    assert info["images"] == 3 and info["captions"] == 2
    assert "ok:" in clip("verify", "--index", idx).stdout


def test_moved_checkpoint_is_found_again_by_content(tmp_path, tiny_checkpoint):
    lib = tmp_path / "lib"
    copy_photos(lib, 2)
    first = tmp_path / "weights" / "tiny.pt"
    first.parent.mkdir()
    shutil.copy2(tiny_checkpoint, first)
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, "--model", TINY_MODEL, "--pretrained", first, "--workers", "0")
    moved = tmp_path / "tiny-moved.pt"
    first.rename(moved)
    assert len(as_json("search", "a dog", "--index", idx)) == 2  # text: the ONNX text tower, no checkpoint needed
    from PIL import Image

    new_image = tmp_path / "new.png"
    Image.new("RGB", (40, 30), "red").save(new_image)  # not indexed: needs the image model, so the checkpoint
    message = clip("similar", new_image, "--index", idx, code=errors.ModelError.exit_code).stderr
    assert "--pretrained NEW_LOCATION" in message
    assert clip("index", "--index", idx, "--pretrained", moved).stdout.startswith("0 embedded")
    assert len(as_json("similar", new_image, "--index", idx)) == 2  # the new location is remembered


def test_mixed_formats_hidden_folders_and_symlinks(tmp_path, tiny_checkpoint):
    from PIL import Image

    lib = tmp_path / "lib"
    (lib / "nested" / "deeper").mkdir(parents=True)
    (lib / ".hidden").mkdir()
    (lib / "@eaDir").mkdir()
    (lib / "folder.jpg").mkdir()                          # a directory named like an image
    colours = iter(["red", "green", "blue", "yellow", "purple", "orange", "white", "black"])
    Image.new("RGB", (64, 48), next(colours)).save(lib / "a.WEBP")
    Image.new("RGB", (64, 48), next(colours)).save(lib / "nested" / "b.PNG")
    Image.new("RGB", (64, 48), next(colours)).save(lib / "nested" / "deeper" / "c.bmp")
    Image.new("RGB", (64, 48), next(colours)).save(lib / "d.tiff")
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    frames[0].save(lib / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (64, 48), next(colours)).save(lib / ".hidden" / "secret.jpg")
    Image.new("RGB", (64, 48), next(colours)).save(lib / "@eaDir" / "thumb.jpg")
    (lib / "notes.txt").write_text("not an image")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (64, 48), next(colours)).save(outside / "linked.jpg")
    (lib / "link-to-outside").symlink_to(outside)
    (lib / "nested" / "loop").symlink_to(lib)              # a symlink loop must not hang or duplicate
    expected = {lib / "a.WEBP", lib / "nested" / "b.PNG", lib / "nested" / "deeper" / "c.bmp", lib / "d.tiff",
                lib / "anim.gif", lib / "link-to-outside" / "linked.jpg"}
    try:
        import pillow_heif

        pillow_heif.from_pillow(Image.new("RGB", (64, 48), "pink")).save(lib / "e.HEIC")
        expected.add(lib / "e.HEIC")
    except Exception:  # an encoder-less libheif build still decodes; covered in test_media
        pass
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, *tiny(tiny_checkpoint), "--workers", "1")
    found = {Path(h["path"]) for h in as_json("search", "x", "--index", idx, "-k", "50")}
    assert found == expected
    assert {h["format"] for h in as_json("search", "x", "--index", idx, "-k", "50")} >= {"WEBP", "PNG", "BMP", "TIFF", "GIF"}


def test_named_folder_every_format_decodes(tmp_path, tiny_checkpoint):
    named = shared("named")
    idx = tmp_path / "idx"
    clip("index", named, "--index", idx, *tiny(tiny_checkpoint))
    data = as_json("info", "--index", idx)
    assert data["errors"] == 0 and data["images"] == 47   # the .jpg/.png/.gif/.webp/.bmp/.tiff files of named/
    gif = next(p for p in sorted(named.rglob("*.gif")))
    assert len(as_json("similar", gif, "--index", idx, "-k", "3")) == 3


def _vectors_by_name(index_dir: Path, root: Path) -> dict[str, "np.ndarray"]:
    import numpy as np

    import clipsearch

    with clipsearch.open(index_dir, create=False) as idx:
        ids = idx.store.ok_ids_by_path(idx.store.ok_paths_under([str(root)]))
        return {Path(path).name: np.asarray(idx.store.vector(i)) for path, i in ids.items()}


def test_rerun_with_nothing_new_never_imports_torch(tmp_path, tiny_checkpoint):
    """A refresh that finds nothing to embed must not pay for the model (ViT-B-32 here: 15 of a 20 s run)."""
    lib = tmp_path / "lib"
    copy_photos(lib, 3)
    weights = tmp_path / "tiny.pt"
    shutil.copy2(tiny_checkpoint, weights)
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, *tiny(weights), "--workers", "0")
    weights.unlink()  # not needed either: nothing is embedded
    faiss_file = idx / "images.faiss"
    before = faiss_file.stat()
    probe = ("import sys, clipsearch\n"
             f"idx = clipsearch.open({str(idx)!r}, create=False)\n"
             "report = idx.index(workers=0)\n"
             "print(report.unchanged, report.embedded, report.warnings, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "0", "[]", "False"]
    after = faiss_file.stat()  # nor is the FAISS file rewritten: it already holds these vectors
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert clip("index", "--index", idx).stdout.startswith("0 embedded")


def test_new_files_in_an_indexed_folder_embed_like_a_fresh_index(tmp_path, tiny_checkpoint):
    """The model then loads in the background while the new files decode; their vectors are the ones a new index
    gives them, and the wait is reported apart from the embedding rate."""
    import numpy as np

    import clipsearch

    lib = tmp_path / "lib"
    photos = copy_photos(lib, 5)
    later = [Path(shutil.move(p, tmp_path / p.name)) for p in photos[3:]]
    clip("index", lib, "--index", tmp_path / "idx", *tiny(tiny_checkpoint), "--workers", "0")
    for p in later:
        shutil.move(p, lib / p.name)
    events: list[clipsearch.Progress] = []
    with clipsearch.open(tmp_path / "idx", create=False) as idx:
        report = idx.index(workers=1, batch_size=1, progress=events.append)
    assert (report.added, report.unchanged, report.embedded) == (2, 3, 2)
    phases = [e.phase for e in events]
    assert phases.index("scan") < phases.index("model") < phases.index("done")
    assert 0 < report.model_seconds < report.seconds
    fresh_lib = Path(shutil.copytree(lib, tmp_path / "fresh" / "lib"))
    clip("index", fresh_lib, "--index", tmp_path / "fresh" / "idx", *tiny(tiny_checkpoint), "--workers", "0")
    ours, theirs = _vectors_by_name(tmp_path / "idx", lib), _vectors_by_name(tmp_path / "fresh" / "idx", fresh_lib)
    assert ours.keys() == theirs.keys() == {p.name for p in photos}
    for name in ours:
        assert float(np.dot(ours[name], theirs[name])) > 0.9999


@pytest.mark.parametrize("change", ["gone", "replaced"])
def test_model_that_cannot_load_mid_run_is_one_line_and_loses_nothing(tmp_path, tiny_checkpoint, change):
    import torch

    lib = tmp_path / "lib"
    photos = copy_photos(lib, 3)
    held_back = Path(shutil.move(photos[2], tmp_path / photos[2].name))
    weights = tmp_path / "tiny.pt"
    shutil.copy2(tiny_checkpoint, weights)
    idx = tmp_path / "idx"
    clip("index", lib, "--index", idx, *tiny(weights), "--workers", "0")
    before = as_json("search", "a dog", "--index", idx)
    if change == "gone":
        weights.unlink()
    else:  # other weights under the same name: vectors from them would not be comparable
        state = torch.load(tiny_checkpoint, map_location="cpu")
        torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    shutil.move(held_back, lib / held_back.name)
    code = errors.ModelError.exit_code if change == "gone" else errors.ModelMismatch.exit_code
    message = clip("index", "--index", idx, "--workers", "0", code=code).stderr
    assert ("is gone" if change == "gone" else "different model") in message
    assert as_json("search", "a dog", "--index", idx) == before
    assert as_json("info", "--index", idx)["images"] == 2
    assert "agree" in clip("verify", "--index", idx).stdout
    shutil.copy2(tiny_checkpoint, weights)  # the right weights back: the held-back photo gets in
    assert clip("index", "--index", idx, "--workers", "0").stdout.startswith("1 embedded")


def test_output_into_a_closed_pipe_stops_quietly(photo_index):
    """`clipsearch search ... | head -1`: the reader leaves early; no 'internal error', the shell's SIGPIPE code."""
    idx, _, _ = photo_index
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "search", "a dog", "--index", str(idx), "-k", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err.decode().strip() == ""


def test_interrupt_while_the_model_loads_does_not_wait_for_it(tmp_path, tiny_checkpoint, monkeypatch):
    """Ctrl-C during a background load: the run stops at once (the load is left to its daemon thread, which writes
    nothing), keeps what was committed, and the next run finishes the job."""
    import threading
    import time

    import clipsearch
    from clipsearch.index import Index

    lib = tmp_path / "lib"
    photos = copy_photos(lib, 3)
    held_back = Path(shutil.move(photos[2], tmp_path / photos[2].name))
    clip("index", lib, "--index", tmp_path / "idx", *tiny(tiny_checkpoint), "--workers", "0")
    shutil.move(held_back, lib / held_back.name)
    release = threading.Event()
    construct = Index._construct_model

    def slow(self, spec):
        release.wait(60)  # a load that takes as long as the test lets it
        return construct(self, spec)

    monkeypatch.setattr(Index, "_construct_model", slow)

    def interrupt(event):
        if event.phase == "embed":
            raise KeyboardInterrupt

    threading.Timer(30, release.set).start()  # never hang the suite, whatever happens
    started = time.monotonic()
    with clipsearch.open(tmp_path / "idx", create=False) as idx:
        with pytest.raises(KeyboardInterrupt):
            idx.index(workers=0, progress=interrupt)
    assert time.monotonic() - started < 20 and not release.is_set()
    release.set()
    monkeypatch.undo()
    assert as_json("info", "--index", tmp_path / "idx")["images"] == 2
    assert clip("index", "--index", tmp_path / "idx", "--workers", "0").stdout.startswith("1 embedded")
