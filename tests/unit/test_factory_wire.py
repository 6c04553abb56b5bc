"""The VM cache's messages and settings, without VMs: what crosses its
sockets is bounded and checked, and descriptors of a bad message are closed."""

from __future__ import annotations

import os
import socket

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


def test_adoption_messages_are_checked() -> None:
    """What a warm monitor accepts from the cache: ids checked, options typed."""
    from pykata.errors import PykataError

    r, w = os.pipe()
    os.close(w)
    try:
        good = cache.parse_adoption({"op": "adopt", "id": "p1", "key": "k1",
                                     "options": {"hostname": "h", "memory_mib": 256}}, [r])
        assert good.options.memory_mib == 256 and good.shim_pidfd == r
        for bad in ({"op": "adopt", "id": "../x", "key": "k", "options": {}},
                    {"op": "adopt", "id": "p", "key": "k", "options": {"vcpus": "2"}},
                    {"op": "adopt", "id": "p", "key": "k", "options": {"evil": 1}},
                    {"op": "adopt", "id": "p", "key": "k", "options": {"vcpus": True}},
                    {"op": "other", "id": "p", "key": "k", "options": {}}):
            with pytest.raises(PykataError):
                cache.parse_adoption(bad, [r])
        with pytest.raises(PykataError):
            cache.parse_adoption({"op": "adopt", "id": "p", "key": "k", "options": {}}, [])
    finally:
        os.close(r)
