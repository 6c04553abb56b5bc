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
own monitor, with a log line. A shim that is gone (or cannot be watched)
by the time its request is served gets no VM, and the VM stays in the
pool; a VM that left the pool and was not taken is ended.

The endpoint may be anywhere the operator chooses, /run included: pykata
refuses one in a directory another user could change, never changes a
directory's mode, and removes only the socket a cache recorded as its own
(`EndpointClaim`) once that cache is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.config import Config
from pykata.errors import PykataError
from pykata.factory import template as templates
from pykata.factory import wire
from pykata.hypervisor.qemu import VmConfig
from pykata.runtime.paths import check_id, others_can_replace, private_dir, run_root

log = logging.getLogger(__name__)

_ADOPT_SECONDS = 60.0
_REQUEST_SECONDS = 90.0
# After a warm monitor fails to boot, how long before the next try.
_RETRY_SECONDS = 5.0
# How long a warm monitor that took no pod has to end before it is killed.
_RETIRE_SECONDS = 30.0
# getsockopt: a pidfd of a unix socket's peer (Linux 6.5; not in Python 3.11).
_SO_PEERPIDFD = 77


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


@dataclass(eq=False)  # one per process: compared, and kept in sets, as itself
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
        # Warm monitors out of the pool that serve no pod, on their way out.
        self._retiring: set[_Warm] = set()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def serve(self) -> None:
        """Serve until SIGTERM, SIGINT or a "shutdown" request."""
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
        # Before the VM leaves the pool: an adopted VM lives as long as its
        # shim, so a shim that cannot be watched must not get one.
        try:
            shim_pidfd = requester_pidfd(conn, shim_pid)
        except PykataError as exc:
            log.warning("VM cache: no VM for a request: %s", exc)
            with contextlib.suppress(OSError):
                wire.send(conn, {"error": str(exc)})
            return
        self._warm.remove(warm)
        self._spawn(1)
        try:
            answer = await self._adopt(warm, message, shim_pidfd)
        finally:
            os.close(shim_pidfd)
        if answer.get("ok"):
            self._handed_out += 1
            answer = {**answer, "monitor_pid": warm.proc.pid, "boot": warm.boot}
        with contextlib.suppress(OSError):
            self._answer(conn, answer, warm)

    async def _adopt(self, warm: _Warm, message: dict[str, Any],
                     shim_pidfd: int) -> dict[str, Any]:
        """Give `warm` the pod; its answer. On any failure the warm monitor
        is ended: once it was sent the pod, its VM is no one's to reuse."""
        try:
            wire.send(warm.control, {"op": "adopt", "id": message.get("id"),
                                     "key": message.get("key"),
                                     "options": message.get("options")}, [shim_pidfd])
            answer, fds = await wire.recv(warm.control, timeout=_ADOPT_SECONDS)
            wire.close_fds(fds)
        except (TimeoutError, EOFError, wire.WireError, OSError) as exc:
            answer = {"error": f"the cached VM's monitor did not take the pod ({exc})"}
        except BaseException:
            self._retire(warm)
            raise
        if not answer.get("ok"):
            self._retire(warm)
            return answer
        warm.control.close()
        return answer

    def _answer(self, conn: socket.socket, answer: dict[str, Any], warm: _Warm) -> None:
        if not answer.get("ok"):
            wire.send(conn, answer)
            return
        monitor_pidfd = os.pidfd_open(warm.proc.pid)
        try:
            wire.send(conn, answer, [monitor_pidfd])
        finally:
            os.close(monitor_pidfd)

    def _retire(self, warm: _Warm) -> None:
        """End a warm monitor that left the pool but serves no pod: closing
        its socket ends it (and its VM, and its directory); one that does
        not end within the grace is killed."""
        warm.control.close()
        self._retiring.add(warm)
        self._background(self._reap(warm))

    async def _reap(self, warm: _Warm) -> None:
        # Cancelled (the cache is stopping), it stays retiring: _end_all ends it.
        try:
            await asyncio.wait_for(asyncio.shield(warm.proc.wait()), _RETIRE_SECONDS)
        except TimeoutError:
            log.warning("VM cache: a warm VM's monitor did not end: killing it")
            with contextlib.suppress(ProcessLookupError):
                warm.proc.kill()
            await warm.proc.wait()
        self._retiring.discard(warm)

    async def _end_all(self) -> None:
        """Close every warm monitor's socket (each ends its VM) and wait."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # A hand-out cut short retires its monitor: wait for that as well.
        await asyncio.gather(*tasks, return_exceptions=True)
        ending, self._warm = [*self._warm, *self._retiring], []
        for w in ending:
            w.control.close()
        for w in ending:
            try:
                await asyncio.wait_for(w.proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()


def requester_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd of the process that sent the request on `conn` (the shim the
    adopted VM lives as long as); PykataError when it is gone or cannot be
    named from here."""
    try:
        pidfd: int = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise PykataError(f"the requesting process is gone ({exc.strerror})") from None
        # A kernel before 6.5: by the pid it had when it connected.
        pidfd = _pidfd_by_pid(pid)
    if _exited(pidfd):
        os.close(pidfd)
        raise PykataError("the requesting process is gone")
    return pidfd


