"""The VM cache's endpoint, without VMs: wherever an operator puts it (/run
included), pykata changes no directory's mode, refuses a directory another
user could write, and removes only a socket a cache of its own recorded,
once that cache is gone. pykata's own directories stay private by refusal,
not by chmod."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.errors import HostError, PykataError
from pykata.factory import cache
from pykata.runtime.paths import others_can_replace, private_dir
from pykata.runtime.vm_source import ColdBoot

NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _cache_config(endpoint: Path) -> config.Config:
    return config.parse({"factory": {"vm_cache_number": 1,
                                     "vm_cache_endpoint": str(endpoint)}}, "test")


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "pykata-root"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    return root


def _run_like(tmp_path: Path, mode: int, name: str = "run") -> Path:
    """A directory like the host's /run (0755) or /tmp (1777), root's."""
    path = tmp_path / name
    path.mkdir()
    os.chmod(path, mode)
    return path


async def _serve_briefly(cfg: config.Config) -> BaseException | None:
    """Run the cache server (no warm VMs) until it serves or fails; what it raised."""
    server = cache.VmCache(cfg, 0, ColdBoot(60))
    task = asyncio.ensure_future(server.serve())
    try:
        deadline = time.monotonic() + 10
        while not task.done() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, PykataError):
                if "ready" in await cache.ask(cfg, "status"):
                    break
            await asyncio.sleep(0.05)
        if not task.done():
            await cache.ask(cfg, "shutdown")
        await asyncio.wait_for(task, 10)
        return None
    except PykataError as exc:
        return exc
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# What an operator's /run may hold at the chosen path.

def _regular_file(path: Path) -> Callable[[], None]:
    path.write_text("someone's data\n")
    inode = os.lstat(path).st_ino

    def unchanged() -> None:
        assert os.lstat(path).st_ino == inode and path.read_text() == "someone's data\n"
    return unchanged


@contextlib.contextmanager
def _stream_listener(path: Path) -> Iterator[Callable[[], None]]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    inode = os.lstat(path).st_ino

    def unchanged() -> None:
        assert os.lstat(path).st_ino == inode
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client:
            client.connect(str(path))  # still served

    try:
        yield unchanged
    finally:
        listener.close()


def _dead_socket(path: Path) -> Callable[[], None]:
    """A socket file nobody listens on, that no cache of pykata recorded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(path))
    inode = os.lstat(path).st_ino

    def unchanged() -> None:
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and os.lstat(path).st_ino == inode
    return unchanged


@contextlib.contextmanager
def _occupant(kind: str, path: Path) -> Iterator[Callable[[], None]]:
    if kind == "stream listener":
        with _stream_listener(path) as unchanged:
            yield unchanged
    else:
        yield (_regular_file if kind == "regular file" else _dead_socket)(path)


OCCUPANTS = ["regular file", "stream listener", "foreign socket"]


def test_private_dir_makes_private_directories_and_changes_no_existing_one(
        tmp_path: Path) -> None:
    made = private_dir(tmp_path / "new" / "state")
    assert _mode(made) == 0o700 and _mode(made.parent) == 0o700
    private_dir(made)  # its own: accepted again
    # Another program's directory (/run is 0755): used as it is.
    run = _run_like(tmp_path, 0o755)
    assert private_dir(run) == run and _mode(run) == 0o755
    for mode in (0o1777, 0o777, 0o775):
        shared = _run_like(tmp_path, mode, f"tmp-{mode:o}")
        with pytest.raises(HostError, match=f"chmod go-w {shared}"):
            private_dir(shared)
        assert _mode(shared) == mode


async def test_an_endpoint_in_a_run_like_directory_leaves_it_as_it_was(tmp_path: Path) -> None:
    run = _run_like(tmp_path, 0o755)
    neighbour = _regular_file(run / "resolv.conf")
    failed = await _serve_briefly(_cache_config(run / "pykata-cache.sock"))
    assert failed is None
    assert _mode(run) == 0o755
    neighbour()
    assert not (run / "pykata-cache.sock").exists()  # its own socket went with it


async def test_an_endpoint_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    for mode in (0o1777, 0o777, 0o775):
        shared = _run_like(tmp_path, mode, f"tmp-{mode:o}")
        failed = await _serve_briefly(_cache_config(shared / "cache.sock"))
        assert isinstance(failed, PykataError), f"mode {mode:o}: served"
        assert "writable by other users" in str(failed) and "vm_cache_endpoint" in str(failed)
        assert _mode(shared) == mode and not (shared / "cache.sock").exists()


async def test_an_endpoint_under_another_users_directory_is_refused(tmp_path: Path) -> None:
    theirs = _run_like(tmp_path, 0o755, "home-of-nobody")
    os.chown(theirs, NOBODY, NOBODY)
    ours = theirs / "ours"
    ours.mkdir(mode=0o700)
    failed = await _serve_briefly(_cache_config(ours / "cache.sock"))
    assert isinstance(failed, PykataError) and f"belongs to uid {NOBODY}" in str(failed)


