"""How the VM cache hands out a warm VM, with real sockets and stand-in warm
VMs (a `sleep` process standing for QEMU, socketpairs and a pipe for its
channels): a VM leaves the pool only for a requester that is still there,
its descriptors reach the requester, one that could not be handed out is
ended, and one whose owner dies is ended by the cache."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
from pykata.factory import cache, wire
from pykata.hypervisor.qemu import Handover
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.vm_source import ColdBoot

SHAPE, DIGEST = "shape-1", "config-1"


class StandInVm:
    """What the cache holds of a warm VM: a process for QEMU, its channels."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sleep", "600"])
        self.channels = [socket.socketpair() for _ in range(2)]
        self.output = os.pipe()

    async def wait(self) -> int:
        while self.proc.poll() is None:
            await asyncio.sleep(0.05)
        return 0

    def close(self) -> None:
        for a, b in self.channels:
            a.close()
            b.close()
        for fd in self.output:
            with contextlib.suppress(OSError):
                os.close(fd)


class StandInSandbox:
    """The warm sandbox's side of a hand-over (`Sandbox.hand_over`, `forget`,
    `kill`, `stop`), over a StandInVm."""

    def __init__(self, root: Path, index: int) -> None:
        self.paths = SandboxPaths(f"warm-{index:016x}", root)
        self.paths.run_dir.mkdir(parents=True)
        self.vm = StandInVm()
        self.killed = False
        self.forgotten = False

    async def hand_over(self) -> tuple[Handover, dict[str, object]]:
        (agent, _), (console, _) = self.vm.channels
        handover = Handover(pid=self.vm.proc.pid, pidfd=os.pidfd_open(self.vm.proc.pid),
                            agent=agent.fileno(), console=console.fileno(),
                            output=self.vm.output[0])
        return handover, {"run_dir": str(self.paths.run_dir), "qemu_pid": self.vm.proc.pid,
                          "vm_name": self.paths.key, "boot": "cold", "next_stream_id": 3}

    async def forget(self, handover: Handover) -> None:
        os.close(handover.pidfd)
        self.forgotten = True

    async def kill(self) -> None:
        self.killed = True
        self.vm.proc.kill()
        self.vm.proc.wait()

    async def stop(self) -> None:
        await self.kill()


@dataclass
class Pool:
    server: cache.VmCache
    cfg: config.Config
    root: Path
    made: list[StandInSandbox] = field(default_factory=list)

    def pooled(self) -> list[Any]:
        return [w.sandbox for w in self.server._warm]


@pytest.fixture
async def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pool]:
    root = tmp_path / "root"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    cfg = config.parse({"factory": {"vm_cache_number": 1,
                                    "vm_cache_endpoint": str(tmp_path / "cache.sock")}}, "test")
    pool = Pool(cache.VmCache(cfg, 1, ColdBoot(60)), cfg, root)

    async def keep_one(server: cache.VmCache) -> None:
        sandbox = StandInSandbox(root, len(pool.made))
        pool.made.append(sandbox)
        warm = cache._Warm(sandbox, SHAPE, DIGEST)  # type: ignore[arg-type]
        server._warm.append(warm)
        server._background(server._watch(warm))

    monkeypatch.setattr(cache.VmCache, "_keep_one", keep_one)
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
        # Every VM the cache did not hand out was stopped; clean the rest up.
        for made in pool.made:
            if not made.forgotten:
                assert made.killed, f"{made.paths.key} was neither handed out nor stopped"
            if made.vm.proc.poll() is None:
                made.vm.proc.kill()
                made.vm.proc.wait()
            made.vm.close()


async def _until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _request(conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    wire.send(conn, {"op": "vm", "shape": SHAPE, "config": DIGEST})
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
        monkeypatch.setattr(wire, "_SO_PEERPIDFD", 0x7fff)
    first = pool.pooled()
    conn = await _connected_by_a_process_now_gone(cache.endpoint(pool.cfg))
    with conn:
        answer, fds = await _request(conn)
    wire.close_fds(fds)
    await asyncio.sleep(0.5)  # what a replacement would need to start
    assert pool.pooled() == first and len(pool.made) == 1
    assert not first[0].killed and not first[0].forgotten
    assert pool.server.status()["handed_out"] == 0 and fds == []
    assert answer is not None and "gone" in str(answer.get("error")), answer


async def test_a_live_shim_gets_the_vm_its_descriptors_and_the_pool_refills(
        pool: Pool) -> None:
    (first,) = pool.pooled()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(cache.endpoint(pool.cfg)))
        answer, fds = await _request(conn)
    try:
        assert answer is not None and answer.get("ok"), answer
        assert answer["fds"] == ["pidfd", "agent", "console", "output"] and len(fds) == 4
        assert (answer["qemu_pid"], answer["vm_name"]) == (first.vm.proc.pid, first.paths.key)
        # The pidfd is QEMU's: the new owner can end it.
        signal.pidfd_send_signal(fds[0], 0)
        # The agent channel is the VM's: what the owner writes, the guest reads.
        os.write(fds[1], b"ping")
        assert first.vm.channels[0][1].recv(4) == b"ping"
    finally:
        wire.close_fds(fds)
    assert first.forgotten and not first.killed and first.vm.proc.poll() is None
    await _until(lambda: pool.server.status()["ready"] == 1, "the refill")
    assert pool.server.status()["handed_out"] == 1 and pool.pooled() != [first]