def _pidfd_by_pid(pid: int) -> int:
    if pid <= 0:
        raise PykataError("the requesting process is in a PID namespace the VM cache "
                          "cannot see into")
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise PykataError("the requesting process is gone") from None
    except OSError as exc:
        raise PykataError(f"the requesting process {pid} cannot be watched "
                          f"({exc.strerror})") from None


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


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
    """Remove the endpoint of a cache that was killed: only a socket a cache
    recorded as the one it bound, when no cache holds that record any more.
    PykataError when the endpoint's directory lets another user swap it."""
    path = endpoint(config)
    claim = EndpointClaim.take(path, create=False)
    if claim is None:
        return False  # no record, or a cache serves it
    try:
        if not os.path.lexists(path):
            return False  # only the record is left, which goes
        problem = others_can_replace(path.parent)
        if problem:
            raise PykataError(f"{path} is not removed: another user could have swapped it "
                              f"({problem})", hint=f"check what {path} is and remove it yourself")
        return claim.remove_own_socket()
    finally:
        claim.release()


def claim_endpoint(path: Path) -> EndpointClaim:
    """The claim a cache serving `path` holds, once nothing stands in its way:
    PykataError when another user could swap the endpoint, a cache serves it,
    or something that is not a socket a dead cache left is there."""
    _check_endpoint_directory(path)
    claim = EndpointClaim.take(path, create=True)
    if claim is None:
        raise PykataError(f"a VM cache already serves {path}",
                          hint="stop it with `pykata factory destroy`, or set another "
                               "[factory] vm_cache_endpoint")
    try:
        if os.path.lexists(path) and not claim.remove_own_socket():
            raise PykataError(
                f"{path} exists and is not a socket a VM cache of pykata left behind: "
                "pykata does not remove it",
                hint="remove it yourself if nothing uses it, or set another [factory] "
                     "vm_cache_endpoint")
    except BaseException:
        claim.release()
        raise
    return claim


def _check_endpoint_directory(path: Path) -> None:
    """The endpoint's directory exists (made private when it did not) and
    only this user or root can change what is in it."""
    if not os.path.lexists(path.parent):
        private_dir(path.parent)
    problem = others_can_replace(path.parent)
    if problem:
        raise PykataError(
            f"the VM cache's endpoint {path} is in a directory another user could change "
            f"({problem}): its socket could be swapped",
            hint="set [factory] vm_cache_endpoint to a path in a directory only root can "
                 "write, such as the default <run root>/factory/cache.sock")


def _record_path(path: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:24]
    return run_root() / "factory" / f"endpoint-{digest}.json"


class EndpointClaim:
    """A cache's claim on its endpoint: a record, in pykata's private run
    root, of the socket it bound there, locked (flock) for as long as the
    cache lives. The lock ends with the process, however it dies: a record
    nobody holds names a socket whose cache is gone. The socket is named by
    device, inode and modification time: a file made later in its place
    may reuse the inode number, not the time it was made."""

    def __init__(self, path: Path, record: Path, fd: int) -> None:
        self.path = path
        self._record = record
        self._fd = fd
        self._bound: tuple[int, int, int] | None = None

    @classmethod
    def take(cls, path: Path, *, create: bool) -> EndpointClaim | None:
        """The claim, locked; None while a live cache holds it (or, unless
        `create`, when there is no record)."""
        record = _record_path(path)
        for _ in range(10):
            fd = _open_record(record, create)
            if fd < 0:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # The one a releasing cache removed while we waited is not the record.
            with contextlib.suppress(FileNotFoundError):
                if _same_file(os.stat(record), os.fstat(fd)):
                    return cls(path, record, fd)
            os.close(fd)
        raise PykataError(f"cannot take {record}: it is replaced over and over",
                          hint="stop whatever else starts VM caches on this endpoint")

    def listen(self) -> socket.socket:
        """Bind the endpoint (0600) and record its socket as this cache's."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            self._bound = _identity(os.lstat(self.path))
            dev, ino, mtime = self._bound
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({"endpoint": str(self.path), "dev": dev, "ino": ino,
                                            "mtime_ns": mtime}).encode(), 0)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return listener

    def remove_own_socket(self) -> bool:
        """Unlink the endpoint if it is the socket this claim's record names."""
        bound = self._bound or self._recorded()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if bound is None or not stat.S_ISSOCK(st.st_mode) or _identity(st) != bound:
            return False
        os.unlink(self.path)
        return True

    def _recorded(self) -> tuple[int, int, int] | None:
        try:
            data = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("endpoint") != str(self.path):
            return None
        found = (data.get("dev"), data.get("ino"), data.get("mtime_ns"))
        if not all(isinstance(n, int) for n in found):
            return None
        return found  # type: ignore[return-value]

    def release(self) -> None:
        """Remove this cache's socket (if it is still there) and the record."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.remove_own_socket()
        with contextlib.suppress(OSError):
            self._record.unlink()
        with contextlib.suppress(OSError):
            self._record.parent.rmdir()  # when nothing else of pykata is there
        os.close(self._fd)
        self._fd = -1


def _open_record(record: Path, create: bool) -> int:
    """The record's descriptor; -1 when there is none and `create` is false."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(10):
        try:
            if create:
                private_dir(record.parent)  # again: a releasing cache may remove it
            return os.open(record, flags, 0o600)
        except FileNotFoundError:
            if not create:
                return -1
    raise PykataError(f"cannot create {record}: its directory is removed over and over")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns
