"""The VM cache: pod monitors kept warm with a booted (or template-restored)
VM, handed to shims as they start pods ([factory] vm_cache_number).

    pykata factory init          serves <endpoint> (vm_cache_endpoint), 0600
      └─ N warm pod monitors     `python -m pykata.monitor.pod --warm`, each
           └─ QEMU               holding a VM with no pod, as sandbox warm-<hex>

A shim asks for a VM of its pod's shape (`request_vm`). The cache takes a
warm monitor of that shape and configuration, sends it the pod (id, key,
options) with a pidfd of the shim, and relays its answer with a pidfd of the
monitor. The monitor renames its sandbox directory to the pod's key, gives
the guest its CreateSandbox, serves `monitor.sock` there, and from then on
is that pod's monitor: it ends when the shim does. The cache starts a
replacement at once.

A warm monitor ends, and takes its VM and its directory with it, when the
cache's socket to it closes: a cache that is stopped or killed leaves no
VM behind (its endpoint file stays until the next start or `pykata
cleanup`). A shim that finds no cache, or no VM of its shape, starts its
own monitor, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.config import Config
from pykata.errors import PykataError
from pykata.factory import template as templates
from pykata.factory import wire
from pykata.hypervisor.qemu import VmConfig
from pykata.runtime.paths import check_id, private_dir, run_root

log = logging.getLogger(__name__)

_ADOPT_SECONDS = 60.0
_REQUEST_SECONDS = 90.0
# After a warm monitor fails to boot, how long before the next try.
_RETRY_SECONDS = 5.0


def endpoint(config: Config) -> Path:
    return Path(config.factory.vm_cache_endpoint or run_root() / "factory" / "cache.sock")


def vm_shape(vm: VmConfig) -> str:
    """What a warm VM must match: the same key a template of it has."""
    return templates.template_key(templates.identity(vm))


def config_digest(config: Config) -> str:
    """A digest of the settings a pod's sandbox is made with (its file's name
    aside): a warm VM serves only pods of an equal configuration."""
    data = config.to_dict()
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Adoption:
    id: str
    key: str
    options: Any  # SandboxOptions
    shim_pidfd: int


def parse_adoption(message: dict[str, Any], fds: list[int]) -> Adoption:
    """The cache's "adopt" message to a warm monitor, checked."""
    from pykata.runtime.sandbox import SandboxOptions

    if message.get("op") != "adopt" or len(fds) != 1:
        raise PykataError("the VM cache sent a message that is not an adoption")
    sid, key, raw = message.get("id"), message.get("key"), message.get("options")
    if not isinstance(sid, str) or not isinstance(key, str) or not isinstance(raw, dict):
        raise PykataError("the VM cache sent an adoption without id, key or options")
    return Adoption(check_id("sandbox id", sid), check_id("sandbox key", key),
                    _options(raw, SandboxOptions), fds[0])


def _options(raw: dict[str, Any], cls: Any) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in known:
            raise PykataError(f"unknown sandbox option {name!r}")
        expected = {"int | None": (int, type(None)), "str": (str,)}.get(str(known[name].type))
        if expected is None or isinstance(value, bool) or not isinstance(value, expected):
            raise PykataError(f"sandbox option {name} has the wrong type")
        values[name] = value
    return cls(**values)


