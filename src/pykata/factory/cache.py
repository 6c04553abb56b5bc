"""The VM cache: VMs kept booted (or restored from the template) with no pod
yet, handed to pods' owners as they start ([factory] vm_cache_number).

    pykata factory init        serves <endpoint> (vm_cache_endpoint), 0600,
      └─ N QEMUs               each a sandbox warm-<hex>, started without its
                               CreateSandbox; no Python process of its own

A pod's owner (containerd's shim) asks for a VM of its pod's shape and
configuration (`CacheSource`). The cache checks the requester (root, and
alive: it takes a pidfd of it before a VM leaves the pool), then hands the
VM over: QEMU's pidfd, the agent channel, the console and QEMU's output,
with the VM's directory, its name and the agent channel's next stream id.
The owner renames the directory to its pod's, gives the guest its
CreateSandbox and owns the VM from then on (`Sandbox._move_in`). The cache
starts a replacement at once.

Lifetimes. A warm VM's QEMU is not killed with the cache, since a VM handed
out must outlive it: it ends when the cache's end of its agent channel
closes, as every pykata VM does (the agent powers the guest off), so a
cache that is stopped or SIGKILLed leaves no VM running (its directories
are `pykata cleanup`'s). A VM handed out ends with its owner: the owner
stops it; if the owner is SIGKILLed, its end of the agent channel closes
(the guest powers off), containerd's `shim delete` kills QEMU by its pid,
and the cache, while it runs, kills it through the pidfd it kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.config import Config
from pykata.errors import PykataError
from pykata.factory import template as templates
from pykata.factory import wire
from pykata.factory.endpoint import claim_endpoint, endpoint, remove_stale_endpoint
from pykata.hypervisor.qemu import Handover, QemuVM, VmConfig
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import Sandbox, SandboxOptions, cleanup_host_state
from pykata.runtime.vm_source import BootedVm, VmSource, VmWant

__all__ = ["CacheSource", "VmCache", "ask", "endpoint", "remove_stale_endpoint"]

log = logging.getLogger(__name__)

_REQUEST_SECONDS = 90.0
# After a warm VM fails to start, how long before the next try.
_RETRY_SECONDS = 5.0
# How long a VM taken over has to answer on its handed-over channel.
_CHECK_SECONDS = 10.0
_WARM_NAME = re.compile(r"warm-[0-9a-f]{16}")
# The descriptors of a hand-over, in the order they travel.
_FDS = ("pidfd", "agent", "console", "output", "token")


def vm_shape(vm: VmConfig) -> str:
    """What a warm VM must match: the same key a template of it has."""
    return templates.template_key(templates.identity(vm))


def config_digest(config: Config) -> str:
    """A digest of the settings a pod's sandbox is made with (its file's name
    aside): a warm VM serves only pods of an equal configuration."""
    data = config.to_dict()
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


class _Outliving:
    """A source of warm VMs: QEMU is not killed with the cache (see above)."""

    def __init__(self, inner: VmSource) -> None:
        self.inner = inner

    async def take(self, want: VmWant) -> BootedVm | None:
        return None

    async def boot(self, config: VmConfig, name: str) -> BootedVm:
        return await self.inner.boot(dataclasses.replace(config, outlives_owner=True), name)


@dataclass(eq=False)  # one per VM: compared, and kept in lists, as itself
class _Warm:
    sandbox: Sandbox
    shape: str
    config: str


class VmCache:
    """The cache server: keeps `count` warm VMs, hands them out."""

    def __init__(self, config: Config, count: int, source: VmSource) -> None:
        """`source`: where the warm VMs come from (the template, or a boot)."""
        self.config = config
        self.count = count
        self.endpoint = endpoint(config)
        self._source = _Outliving(source)
        self._digest = config_digest(config)
        self._warm: list[_Warm] = []
        self._starting = 0
        self._handed_out = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self) -> None:
        """Serve until SIGTERM, SIGINT or a "shutdown" request."""
        from pykata.host.probes import probe_vsock

        if self.count and probe_vsock().value == "vsock":
            raise PykataError("the VM cache serves only VMs on the virtio-serial agent "
                              "channel, and this host's VMs use vsock",
                              hint="set vm_cache_number = 0 in [factory]: pods boot their own")
        claim = claim_endpoint(self.endpoint)
        try:
            listener = claim.listen()
        except BaseException:
            claim.release()
            raise
        log.info("VM cache: keeping %d VMs, serving %s", self.count, self.endpoint)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._spawn(self.count)
        accept = asyncio.ensure_future(self._accept(listener))
        try:
            await self._stopping.wait()
        finally:
            accept.cancel()
            listener.close()
            claim.release()
            await self._end_all()

    def _spawn(self, n: int) -> None:
        for _ in range(n):
            self._background(self._keep_one())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_one(self) -> None:
        """Start one warm VM; a failed start is retried after a pause."""
        self._starting += 1
        try:
            while not self._stopping.is_set():
                name = f"warm-{secrets.token_hex(8)}"
                sandbox = Sandbox(name, self.config, SandboxOptions(), front_end="factory",
                                  source=self._source)
                try:
                    await sandbox.start(create=False)
                except Exception as exc:  # the pool must not stay short for good
                    log.error("VM cache: a warm VM failed to start: %s", exc)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), _RETRY_SECONDS)
                    continue
                warm = _Warm(sandbox, vm_shape(sandbox.vm_config()), self._digest)
                self._warm.append(warm)
                self._background(self._watch(warm))
                return
        finally:
            self._starting -= 1

    async def _watch(self, warm: _Warm) -> None:
        """A warm VM that ends before a pod took it is replaced."""
        assert warm.sandbox.vm is not None
        await warm.sandbox.vm.wait()
        if warm in self._warm:
            self._warm.remove(warm)
            await warm.sandbox.kill()
            if not self._stopping.is_set():
                log.warning("VM cache: a warm VM ended on its own: starting another")
                self._spawn(1)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of descriptors, say: serve on later
                log.error("VM cache: accepting a request failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            self._background(self._client(conn))

    async def _client(self, conn: socket.socket) -> None:
        with conn:
            uid, pid = wire.peer_uid_pid(conn)
            if uid != os.geteuid():
                log.warning("VM cache: refused a request from uid %d", uid)
                return
            try:
                message, fds = await wire.recv(conn, timeout=10)
                wire.close_fds(fds)
            except (TimeoutError, EOFError, wire.WireError, OSError):
                return
            op = message.get("op")
            if op == "status":
                wire.send(conn, self.status())
            elif op == "shutdown":
                wire.send(conn, {"ok": True})
                self._stopping.set()
            elif op == "vm":
                await self._hand_out(conn, pid, message)
            else:
                wire.send(conn, {"error": f"unknown request {op!r}"})

    def status(self) -> dict[str, Any]:
        return {"target": self.count, "ready": len(self._warm), "starting": self._starting,
                "handed_out": self._handed_out,
                "shapes": sorted({w.shape for w in self._warm})}

    async def _hand_out(self, conn: socket.socket, peer_pid: int,
                        message: dict[str, Any]) -> None:
        shape, digest = message.get("shape"), message.get("config")
        warm = next((w for w in self._warm if w.shape == shape and w.config == digest), None)
        if warm is None:
            reason = ("the VM cache is empty" if not self._warm else
                      "the VM cache has no VM of this shape and configuration")
            wire.send(conn, {"error": reason})
            return
        # Before the VM leaves the pool: a VM handed out is watched as long as
        # its owner lives, so an owner that is gone (or cannot be watched)
        # gets none, and the VM stays.
        try:
            owner = wire.requester_pidfd(conn, peer_pid)
        except wire.PeerGone as exc:
            log.warning("VM cache: no VM for a request: %s", exc)
            with contextlib.suppress(OSError):
                wire.send(conn, {"error": str(exc)})
            return
        self._warm.remove(warm)
        self._spawn(1)
        qemu = -1
        try:
            handover, meta = await warm.sandbox.hand_over()
            qemu = os.dup(handover.pidfd)
            wire.send(conn, {"ok": True, **meta, "fds": [n for n, fd in zip(
                _FDS, (handover.pidfd, handover.agent, handover.console, handover.output,
                       handover.token), strict=True) if fd >= 0]}, handover.fds())
        except BaseException as exc:
            # Not handed out, and no longer whole (its logs stopped): it ends.
            for fd in (owner, qemu):
                if fd >= 0:
                    os.close(fd)
            await warm.sandbox.kill()
            if isinstance(exc, (OSError, PykataError, wire.WireError)):
                log.warning("VM cache: handing a VM out failed: %s", exc)
                return
            raise
        run_dir = warm.sandbox.paths
        await warm.sandbox.forget(handover)
        self._handed_out += 1
        self._background(self._watch_owner(owner, qemu, run_dir))

    async def _watch_owner(self, owner: int, qemu: int, warm: SandboxPaths) -> None:
        """A VM handed out ends with its owner: when the owner is gone first,
        the VM is killed, and its directory goes if the owner never moved it."""
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        for fd in (owner, qemu):
            loop.add_reader(fd, ended.set)
        try:
            await ended.wait()
            if wire.exited(owner) and not wire.exited(qemu):
                log.warning("VM cache: the owner of VM %s is gone: ending it", warm.key)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(qemu, signal.SIGKILL)
                while not wire.exited(qemu):
                    await asyncio.sleep(0.05)
            # The owner moves the directory as its first step: one still under
            # the warm name, its VM gone, is nobody's (a take-over that failed).
            if warm.run_dir.exists():
                cleanup_host_state(warm)
        finally:
            for fd in (owner, qemu):
                loop.remove_reader(fd)
                os.close(fd)

    async def _end_all(self) -> None:
        """Stop every warm VM (VMs handed out are their owners')."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        warm, self._warm = self._warm, []
        await asyncio.gather(*(w.sandbox.stop() for w in warm), return_exceptions=True)


class CacheSource:
    """A pod's VM from the VM cache when it has one of the pod's shape and
    configuration; else `fallback`'s, with a log line saying why."""

    def __init__(self, config: Config, fallback: VmSource) -> None:
        self.config = config
        self.fallback = fallback

    async def take(self, want: VmWant) -> BootedVm | None:
        if want.config.vsock_cid:
            # A VM kept warm would need its own context id, and its agent
            # channel is not a descriptor that can be handed over.
            log.info("pod %s boots its own VM: the VM cache serves no vsock VMs",
                     want.sandbox_id)
            return None
        if want.needs_network:
            log.info("pod %s boots its own VM: a VM kept warm has no network interfaces "
                     "(microvm has no hot-plug)", want.sandbox_id)
            return None
        try:
            return await self._request(want)
        except PykataError as exc:
            log.warning("pod %s boots its own VM: %s", want.sandbox_id, exc)
            return None

    async def boot(self, config: VmConfig, name: str) -> BootedVm:
        return await self.fallback.boot(config, name)

    async def _request(self, want: VmWant) -> BootedVm:
        path = endpoint(self.config)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with conn:
            conn.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.sock_connect(conn, str(path)), 5)
            except (TimeoutError, OSError) as exc:
                raise PykataError(f"no VM cache at {path} ({exc})") from None
            uid, _ = wire.peer_uid_pid(conn)
            if uid != os.geteuid():
                raise PykataError(f"the VM cache at {path} runs as uid {uid}: not used")
            wire.send(conn, {"op": "vm", "shape": vm_shape(want.config),
                             "config": config_digest(self.config)})
            try:
                answer, fds = await wire.recv(conn, timeout=_REQUEST_SECONDS)
            except (TimeoutError, EOFError, wire.WireError, OSError) as exc:
                raise PykataError(f"the VM cache did not answer ({exc})") from None
        if not answer.get("ok"):
            wire.close_fds(fds)
            raise PykataError(str(answer.get("error", "the VM cache sent no VM")))
        return await self._take_over(want, answer, fds)

    async def _take_over(self, want: VmWant, answer: dict[str, Any], fds: list[int]
                         ) -> BootedVm:
        """Own the VM the cache sent: from here on, a failure ends it."""
        try:
            handover, run_dir, vm_name, stream = _checked(answer, fds)
        except PykataError:
            wire.close_fds(fds)
            raise
        config = dataclasses.replace(want.config, name=vm_name, run_dir=run_dir.run_dir)
        try:
            vm = await QemuVM.take_over(config, handover)
        except BaseException:
            cleanup_host_state(run_dir)
            raise
        try:
            assert vm.agent_socket is not None
            agent = await AgentClient.over_socket(vm.agent_socket, first_stream_id=stream)
            try:
                await agent.check(_CHECK_SECONDS)
            except BaseException:
                await agent.close()
                raise
        except BaseException as exc:
            await vm.kill()
            cleanup_host_state(run_dir)
            if isinstance(exc, PykataError):
                raise PykataError(f"the VM the cache handed over does not answer: {exc}"
                                  ) from exc
            raise
        return BootedVm(vm, agent, config, "cache", run_dir=run_dir.run_dir, vm_name=vm_name)