@pytest.mark.parametrize("kind", OCCUPANTS)
async def test_a_starting_cache_leaves_what_it_did_not_make(tmp_path: Path, kind: str) -> None:
    run = _run_like(tmp_path, 0o755)
    path = run / "pykata-cache.sock"
    with _occupant(kind, path) as unchanged:
        failed = await _serve_briefly(_cache_config(path))
        unchanged()
        assert isinstance(failed, PykataError) and "does not remove it" in str(failed)
        assert _mode(run) == 0o755


@pytest.mark.parametrize("kind", OCCUPANTS)
def test_cleanup_leaves_what_no_cache_recorded(tmp_path: Path, kind: str) -> None:
    run = _run_like(tmp_path, 0o755)
    path = run / "pykata-cache.sock"
    with _occupant(kind, path) as unchanged:
        assert not cache.remove_stale_endpoint(_cache_config(path))
        unchanged()
        assert _mode(run) == 0o755


def _cache_process(endpoint: Path) -> subprocess.Popen[bytes]:
    """A cache server (no warm VMs) in a process of its own, serving."""
    code = ("import asyncio, sys\n"
            "from pykata import config\n"
            "from pykata.factory import cache\n"
            "from pykata.runtime.vm_source import ColdBoot\n"
            "cfg = config.parse({'factory': {'vm_cache_number': 1, "
            "'vm_cache_endpoint': sys.argv[1]}}, 'test')\n"
            "asyncio.run(cache.VmCache(cfg, 0, ColdBoot(60)).serve())\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(endpoint)])
    deadline = time.monotonic() + 20
    while not (endpoint.exists() and _answers(endpoint)):
        assert proc.poll() is None and time.monotonic() < deadline, "the cache did not start"
        time.sleep(0.05)
    return proc


def _answers(endpoint: Path) -> bool:
    try:
        return "ready" in asyncio.run(cache.ask(_cache_config(endpoint), "status"))
    except (PykataError, OSError, EOFError):
        return False


def test_a_killed_caches_socket_is_removed_and_a_live_ones_is_not(tmp_path: Path) -> None:
    run = _run_like(tmp_path, 0o755)
    path = run / "pykata-cache.sock"
    cfg = _cache_config(path)
    proc = _cache_process(path)
    try:
        assert not cache.remove_stale_endpoint(cfg)  # it serves
        with pytest.raises(PykataError, match="already serves"):
            asyncio.run(cache.VmCache(cfg, 0, ColdBoot(60)).serve())
        assert _answers(path)
    finally:
        proc.kill()
        proc.wait()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # a killed cache leaves its socket
    assert cache.remove_stale_endpoint(cfg)
    assert not path.exists() and _mode(run) == 0o755
    # The next cache starts on a killed one's socket too.
    proc = _cache_process(path)
    proc.kill()
    proc.wait()
    assert asyncio.run(_serve_briefly(cfg)) is None


def test_a_socket_put_in_a_killed_caches_place_is_not_removed(tmp_path: Path) -> None:
    run = _run_like(tmp_path, 0o755)
    path = run / "pykata-cache.sock"
    proc = _cache_process(path)
    proc.kill()
    proc.wait()
    path.unlink()
    unchanged = _dead_socket(path)  # not the socket the cache recorded
    assert not cache.remove_stale_endpoint(_cache_config(path))
    unchanged()


def test_the_record_is_pykatas_own(tmp_path: Path, run_root: Path) -> None:
    """The record lies in pykata's private run root, names the socket by
    device and inode, and goes with the cache."""
    path = _run_like(tmp_path, 0o755) / "pykata-cache.sock"
    proc = _cache_process(path)
    try:
        records = list((run_root / "factory").glob("endpoint-*.json"))
        assert len(records) == 1 and _mode(run_root / "factory") == 0o700
        record = json.loads(records[0].read_text())
        st = os.lstat(path)
        assert record == {"endpoint": str(path), "dev": st.st_dev, "ino": st.st_ino,
                          "mtime_ns": st.st_mtime_ns}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert not path.exists() and not (run_root / "factory").exists()


def test_links_on_the_way_to_the_endpoint_are_checked(tmp_path: Path) -> None:
    """An endpoint reached through a link is judged by where the link lies
    too: one another user owns, or one in a directory others can write
    without the sticky bit, could be pointed elsewhere later."""
    target = _run_like(tmp_path, 0o755, "target")
    sticky = _run_like(tmp_path, 0o1777, "sticky")
    (sticky / "roots").symlink_to(target)
    assert others_can_replace(sticky / "roots") == ""  # only root may replace it
    (sticky / "theirs").symlink_to(target)
    os.lchown(sticky / "theirs", NOBODY, NOBODY)
    assert f"belongs to uid {NOBODY}" in others_can_replace(sticky / "theirs")
    open_dir = _run_like(tmp_path, 0o777, "open")
    (open_dir / "link").symlink_to(target)
    assert "writable by other users" in others_can_replace(open_dir / "link")
    (target / "up").symlink_to("../open")
    assert "writable by other users" in others_can_replace(target / "up")
