"""The Python API: the README example runs as written, typed hits, verify, locking, FAISS self-repair."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipsearch
from clipsearch.home import index_home, resolve_index
from clipsearch.index import FAISS_NAME
from conftest import REPO, TINY_MODEL, shared


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## As a library\s+```python\n(.*?)```", text, re.S)
    assert block, "README has a python example under 'As a library'"
    return block.group(1)


def test_readme_library_example_runs(tmp_path, tiny_checkpoint):
    """Run the example verbatim with HOME pointing at a folder holding ~/Photos (and the tiny model as default)."""
    photos = tmp_path / "Photos"
    photos.mkdir()
    for source in sorted(shared("photos", "exif-samples").glob("*.jpg"))[:6]:
        shutil.copy2(source, photos / source.name)
    env = {**os.environ, "HOME": str(tmp_path), "CLIPSEARCH_MODEL": TINY_MODEL,
           "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint)}
    proc = subprocess.run([sys.executable, "-c", readme_example()], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6 added, 0 unreadable" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"6 images in {tmp_path / 'my-index'}")


@pytest.fixture()
def small_index(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(shared("photos", "exif-samples").glob("*.jpg"))[:8]:
        shutil.copy2(source, photos / source.name)
    idx = clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint))
    events: list[clipsearch.Progress] = []
    idx.index([photos], workers=0, batch_size=3, progress=events.append)
    yield idx, photos, events
    idx.close()


def test_typed_hits_and_progress(small_index):
    idx, photos, events = small_index
    hits = idx.search("a dog", k=3)
    assert all(isinstance(h, clipsearch.Hit) for h in hits)
    assert hits[0].path.startswith(str(photos)) and hits[0].width and hits[0].size and -1 <= hits[0].score <= 1
    embed = [e for e in events if e.phase == "embed"]
    assert embed[-1].done == embed[-1].total == 8 and len(embed) >= 3  # one report per committed batch
    by_id = idx.similar(hits[0].id, k=3)
    assert hits[0].id not in [h.id for h in by_id]


def test_missing_stale_or_damaged_faiss_is_rebuilt_from_sqlite(small_index):
    idx, _, _ = small_index
    expected = [h.id for h in idx.search("a dog", k=8)]
    faiss_file = idx.path / FAISS_NAME
    for damage in (lambda: faiss_file.unlink(), lambda: faiss_file.write_bytes(faiss_file.read_bytes()[:100])):
        damage()
        again = clipsearch.open(idx.path)
        assert [h.id for h in again.search("a dog", k=8)] == expected
        assert any("rebuilt" in n for n in again.notices)
        assert again.verify().ok
        again.close()


def test_verify_catches_faiss_that_disagrees_with_sqlite(small_index):
    idx, _, _ = small_index
    vectors = idx.vectors()
    victim = int(vectors.ids()[0])
    vectors.remove(np.array([victim]))
    vectors.add(np.array([victim]), -vectors.reconstruct(int(vectors.ids()[0]))[None])
    vectors.save(idx.faiss_path)  # same generation, wrong content
    fresh = clipsearch.open(idx.path)
    report = fresh.verify()
    assert not report.ok and "differ" in report.problems[0]
    fresh.close()


def test_second_writer_gets_index_busy(small_index):
    idx, photos, _ = small_index
    with idx._write_lock():
        other = clipsearch.open(idx.path)
        with pytest.raises(clipsearch.IndexBusy):
            other.index([photos], workers=0)
        assert len(other.search("a dog", k=3)) == 3  # readers are not blocked
        other.close()


def test_index_home_and_bare_names(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPSEARCH_HOME", str(tmp_path / "home"))
    assert index_home() == tmp_path / "home" / "indexes"
    assert resolve_index(None) == tmp_path / "home" / "indexes" / "default"
    assert resolve_index("trip") == tmp_path / "home" / "indexes" / "trip"
    assert resolve_index("./trip") == Path.cwd() / "trip"
    assert resolve_index(tmp_path / "x") == tmp_path / "x"


def test_the_first_batch_is_small_so_the_model_starts_early(tmp_path, tiny_checkpoint):
    """With the default batch of 32, the first commit comes after FIRST_BATCH images, the rest a whole batch each."""
    from clipsearch.indexer import FIRST_BATCH

    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(shared("photos", "exif-samples").glob("*.jpg"))[:FIRST_BATCH + 12]:
        shutil.copy2(source, photos / source.name)
    events: list[clipsearch.Progress] = []
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=0, progress=events.append)
        assert idx.info()["images"] == FIRST_BATCH + 12
    assert [e.done for e in events if e.phase == "embed"] == [0, FIRST_BATCH, FIRST_BATCH + 12]


def test_batches_run_split_over_the_encode_streams_and_commit_in_order(tmp_path, tiny_checkpoint, monkeypatch):
    """On a CPU with 2 cores or more each batch runs as halves in the encode streams' threads, not in the caller's;
    the vectors stored are those of one call on each image, whatever stream ran it."""
    from clipsearch import model as model_room
    from clipsearch.indexer import FIRST_BATCH

    monkeypatch.setattr(model_room, "usable_cores", lambda: 2)
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(shared("photos", "exif-samples").glob("*.jpg"))[:FIRST_BATCH + 12]:
        shutil.copy2(source, photos / source.name)
    calls: list[tuple[int, str]] = []
    encode = model_room.ClipModel.encode_images

    def spy(self, batch):
        import threading

        calls.append((len(batch), threading.current_thread().name))
        return encode(self, batch)
    monkeypatch.setattr(model_room.ClipModel, "encode_images", spy)
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        idx.index([photos], workers=0, batch_size=8)
        rows = {Path(row["path"]).name: idx.store.vector(row["id"]) for row in idx.store.db["images"].rows}
        model = idx.model
    assert sorted(n for n, _name in calls) == [2, 2, 4, 4, 4, 4], calls  # batches of 8, 8 and 4, each halved
    assert all(name.startswith("clipsearch-encode") for _n, name in calls)
    from clipsearch import media

    assert len(rows) == FIRST_BATCH + 12
    for name, stored in rows.items():
        _path, decoded, _error = media.decode(str(photos / name), model.preprocess)
        alone = encode(model, media.to_model_input(decoded.pixels[None], model.preprocess))[0]
        np.testing.assert_allclose(stored, alone, atol=2e-3)


def _photos_with_priorities(tmp_path):
    """Up to 24 photos, and a progress callback noting the priorities of the decode workers at each embed step."""
    import multiprocessing

    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(shared("photos", "exif-samples").glob("*.jpg"))[:24]
    for source in sources:
        shutil.copy2(source, photos / source.name)
    assert len(sources) > 8  # more than one chunk per worker
    seen: list[list[int]] = []

    def look(event: clipsearch.Progress) -> None:
        if event.phase == "embed" and event.done:
            seen.append(sorted(os.getpriority(os.PRIO_PROCESS, child.pid)
                               for child in multiprocessing.active_children()))
    return photos, seen, look


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process niceness on this platform")
def test_decode_workers_yield_the_cpu_to_a_model_on_the_cpu(tmp_path, tiny_checkpoint):
    """Beside a model on the CPU, decode workers run at the lowest priority, so they take the cores chiefly while
    the model is between batches (media.yield_cpu_to_the_model); the indexing process itself keeps its priority."""
    from clipsearch.media import YIELDING_NICENESS

    photos, seen, look = _photos_with_priorities(tmp_path)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=2, batch_size=4, progress=look)
    assert report.embedded == len(list(photos.iterdir()))
    assert seen and max(max(step) for step in seen) == YIELDING_NICENESS
    assert os.getpriority(os.PRIO_PROCESS, 0) == own


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process niceness on this platform")
def test_starved_decode_workers_are_replaced_at_the_run_priority(tmp_path, tiny_checkpoint, monkeypatch):
    """When the model sits idle waiting for lowered workers (other programs keep the cores busy: beside two busy
    loops they got almost nothing), new workers at the run's own priority take over and what the old ones had not
    delivered is decoded again: nothing is lost or stored twice, and no worker is left behind."""
    import multiprocessing

    from clipsearch import indexer, media

    monkeypatch.setattr(indexer, "STARVED_AFTER", 0.0)  # any wait with the model idle counts as starved
    monkeypatch.setattr(indexer, "STARVED_POLL", 0.01)
    photos, seen, look = _photos_with_priorities(tmp_path)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    stopped: list[bool] = []
    stop = indexer.DecodeWorkers.stop_yielding
    monkeypatch.setattr(indexer.DecodeWorkers, "stop_yielding", lambda self: (stopped.append(True), stop(self)))
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=2, batch_size=4, progress=look)
        rows = {Path(row["path"]).name: idx.store.vector(row["id"]) for row in idx.store.db["images"].rows}
        model = idx.model
    assert stopped == [True]  # once: the new workers are never lowered
    assert report.embedded == len(rows) == len(list(photos.iterdir())) and report.errors == 0
    assert own in seen[-1] and multiprocessing.active_children() == []
    for name, stored in rows.items():
        _path, decoded, _error = media.decode(str(photos / name), model.preprocess)
        alone = model.encode_images(media.to_model_input(decoded.pixels[None], model.preprocess))[0]
        np.testing.assert_allclose(stored, alone, atol=2e-3)


@pytest.mark.skipif(sys.platform == "win32", reason="reads a pipe's fill level with FIONREAD (POSIX)")
def test_a_worker_ended_while_it_sends_leaves_no_reader_waiting():
    """Starved workers are ended whatever they are doing. One ended halfway through sending its result left the old
    pool's reader waiting for the rest, and with it the exit of the indexing process (a CI run hung after its last
    test). Half a result is put in the pipe here, as such a worker leaves it, and the reader must give up."""
    import fcntl
    import struct
    import termios
    import time

    from clipsearch import indexer

    workers = indexer.DecodeWorkers(1)
    pool = workers.pool
    pool.submit(os.getpid).result()
    manager, writer = pool._executor_manager_thread, pool._result_queue._writer
    reader = pool._result_queue._reader.fileno()

    def unread() -> int:
        return struct.unpack("i", fcntl.ioctl(reader, termios.FIONREAD, b"\0" * 4))[0]

    whole, half = 1 << 20, 1 << 10
    os.write(writer.fileno(), struct.pack("!i", whole) + bytes(half))  # a result's length, then the start of it
    deadline = time.monotonic() + 10
    while unread() and time.monotonic() < deadline:  # the reader has taken it and waits for the rest
        time.sleep(0.01)
    workers.stop_yielding()
    manager.join(timeout=10)
    waiting = manager.is_alive()
    if waiting:  # finish the message so that this test process can still exit
        os.write(writer.fileno(), bytes(whole - half))
    workers.close()
    assert not waiting


def test_decode_workers_start_while_a_new_index_loads_its_model(tmp_path, tiny_checkpoint):
    """A new index will need its decode workers: they start before the scan, so their own start-up (a new
    interpreter each) overlaps the scan and the model's load instead of delaying the first batch. A refresh that
    finds nothing new starts none."""
    import multiprocessing

    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sorted(shared("photos", "exif-samples").glob("*.jpg"))[:12]
    for source in sources:
        shutil.copy2(source, photos / source.name)
    children: dict[str, int] = {}

    def look(event: clipsearch.Progress) -> None:
        children[event.phase] = max(children.get(event.phase, 0), len(multiprocessing.active_children()))

    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        assert idx.index([photos], workers=2, progress=look).embedded == len(sources)
    assert children["model"] == 2  # announced just before the load, the workers already on their way
    assert not multiprocessing.active_children()  # and gone once the run is over
    children.clear()
    with clipsearch.open(tmp_path / "idx") as idx:
        assert idx.index(workers=2, progress=look).unchanged == len(sources)
    assert set(children.values()) == {0}
    children.clear()
    few = tmp_path / "few"  # decoded in this process (too few for workers): the early-started ones end with the run
    few.mkdir()
    for source in sources[:3]:
        shutil.copy2(source, few / source.name)
    with clipsearch.open(tmp_path / "idx-few", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        assert idx.index([few], workers=2, progress=look).embedded == 3
    assert children["model"] == 2 and children["done"] == 0


def _slow_load_until(monkeypatch, ready) -> dict:
    """Make the model's load wait (at most 20 s) until ``ready(noted)``, where ``noted`` says what the decode calls
    were sent with meanwhile: ``sent`` the files, ``beside`` whether each worker was to lower itself; and ``ready``
    whether the wait ended so."""
    import time

    from clipsearch import indexer
    from clipsearch.index import Index

    noted: dict = {"sent": 0, "beside": [], "ready": None}
    decode, construct = indexer.DecodeWorkers.decode, Index._construct_model

    def spy_decode(self, paths, spec, beside_the_model):
        noted["sent"] += len(paths)
        noted["beside"].append(beside_the_model)
        return decode(self, paths, spec, beside_the_model)

    def slow_construct(self, spec):
        deadline = time.monotonic() + 20
        while not ready(noted) and time.monotonic() < deadline:
            time.sleep(0.01)
        noted["ready"] = ready(noted)
        return construct(self, spec)

    monkeypatch.setattr(indexer.DecodeWorkers, "decode", spy_decode)
    monkeypatch.setattr(Index, "_construct_model", slow_construct)
    return noted


def _assert_model_vectors(idx, photos: Path) -> None:
    """Every stored vector is what the index's model gives the file alone, and FAISS holds each of them."""
    from clipsearch import media

    model = idx.model
    rows = {Path(row["path"]).name: (row["id"], idx.store.vector(row["id"])) for row in idx.store.db["images"].rows}
    assert len(rows) == len(list(photos.iterdir())) == idx.vectors().ntotal
    for name, (row_id, stored) in rows.items():
        _path, decoded, _error = media.decode(str(photos / name), model.preprocess)
        alone = model.encode_images(media.to_model_input(decoded.pixels[None], model.preprocess))[0]
        np.testing.assert_allclose(stored, alone, atol=2e-3)
        found = idx.vectors().search(stored, 1, allowed=np.array([row_id]))
        assert found.ids[0] == row_id and found.scores[0] > 0.999


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process niceness on this platform")
def test_a_new_index_decodes_every_file_it_can_hold_while_its_model_loads(tmp_path, tiny_checkpoint, monkeypatch):
    """A new index decodes with the preprocessing its model's config implies while the model loads, past the usual
    read-ahead (here 4 chunks of 4: batch 4, 2 workers), so the load (one core, 2-3 s for ViT-B-32) and decoding
    overlap; those workers yield to the load. The model, once loaded, is recorded as before."""
    photos, _seen, _look = _photos_with_priorities(tmp_path)
    total = len(list(photos.iterdir()))
    assert total > 4 * 4
    noted = _slow_load_until(monkeypatch, lambda noted: noted["sent"] >= total)
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=2, batch_size=4)
        assert noted["ready"], f"only {noted['sent']} of {total} files were sent to decode while the model loaded"
        assert noted["beside"][:total // 4] == [True] * (total // 4)  # every chunk sent during the load yields
        assert report.embedded == total and report.errors == 0
        info = idx.info()
        assert info["model"] == TINY_MODEL and info["dim"] == idx.model.dim
        _assert_model_vectors(idx, photos)


def test_a_config_that_misjudges_the_model_costs_a_second_decode_not_a_wrong_vector(tmp_path, tiny_checkpoint,
                                                                                  monkeypatch):
    """If the loaded model wants other pixels or another dimension than its config implied (a pretrained tag with its
    own mean and std, say), what was decoded is thrown away before anything is committed and decoded again."""
    from clipsearch import indexer, model as model_room

    photos, _seen, _look = _photos_with_priorities(tmp_path)
    right, dim = model_room.config_preprocess(model_room.ModelSpec(TINY_MODEL, str(tiny_checkpoint)))
    wrong = model_room.PreprocessSpec(size=(right.size[0] + 8, right.size[1] + 8), mean=(0.5, 0.5, 0.5),
                                      std=(0.5, 0.5, 0.5), resize_mode="squash")
    monkeypatch.setattr(model_room, "config_preprocess", lambda spec: (wrong, dim + 3))
    sizes: list[tuple[int, int]] = []
    decode = indexer.DecodeWorkers.decode

    def spy(self, paths, spec, beside_the_model):
        sizes.append(spec.size)
        return decode(self, paths, spec, beside_the_model)

    monkeypatch.setattr(indexer.DecodeWorkers, "decode", spy)
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=2, batch_size=4)
        assert wrong.size in sizes and sizes[-1] == right.size  # it did start with the config's guess
        assert report.embedded == len(list(photos.iterdir())) and idx.vectors().dim == dim
        _assert_model_vectors(idx, photos)
    with clipsearch.open(tmp_path / "idx") as idx:  # and it all reads back from disk
        assert idx.vectors().dim == dim and idx.vectors().ntotal == report.embedded


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no process niceness on this platform")
def test_workers_lowered_for_the_load_of_a_model_off_the_cpu_are_kept(tmp_path, tiny_checkpoint, monkeypatch):
    """Decode workers yield to the model's load whatever its device. Beside a model that then runs elsewhere (a GPU)
    they are kept, not ended: nice 19 costs nothing on cores nothing else wants, and a worker ended while it sends
    its result would leave the old pool's reader waiting for the rest."""
    import multiprocessing

    from clipsearch import indexer

    monkeypatch.setattr(indexer.DeferredModel, "on_cpu", property(lambda self: False))  # as beside a GPU
    stopped: list[bool] = []
    stop = indexer.DecodeWorkers.stop_yielding
    monkeypatch.setattr(indexer.DecodeWorkers, "stop_yielding", lambda self: (stopped.append(True), stop(self)))
    photos, _seen, _look = _photos_with_priorities(tmp_path)
    noted = _slow_load_until(monkeypatch, lambda noted: noted["sent"] >= 4)
    with clipsearch.open(tmp_path / "idx", model=TINY_MODEL, pretrained=str(tiny_checkpoint)) as idx:
        report = idx.index([photos], workers=2, batch_size=4)
        assert noted["ready"] and noted["beside"][0]  # lowered for the load
        assert stopped == []
        assert report.embedded == len(list(photos.iterdir())) and report.errors == 0
        _assert_model_vectors(idx, photos)
    assert multiprocessing.active_children() == []
