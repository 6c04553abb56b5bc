"""The VM cache's messages and settings, without VMs: what crosses its
sockets is bounded and checked, and descriptors of a bad message are closed."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pykata import config
from pykata.errors import ConfigError
from pykata.factory import cache, wire


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


async def test_a_message_and_its_descriptor_cross() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        wire.send(a, {"op": "adopt", "n": 1}, [r])
        message, fds = await wire.recv(b, timeout=5)
        assert message == {"op": "adopt", "n": 1} and len(fds) == 1
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe
        wire.close_fds(fds)
        assert wire.peer_uid_pid(b) == (os.geteuid(), os.getpid())
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


async def test_bad_messages_are_refused_and_their_descriptors_closed() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        for payload in (b"not json", b"[1, 2]"):
            socket.send_fds(a, [payload], [r])
            with pytest.raises(wire.WireError):
                await wire.recv(b, timeout=5)
        socket.send_fds(a, [b"x" * (wire.MAX_MESSAGE + 10)], [])
        with pytest.raises(wire.WireError, match="truncated"):
            await wire.recv(b, timeout=5)
        # Only our own two pipe ends stay open: the received copies were closed.
        fds = {int(n) for n in os.listdir("/proc/self/fd")}
        assert {r, w} <= fds
        with pytest.raises(wire.WireError, match="too large"):
            wire.send(a, {"x": "y" * wire.MAX_MESSAGE})
        a.close()
        with pytest.raises(EOFError):
            await wire.recv(b, timeout=5)
    finally:
        os.close(r)
        os.close(w)
        b.close()


def test_cache_settings() -> None:
    cfg = config.parse({"factory": {"vm_cache_number": 3, "vm_cache_endpoint": "/srv/c.sock"}},
                       "f")
    assert cfg.factory.vm_cache_number == 3 and str(cache.endpoint(cfg)) == "/srv/c.sock"
    for bad in ({"vm_cache_number": -1}, {"vm_cache_number": 1000},
                {"vm_cache_endpoint": "c.sock"}):
        with pytest.raises(ConfigError):
            config.parse({"factory": bad}, "f")
    # A configuration differing in any setting is another digest: its pods
    # never take a VM warmed for another.
    base = config.parse({}, "a")
    assert cache.config_digest(base) == cache.config_digest(config.parse({}, "b"))
    assert cache.config_digest(base) != cache.config_digest(
        config.parse({"runtime": {"scratch_size": 64}}, "a"))


def test_a_hand_over_is_checked_before_its_vm_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the owner of a pod accepts from the cache: the descriptors named
    and counted, QEMU's pid, the warm VM's name and directory (in this run
    root, never elsewhere), an odd stream id."""
    from pykata.errors import PykataError

    monkeypatch.setenv("PYKATA_RUN_ROOT", str(tmp_path))
    name = "warm-0123456789abcdef"
    (tmp_path / "sandboxes" / name).mkdir(parents=True)
    good = {"ok": True, "qemu_pid": 42, "vm_name": name, "next_stream_id": 7,
            "run_dir": str(tmp_path / "sandboxes" / name),
            "fds": ["pidfd", "agent", "console", "output"]}
    handover, paths, vm_name, stream = cache._checked(good, [10, 11, 12, 13])
    assert (handover.pid, handover.pidfd, handover.agent, handover.console,
            handover.output, handover.token) == (42, 10, 11, 12, 13, -1)
    assert (paths.run_dir, vm_name, stream) == (tmp_path / "sandboxes" / name, name, 7)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for change in ({"fds": ["agent", "pidfd", "console", "output"]},
                   {"fds": ["pidfd", "agent", "console"]},
                   {"qemu_pid": 0}, {"qemu_pid": "42"}, {"next_stream_id": 8},
                   {"vm_name": "../x"}, {"vm_name": "warm-0123456789abcdeg"},
                   {"run_dir": str(elsewhere)}, {"run_dir": "/"}):
        with pytest.raises(PykataError, match="cache"):
            cache._checked({**good, **change}, [10, 11, 12, 13])
    with pytest.raises(PykataError):
        cache._checked(good, [10, 11, 12])


