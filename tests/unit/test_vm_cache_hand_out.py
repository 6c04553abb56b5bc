"""How the VM cache hands out a warm VM, with real sockets and stand-in warm
monitors (processes that answer the cache as a warm pod monitor does, with
no VM): a VM leaves the pool only for a requester that is still there, and
one that left the pool without going to a pod is ended, never forgotten."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.errors import PykataError
from pykata.factory import cache, wire

SHAPE, DIGEST = "shape-1", "config-1"

# A stand-in warm pod monitor on the cache's control socket: it waits for the
# pod; on "adopt" it does what argv[2] says. It ends when the socket closes.
WARM_MONITOR = """
import json, socket, sys, time
control = socket.socket(fileno=int(sys.argv[1]))
data, fds, _, _ = socket.recv_fds(control, 65536, 4)
if not data:
    sys.exit(0)
if sys.argv[2] == "take":
    control.send(json.dumps({"ok": True, "qemu_pid": 0}).encode())
    control.recv(1)
    time.sleep(1)
elif sys.argv[2] == "refuse":
    control.send(json.dumps({"error": "the guest refused the pod"}).encode())
    time.sleep(600)
else:
    time.sleep(600)
"""


@dataclass
class Pool:
    server: cache.VmCache
    cfg: config.Config
    behaviour: str = "take"
    monitors: list[asyncio.subprocess.Process] = field(default_factory=list)

    def running(self) -> set[int]:
        return {p.pid for p in self.monitors if p.returncode is None}

    def pooled(self) -> set[int]:
        return {w.proc.pid for w in self.server._warm}


@pytest.fixture
async def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pool]:
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(tmp_path / "root"))
    cfg = config.parse({"factory": {"vm_cache_number": 1,
                                    "vm_cache_endpoint": str(tmp_path / "cache.sock")}}, "test")
    pool = Pool(cache.VmCache(cfg, 1), cfg)

    async def keep_one(server: cache.VmCache) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WARM_MONITOR, str(theirs.fileno()), pool.behaviour,
            pass_fds=(theirs.fileno(),))
        theirs.close()
        pool.monitors.append(proc)
        warm = cache._Warm(proc, ours, shape=SHAPE, config=DIGEST, boot="cold")
        server._warm.append(warm)
        server._background(server._watch(warm))

    monkeypatch.setattr(cache.VmCache, "_keep_one", keep_one)
    monkeypatch.setattr(cache, "_ADOPT_SECONDS", 1.0)
    monkeypatch.setattr(cache, "_RETIRE_SECONDS", 1.0, raising=False)
    serving = asyncio.ensure_future(pool.server.serve())
    try:
        await _until(lambda: pool.server.status()["ready"] == 1, "the pool to fill")
        yield pool
    finally:
        pool.server._stopping.set()
        await asyncio.wait_for(serving, 30)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # The cache ended every warm monitor it did not hand out (a handed
        # out stand-in ends a second after the cache closed its socket).
        left = pool.running()
        handed = pool.server._handed_out
        for proc in pool.monitors:
            if proc.returncode is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5 if handed else 0.1)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert len(left) <= handed, f"warm monitors left running: {left}"


async def _until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _request(pool: Pool, conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    wire.send(conn, {"op": "vm", "id": "pod-1", "key": "pod-1", "shape": SHAPE,
                     "config": DIGEST, "options": {}})
    try:
        return await wire.recv(conn, timeout=20)
    except EOFError:
        return None, []


async def _connected_by_a_process_now_gone(endpoint: Path) -> socket.socket:
    """A connection to the cache made by a process that has exited since
    (its peer credentials name it), as a shim killed while it waits."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = ("import socket, sys\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\n"
            "s.connect(sys.argv[2])\n"
            "s.detach()\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(conn.fileno()), str(endpoint),
        pass_fds=(conn.fileno(),))
    assert await proc.wait() == 0
    return conn


@pytest.mark.parametrize("peer_pidfd", ["SO_PEERPIDFD", "pidfd_open"])
async def test_a_request_from_a_gone_shim_leaves_the_vm_in_the_pool(
        pool: Pool, peer_pidfd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if peer_pidfd == "pidfd_open":  # a kernel before 6.5 has no SO_PEERPIDFD
        monkeypatch.setattr(cache, "_SO_PEERPIDFD", 0x7fff, raising=False)
    first = pool.pooled()
    conn = await _connected_by_a_process_now_gone(cache.endpoint(pool.cfg))
    with conn:
        answer, fds = await _request(pool, conn)
    wire.close_fds(fds)
    await asyncio.sleep(0.5)  # what a replacement would need to start
    assert pool.running() == pool.pooled(), "a warm monitor left the pool and runs on"
    assert pool.pooled() == first and len(pool.monitors) == 1
    assert pool.server.status()["handed_out"] == 0
    assert answer is not None and "gone" in str(answer.get("error")), answer


async def test_a_live_shim_gets_the_vm_and_the_pool_refills(pool: Pool) -> None:
    first = pool.pooled()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(cache.endpoint(pool.cfg)))
        answer, fds = await _request(pool, conn)
    try:
        assert answer is not None and answer.get("ok"), answer
        assert {answer["monitor_pid"]} == first and len(fds) == 1
    finally:
        wire.close_fds(fds)
    await _until(lambda: pool.server.status()["ready"] == 1, "the refill")
    assert pool.server.status()["handed_out"] == 1 and pool.pooled() != first


@pytest.mark.parametrize("behaviour", ["refuse", "hang"])
async def test_a_vm_that_left_the_pool_but_no_pod_took_is_ended(
        pool: Pool, behaviour: str) -> None:
    """A warm monitor that refuses the pod or does not answer in time is
    ended (its socket closed, then killed): it serves no pod and nobody
    would end it otherwise. The pool refills."""
    # The pooled monitor takes pods: end it, and its replacement behaves as asked.
    taken = pool.pooled()
    pool.behaviour = behaviour
    pool.server._warm[0].control.close()
    await _until(lambda: pool.server.status()["ready"] == 1 and pool.pooled() != taken,
                 "a monitor that behaves as asked")
    failing = pool.pooled()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(cache.endpoint(pool.cfg)))
        answer, fds = await _request(pool, conn)
    wire.close_fds(fds)
    assert answer is not None and not answer.get("ok"), answer
    await _until(lambda: not failing & pool.running(), "the failed monitor to end")
    await _until(lambda: pool.server.status()["ready"] == 1, "the refill")
    assert pool.server.status()["handed_out"] == 0


def test_a_pid_that_names_no_process_is_refused() -> None:
    """Without SO_PEERPIDFD the cache has the pid the shim connected with."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, why in ((gone.pid, "gone"), (0, "PID namespace")):
        with pytest.raises(PykataError, match=why):
            cache._pidfd_by_pid(pid)
