"""An index this user cannot write (another user's, read-only media) can be searched and served, never changed."""
from __future__ import annotations

import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import clipsearch
from clipsearch import errors
from clipsearch.store import DB_NAME
from conftest import REPO, TINY_MODEL
from test_cli import clip, copy_photos, tiny


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _build(index: Path, photos: Path, checkpoint: Path) -> None:
    copy_photos(photos, 6)
    clip("index", photos, "--index", index, *tiny(checkpoint))


@pytest.fixture
def not_writable(monkeypatch):
    """Report ``folder`` and what is in it as not writable, as os.access does for another user's files."""
    def mark(folder: Path) -> None:
        access = os.access

        def fake(path, mode, *args, **kwargs):
            inside = Path(path).absolute() == folder.absolute() or Path(path).absolute().parent == folder.absolute()
            return False if inside and mode & os.W_OK else access(path, mode, *args, **kwargs)
        monkeypatch.setattr(os, "access", fake)
    return mark


def test_an_index_that_cannot_be_written_is_searched_and_left_alone(tmp_path, tiny_checkpoint, not_writable):
    index, photos = tmp_path / "idx", tmp_path / "photos"
    _build(index, photos, tiny_checkpoint)
    before = _digest(index)
    not_writable(index)
    hits = clip("search", "a photo", "--index", index, "-k", "3", "--json").stdout
    assert hits.count('"path"') == 3
    clip("similar", next(photos.iterdir()), "--index", index, "-k", "2")
    clip("verify", "--index", index)
    more = tmp_path / "more"
    copy_photos(more, 2)
    for args in (["index", more], ["index"], ["captions", "add", _captions(tmp_path)]):
        result = clip(*args, "--index", index, code=errors.IndexReadOnly.exit_code)
        assert "read-only" in result.stderr
    with clipsearch.open(index) as idx:
        assert idx.store.read_only and len(idx.search("a photo", k=10)) == 6
        with pytest.raises(errors.IndexReadOnly):
            idx.index([more])
    after = _digest(index)
    for wal in ("clipsearch.db-wal", "clipsearch.db-shm"):  # the stand-in leaves the folder writable to SQLite
        after.pop(wal, None)
    assert after == before


def test_no_index_can_be_created_where_this_user_cannot_write(tmp_path, tiny_checkpoint, not_writable):
    place = tmp_path / "place"
    place.mkdir()
    not_writable(place)
    copy_photos(tmp_path / "photos", 1)
    result = clip("index", tmp_path / "photos", "--index", place, *tiny(tiny_checkpoint),
                  code=errors.IndexReadOnly.exit_code)
    assert "cannot create an index" in result.stderr and not (place / DB_NAME).exists()


def test_an_older_index_that_cannot_be_written_says_it_needs_an_upgrade(tmp_path, not_writable):
    import sqlite3

    from clipsearch.store import SCHEMA_VERSION, Store

    Store(tmp_path / "idx", create=True).close()
    with sqlite3.connect(tmp_path / "idx" / DB_NAME) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1}")
    not_writable(tmp_path / "idx")
    with pytest.raises(errors.IndexReadOnly, match="needs an upgrade"):
        Store(tmp_path / "idx")


def _captions(folder: Path) -> Path:
    path = folder / "captions.jsonl"
    path.write_text('{"text": "a dog on a beach"}\n')
    return path


READER = """
import sys, clipsearch
with clipsearch.open(sys.argv[1], create=False) as idx:
    print(len(idx.search("a photo", k=100)), flush=True)
    for _line in sys.stdin:
        print(len(idx.search("a photo", k=100)), flush=True)
"""


def _start_reader(prefix: list[str], index: Path, env: dict) -> subprocess.Popen:
    """A long-lived reader (like the web page): it searches once, then again for each line it is sent."""
    return subprocess.Popen(_as(prefix, [sys.executable, "-c", READER, str(index)]), env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _as(prefix: list[str], command: list[str]) -> list[str]:
    """``command`` run through ``prefix`` (su's -c takes one shell line), or as is without one."""
    return [*prefix, shlex.join(command)] if prefix else command


def _set_writable(index: Path, writable: bool) -> None:
    for path in [index, *index.iterdir()]:
        os.chmod(path, (0o755 if path.is_dir() else 0o644) if writable else (0o555 if path.is_dir() else 0o444))


def _other_user() -> tuple[list[str], str] | None:
    """How to run a command as a user who cannot write what this process makes: this user itself with the files made
    read-only, or, as root (who writes anywhere), 'nobody' through su."""
    if os.geteuid() != 0:
        return [], ""
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return None
    su = shutil.which("su")
    return ([su, "--preserve-environment", "nobody", "-s", "/bin/sh", "-c"], "nobody") if su else None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_another_users_index_is_searched_with_real_permissions(tiny_checkpoint):
    """With real permissions, not a stand-in: the index is written here, made read-only (or read as 'nobody' when
    this is root), searched from a new process, and followed by a long-lived reader. A WAL database read where its
    -shm cannot be made is opened immutable; the FAISS file must be readable by others (tempfile made it 0600, and
    each search rebuilt it)."""
    how = _other_user()
    if how is None:
        pytest.skip("running as root without a 'nobody' user or su: no user here lacks write access")
    prefix, user = how
    work = Path(tempfile.mkdtemp(prefix="clipsearch-ro-"))  # outside pytest's 0700 folders, which others cannot enter
    try:
        os.chmod(work, 0o755)
        index, photos = work / "idx", work / "photos"
        _build(index, photos, tiny_checkpoint)
        home = work / "home"
        home.mkdir()
        if user:
            shutil.chown(home, user)
        else:
            _set_writable(index, False)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        check = subprocess.run(_as(prefix, [sys.executable, "-c", "import clipsearch"]), env=env, capture_output=True,
                               timeout=60)
        if check.returncode:
            pytest.skip(f"{user or 'this user'} cannot run this Python: {check.stderr.decode()[-200:]}")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(_as(prefix, [sys.executable, "-m", "clipsearch", *args]), env=env,
                                  capture_output=True, text=True, timeout=300)

        found = run("search", "a photo", "--index", str(index), "-k", "3")
        assert found.returncode == 0 and found.stdout.count("\n") == 3, found.stderr
        assert found.stderr == ""  # nothing rebuilt, nothing warned
        reader = _start_reader(prefix, index, env)
        try:
            assert reader.stdout.readline().strip() == "6"
            if not user:  # the owner writes again: give the files their write bits back meanwhile
                _set_writable(index, True)
            more = work / "more"
            copy_photos(more, 2)
            clip("index", more, "--index", index, *tiny(tiny_checkpoint))
            if not user:
                _set_writable(index, False)
            reader.stdin.write("again\n")
            reader.stdin.flush()
            assert reader.stdout.readline().strip() == "8"  # it followed the owner's run
            reader.stdin.close()
            assert reader.wait(timeout=60) == 0
        finally:  # end of input ends the reader, and with su its child too (a signal would stop su alone)
            if not reader.stdin.closed:
                reader.stdin.close()
            try:
                reader.wait(timeout=60)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait()
        before = _digest(index)
        for args in (["index", str(photos)], ["index"]):
            refused = run(*args, "--index", str(index))
            assert refused.returncode == errors.IndexReadOnly.exit_code, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1 and "read-only" in refused.stderr
        assert _digest(index) == before
        if user:  # pytest's folders are 0700: the tiny checkpoint is out of this user's reach
            private = run("index", str(photos), "--index", str(home / "own"), "--model", TINY_MODEL,
                          "--pretrained", str(tiny_checkpoint))
            assert private.returncode == errors.ModelError.exit_code, private.stderr
            assert private.stderr.strip() == f"clipsearch: error: cannot read checkpoint '{tiny_checkpoint}': " \
                                             "permission denied"
    finally:
        for path in [work, *work.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o755)
        shutil.rmtree(work)