@dataclass
class _Warm:
    proc: asyncio.subprocess.Process
    control: socket.socket
    shape: str = ""
    config: str = ""
    qemu_pid: int = 0
    boot: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class VmCache:
    """The cache server: keeps `count` warm monitors, hands them out."""

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self.endpoint = endpoint(config)
        self._warm: list[_Warm] = []
        self._handed_out = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self) -> None:
        """Serve until SIGTERM, SIGINT or a "shutdown" request."""
        listener = self._listen()
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
            with contextlib.suppress(OSError):
                self.endpoint.unlink()
            await self._end_all()

    def _listen(self) -> socket.socket:
        private_dir(self.endpoint.parent)
        if _served(self.endpoint):
            raise PykataError(f"a VM cache already serves {self.endpoint}")
        self.endpoint.unlink(missing_ok=True)  # a killed cache's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(self.endpoint))
        os.chmod(self.endpoint, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        log.info("VM cache: keeping %d VMs, serving %s", self.count, self.endpoint)
        return listener

    def _spawn(self, n: int) -> None:
        for _ in range(n):
            self._background(self._keep_one())

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_one(self) -> None:
        """Start one warm monitor and wait for it to be ready; a failed boot
        is retried after a pause."""
        while not self._stopping.is_set():
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            argv = [sys.executable, "-m", "pykata.monitor.pod", "--warm",
                    "--control", str(theirs.fileno())]
            if self.config.source:
                argv += ["--config", self.config.source]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),), start_new_session=True)
            finally:
                theirs.close()
            warm = _Warm(proc, ours)
            try:
                message, fds = await wire.recv(ours)
                wire.close_fds(fds)
            except (EOFError, wire.WireError, OSError) as exc:
                message = {"error": f"the warm pod monitor died while booting ({exc})"}
            if message.get("ready"):
                warm.shape = str(message.get("shape", ""))
                warm.config = str(message.get("config", ""))
                warm.qemu_pid = int(message.get("qemu_pid") or 0)
                warm.boot = str(message.get("boot", ""))
                self._warm.append(warm)
                self._background(self._watch(warm))
                return
            ours.close()
            await proc.wait()
            log.error("VM cache: a warm VM failed to start: %s", message.get("error"))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _RETRY_SECONDS)

    async def _watch(self, warm: _Warm) -> None:
        """Reap the monitor; one that dies before a pod took it is replaced."""
        await warm.proc.wait()
        if warm in self._warm:
            self._warm.remove(warm)
            warm.control.close()
            if not self._stopping.is_set():
                log.warning("VM cache: a warm VM ended on its own: starting another")
                self._spawn(1)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
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
        return {"target": self.count, "ready": len(self._warm),
                "handed_out": self._handed_out, "shapes": sorted({w.shape for w in self._warm})}

    async def _hand_out(self, conn: socket.socket, shim_pid: int,
                        message: dict[str, Any]) -> None:
        shape, digest = message.get("shape"), message.get("config")
        warm = next((w for w in self._warm if w.shape == shape and w.config == digest), None)
        if warm is None:
            reason = ("the VM cache is empty" if not self._warm else
                      "the VM cache has no VM of this shape and configuration")
            wire.send(conn, {"error": reason})
            return
        self._warm.remove(warm)
        self._spawn(1)
        shim_pidfd = os.pidfd_open(shim_pid)
        try:
            wire.send(warm.control, {"op": "adopt", "id": message.get("id"),
                                     "key": message.get("key"),
                                     "options": message.get("options")}, [shim_pidfd])
        finally:
            os.close(shim_pidfd)
        try:
            answer, fds = await wire.recv(warm.control, timeout=_ADOPT_SECONDS)
            wire.close_fds(fds)
        except (TimeoutError, EOFError, wire.WireError, OSError) as exc:
            answer = {"error": f"the cached VM's monitor did not take the pod ({exc})"}
        warm.control.close()
        if not answer.get("ok"):
            wire.send(conn, answer)
            return
        self._handed_out += 1
        monitor_pidfd = os.pidfd_open(warm.proc.pid)
        try:
            wire.send(conn, {**answer, "monitor_pid": warm.proc.pid, "boot": warm.boot},
                      [monitor_pidfd])
        finally:
            os.close(monitor_pidfd)

    async def _end_all(self) -> None:
        """Close every warm monitor's socket (each ends its VM) and wait."""
        warm, self._warm = self._warm, []
        for w in warm:
            w.control.close()
        for task in list(self._tasks):
            task.cancel()
        for w in warm:
            try:
                await asyncio.wait_for(w.proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()


@dataclass
class HandedVm:
    """A VM the cache handed to this process: its monitor's pid and pidfd."""

    monitor_pid: int
    monitor_pidfd: int
    qemu_pid: int
    boot: str


async def request_vm(config: Config, sandbox_id: str, key: str, options: Any,
                     shape: str) -> HandedVm:
    """Ask the VM cache for a VM of `shape` for this pod; PykataError saying
    why when it cannot give one (no cache, empty, another shape)."""
    path = endpoint(config)
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
        wire.send(conn, {"op": "vm", "id": sandbox_id, "key": key, "shape": shape,
                         "config": config_digest(config),
                         "options": dataclasses.asdict(options)})
        try:
            answer, fds = await wire.recv(conn, timeout=_REQUEST_SECONDS)
        except (TimeoutError, EOFError, wire.WireError, OSError) as exc:
            raise PykataError(f"the VM cache did not answer ({exc})") from None
        if not answer.get("ok") or len(fds) != 1:
            wire.close_fds(fds)
            raise PykataError(str(answer.get("error", "the VM cache sent no VM")))
        pid, qemu_pid = answer.get("monitor_pid"), answer.get("qemu_pid")
        if not isinstance(pid, int) or not isinstance(qemu_pid, int):
            wire.close_fds(fds)
            raise PykataError("the VM cache's answer has no pids")
        return HandedVm(pid, fds[0], qemu_pid, str(answer.get("boot", "")))


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


def remove_stale_endpoint(config: Config) -> bool:
    """Remove the endpoint of a cache that was killed (nobody listens)."""
    path = endpoint(config)
    if not path.exists() or _served(path):
        return False
    path.unlink(missing_ok=True)
    return True


def _served(path: Path) -> bool:
    """Whether a cache listens on `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