async def test_a_vm_that_could_not_be_handed_out_is_ended(
        pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The requester is there but the hand-over fails (it cannot be sent):
    the VM, already out of the pool and no longer whole, is stopped, never
    forgotten; the pool refills."""
    (first,) = pool.pooled()

    def broken_send(sock: socket.socket, message: dict[str, Any],
                    fds: list[int] | None = None) -> None:
        if message.get("ok"):
            raise OSError(32, "Broken pipe")
        original(sock, message, fds)

    original = wire.send
    monkeypatch.setattr(wire, "send", broken_send)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(str(cache.endpoint(pool.cfg)))
        original(conn, {"op": "vm", "shape": SHAPE, "config": DIGEST})
        await _until(lambda: first.killed, "the VM to be stopped")
    assert not first.forgotten
    await _until(lambda: pool.server.status()["ready"] == 1, "the refill")
    assert pool.server.status()["handed_out"] == 0


async def test_a_vm_whose_owner_dies_is_ended_by_the_cache(pool: Pool) -> None:
    """The owner took the VM and was killed before it moved the VM's
    directory: the cache kills the VM through its pidfd and removes the
    directory."""
    (first,) = pool.pooled()
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect(sys.argv[1])\n"
        "s.send(b'{\"op\": \"vm\", \"shape\": \"shape-1\", \"config\": \"config-1\"}')\n"
        "s.recv(65536)\n"
        "print('took', flush=True)\n"
        "time.sleep(600)\n", str(cache.endpoint(pool.cfg)), stdout=subprocess.PIPE)
    assert owner.stdout is not None
    assert await asyncio.wait_for(owner.stdout.readline(), 20) == b"took\n"
    await _until(lambda: first.forgotten, "the hand-over")
    assert first.vm.proc.poll() is None
    owner.kill()
    await owner.wait()
    await _until(lambda: first.vm.proc.poll() is not None, "the cache to end the VM")
    await _until(lambda: not first.paths.run_dir.exists(), "the cache to remove its directory")


def test_a_pid_that_names_no_process_is_refused() -> None:
    """Without SO_PEERPIDFD the cache has the pid the shim connected with."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, why in ((gone.pid, "gone"), (0, "PID namespace")):
        with pytest.raises(wire.PeerGone, match=why):
            wire._pidfd_by_pid(pid)


async def test_a_vsock_vm_is_never_asked_of_the_cache(tmp_path: Path) -> None:
    """A VM on vsock has no agent channel to hand over: the pod boots its own,
    without a VM leaving the pool for nothing."""
    import dataclasses

    from pykata.runtime.vm_source import VmWant
    from tests.unit.pod_fakes import fake_config

    cfg = fake_config(tmp_path)
    source = cache.CacheSource(cfg, ColdBoot(60))
    from pykata.hypervisor.qemu import VmConfig

    vm = VmConfig(name="p", run_dir=tmp_path, qemu_path="/bin/true",
                  kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.img", vsock_cid=7)
    assert await source.take(VmWant("p", "p", vm, needs_network=False)) is None
    assert await source.take(VmWant("p", "p", dataclasses.replace(vm, vsock_cid=0),
                                    needs_network=True)) is None


async def test_a_forgotten_vm_leaves_the_loop_watching_nothing_of_it(tmp_path: Path) -> None:
    """After a hand-over the cache's copy of the agent channel goes, and with
    it the event loop's watch: a number the cache reuses must not wake on
    the guest's traffic (the new owner's copy keeps the socket open)."""
    from pykata.hypervisor.qemu import QemuVM, VmConfig
    from pykata.runtime.agent_client import AgentClient
    from pykata.runtime.sandbox import Sandbox, SandboxOptions
    from tests.unit.pod_fakes import fake_config

    cfg = fake_config(tmp_path / "assets")
    os.environ["PYKATA_RUN_ROOT"] = str(tmp_path / "run")
    sandbox = Sandbox("warm-0000000000000001", cfg, SandboxOptions())
    ours, guest = socket.socketpair()
    kept_by_owner = os.dup(ours.fileno())  # what SCM_RIGHTS gave the new owner
    vm = QemuVM(VmConfig(name="w", run_dir=tmp_path, qemu_path="/bin/true",
                         kernel=tmp_path / "k", initrd=tmp_path / "i"))
    vm.agent_socket = ours
    sandbox.vm, sandbox.agent = vm, await AgentClient.over_socket(ours)
    fd = ours.fileno()
    pidfd = os.pidfd_open(os.getpid())
    await sandbox.forget(Handover(pid=os.getpid(), pidfd=pidfd, agent=fd, console=-1,
                                  output=-1))
    loop = asyncio.get_running_loop()
    assert fd not in loop._selector.get_map()  # type: ignore[attr-defined]
    os.close(kept_by_owner)
    guest.close()