def _checked(answer: dict[str, Any], fds: list[int]
             ) -> tuple[Handover, SandboxPaths, str, int]:
    """The cache's answer, each value checked (the cache is root's, but a
    value that is not one it sends is no VM to take)."""
    names = answer.get("fds")
    pid, name, stream = answer.get("qemu_pid"), answer.get("vm_name"), answer.get(
        "next_stream_id")
    run_dir = answer.get("run_dir")
    if (not isinstance(names, list) or names != [n for n in _FDS if n in names]
            or len(names) != len(fds) or not {"pidfd", "agent", "console", "output"} <= set(names)
            or not isinstance(pid, int) or pid <= 0 or not isinstance(stream, int)
            or stream < 1 or stream % 2 == 0 or not isinstance(name, str)
            or not _WARM_NAME.fullmatch(name) or not isinstance(run_dir, str)):
        raise PykataError("the VM cache sent an answer that is not a VM")
    paths = SandboxPaths(name, run_root())
    if Path(run_dir) != paths.run_dir or not paths.run_dir.is_dir() \
            or paths.run_dir.is_symlink():
        raise PykataError(f"the VM cache sent a VM whose directory {run_dir} is not "
                          f"{paths.run_dir}")
    by_name = dict(zip(names, fds, strict=True))
    return (Handover(pid=pid, pidfd=by_name["pidfd"], agent=by_name["agent"],
                     console=by_name["console"], output=by_name["output"],
                     token=by_name.get("token", -1)), paths, name, stream)


async def ask(config: Config, op: str) -> dict[str, Any]:
    """A status or shutdown request to the running cache."""
    path = endpoint(config)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with conn:
        try:
            conn.connect(str(path))
        except OSError as exc:
            raise PykataError(f"no VM cache is running at {path} ({exc.strerror})") from None
        wire.send(conn, {"op": op})
        answer, fds = await wire.recv(conn, timeout=10)
        wire.close_fds(fds)
        return answer
