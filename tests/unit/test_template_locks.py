"""The template keys' locks: `factory destroy` never takes a lock, or the
work, from a builder that holds it, and a taker never keeps a lock whose file
was unlinked under it (two builders would each hold "the" lock, and one's
files would land in the other's template)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pykata.factory import template
from pykata.hypervisor.qemu import VmConfig

# A builder as `template.build` is one, in a process of its own: it holds the
# key's lock, fills <key>.new, and on a line from its stdin finishes the way
# build does (the record last, then the rename).
_BUILDER = """
import fcntl, os, sys
root, key, record = sys.argv[1:]
fd = os.open(f"{root}/{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
work = f"{root}/{key}.new"
os.mkdir(work, 0o700)
for part in ("memory", "state"):
    with open(f"{work}/{part}", "wb") as f:
        f.write(f"{part} of the first builder".encode())
print("building", flush=True)
sys.stdin.readline()
with open(f"{work}/template.json", "w") as f:
    f.write(record)
os.rename(work, f"{root}/{key}")
print("built", flush=True)
"""


def _vm(tmp_path: Path) -> VmConfig:
    for name in ("vmlinux", "initrd", "qemu"):
        (tmp_path / name).touch()
    return VmConfig(name="s1", run_dir=tmp_path / "run", qemu_path=str(tmp_path / "qemu"),
                    kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd",
                    shared_dir=tmp_path / "shared")


def _inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_destroy_leaves_a_live_builders_lock_and_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = _vm(tmp_path)
    ident = template.identity(vm)
    key = template.template_key(ident)
    root = tmp_path / "templates"
    root.mkdir(mode=0o700)
    record = json.dumps({"identity": ident, "next_stream_id": 3, "created": time.time()})
    builder = subprocess.Popen([sys.executable, "-c", _BUILDER, str(root), key, record],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert builder.stdin is not None and builder.stdout is not None
    try:
        assert builder.stdout.readline() == "building\n"
        lock = _inode(root / f"{key}.lock")
        # Not the minute `pykata factory destroy` waits by default.
        monkeypatch.setattr(template, "DESTROY_WAIT_SECONDS", 0.5, raising=False)
        started = time.monotonic()
        result = template.destroy(root)
        assert (root / f"{key}.lock").exists(), "destroy unlinked a live builder's lock"
        assert _inode(root / f"{key}.lock") == lock
        assert (root / f"{key}.new" / "memory").read_bytes() == b"memory of the first builder"
        assert result.busy == [key] and result.removed == []
        assert time.monotonic() - started >= 0.5, "destroy did not wait for the builder"
        # Nobody else can build the key meanwhile.
        with pytest.raises(template.TemplateBusy):
            asyncio.run(template.build(root, vm, 1.0, bounds=template.Limits(4, 2**30)))
        builder.stdin.write("finish\n")
        builder.stdin.flush()
        assert builder.stdout.readline() == "built\n"
    finally:
        builder.kill()
        builder.wait()
    # The builder's template is whole: its own memory and state, its record.
    found, why = template.find(root, vm)
    assert found is not None, why
    assert found.memory.read_bytes() == b"memory of the first builder"
    assert found.state.read_bytes() == b"state of the first builder"
    # With the builder gone, destroy removes it all.
    assert template.destroy(root, 0).removed == [key]
    assert not root.exists()


def test_destroy_waits_for_a_builder_that_finishes_in_time(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    root.mkdir(mode=0o700)
    key = "0123456789abcdef01234567"
    fd = template._take_lock(root, key, fcntl.LOCK_EX)
    (root / f"{key}.new").mkdir()
    told: list[list[str]] = []
    threading.Timer(0.3, os.close, (fd,)).start()  # the builder ends
    result = template.destroy(root, 10, told.append)
    assert told == [[key]] and result.busy == [] and not root.exists()


def test_a_lock_unlinked_under_its_waiter_is_taken_again(tmp_path: Path) -> None:
    """Whoever removes a template unlinks its lock file while holding it; a
    builder that was waiting on that file must not build under it."""
    root = tmp_path / "templates"
    root.mkdir(mode=0o700)
    key = "0123456789abcdef01234567"
    holder = template._take_lock(root, key, fcntl.LOCK_EX)
    taken: list[int] = []
    waiter = threading.Thread(target=lambda: taken.append(
        template._take_lock(root, key, fcntl.LOCK_EX)))
    waiter.start()
    time.sleep(0.2)  # the waiter has opened the file and waits in flock
    (root / f"{key}.lock").unlink()
    os.close(holder)
    waiter.join(5)
    assert taken, "the waiter never took the lock"
    try:
        # The waiter holds the file the path names now, not the unlinked one:
        # a third taker is shut out.
        assert os.fstat(taken[0]).st_ino == os.stat(root / f"{key}.lock").st_ino
        with pytest.raises(BlockingIOError):
            template._take_lock(root, key, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(taken[0])


def test_prune_and_cleanup_leave_a_held_key_alone(tmp_path: Path) -> None:
    """A stale template a restore still holds, and a work directory its
    builder still holds, stay; once free, both go with their lock files."""
    vm = _vm(tmp_path)
    ident = template.identity(vm)
    key = template.template_key(ident)
    root = tmp_path / "templates"
    directory = root / key
    directory.mkdir(parents=True, mode=0o700)
    (directory / template.META).write_text(json.dumps({"identity": {"format": 0}}))
    (root / f"{key}.new").mkdir()
    fd = template._take_lock(root, key, fcntl.LOCK_SH)
    try:
        assert template.prune(root) == [] and directory.is_dir()
        assert template.remove_abandoned(root) == [] and (root / f"{key}.new").is_dir()
    finally:
        os.close(fd)
    assert template.remove_abandoned(root) == [key]
    assert template.prune(root) == [key]
    assert sorted(p.name for p in root.iterdir()) == []
