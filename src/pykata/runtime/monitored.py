"""A sandbox whose VM a pod monitor holds (`pykata.monitor.pod`).

The shim uses this in place of an in-process Sandbox: the same paths and
share (the shim mounts its containers' rootfs and volumes in the share
itself), but the VM and the agent connection live in the monitor, and the
agent calls go through the monitor's control socket. So any other pykata
process reaches the pod's sandbox at `<sandbox dir>/monitor.sock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from google.protobuf import empty_pb2

from pykata import errors
from pykata.errors import HypervisorError, PykataError
from pykata.hypervisor.confine import dies_with_parent_hook
from pykata.hypervisor.qemu import check_qemu, failure_report
from pykata.monitor.service import MONITOR_SERVICE
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.sandbox import PhaseTimes, Sandbox, cleanup_host_state
from pykata.ttrpc import Client

monitor_log = logging.getLogger("pykata.monitor.pod")
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
# How long the monitor has to end its VM after Shutdown before it is killed.
_SHUTDOWN_SECONDS = 40.0


class MonitorProcess:
    """The monitor as the shim sees it: what the sandbox needs of a VM."""

    def __init__(self, proc: asyncio.subprocess.Process, qemu_pid: int, sandbox: Sandbox
                 ) -> None:
        self._proc = proc
        self._qemu_pid = qemu_pid
        self._paths = sandbox.paths
        self.agent_socket: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """QEMU's pid: what containerd is told is the task's pid."""
        return self._qemu_pid

    @property
    def monitor_pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.returncode is None

    async def start(self) -> None:
        raise HypervisorError("a monitored VM is started by its monitor")

    async def wait(self) -> int:
        return await self._proc.wait()

    async def stop(self, grace: float = _SHUTDOWN_SECONDS) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._proc.wait(), grace)
        await self.kill()

    async def kill(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    def failure_report(self, lines: int = 15) -> str:
        run_dir = self._paths.run_dir
        return failure_report(run_dir / "qemu.stderr", run_dir / "console.log", lines)


class CachedMonitor(MonitorProcess):
    """A monitor the VM cache handed over: not this process's child, so it
    is watched and signalled through its pidfd (it watches ours, and ends
    when this process does)."""

    def __init__(self, pidfd: int, monitor_pid: int, qemu_pid: int, sandbox: Sandbox) -> None:
        self._pidfd = pidfd
        self._monitor_pid = monitor_pid
        self._qemu_pid = qemu_pid
        self._paths = sandbox.paths
        self.agent_socket = None
        self._exited = asyncio.Event()

    @property
    def monitor_pid(self) -> int:
        return self._monitor_pid

    @property
    def running(self) -> bool:
        if self._exited.is_set():
            return False
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            self._exited.set()
        return not readable

    async def wait(self) -> int:
        if self.running:
            loop = asyncio.get_running_loop()
            loop.add_reader(self._pidfd, self._exited.set)
            try:
                await self._exited.wait()
            finally:
                loop.remove_reader(self._pidfd)
        return 0

    async def stop(self, grace: float = _SHUTDOWN_SECONDS) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wait(), grace)
        await self.kill()

    async def kill(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            await self.wait()


class MonitoredSandbox(Sandbox):
    async def start(self, *, create: bool = True) -> None:
        """Take a VM from the VM cache or start the pod monitor, and connect
        to its socket; nothing is left if it fails (the monitor undoes its
        own start before it reports)."""
        started = time.monotonic()
        if self.config.factory.vm_cache_number > 0 and await self._from_cache():
            self.times = PhaseTimes(vm_launch=time.monotonic() - started)
            return
        # A host without QEMU is refused before a process starts for it; the
        # monitor checks the rest (guest assets) once, where it boots.
        check_qemu(self.config.qemu.path)
        ready_r, ready_w = os.pipe()
        argv = [sys.executable, "-m", "pykata.monitor.pod", "--id", self.id,
                "--key", self.paths.key, "--ready", str(ready_w),
                "--options", json.dumps(dataclasses.asdict(self.options))]
        if self.config.source:
            argv += ["--config", self.config.source]
        if self.config.runtime.enable_debug:
            argv.append("--debug")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, pass_fds=(ready_w,),
                preexec_fn=dies_with_parent_hook(os.getpid()))
        finally:
            os.close(ready_w)
        assert proc.stderr is not None
        self._log_relay = asyncio.ensure_future(_relay_log(proc.stderr))
        try:
            answer = await _read_line(ready_r)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        message = _decode(answer)
        if not message.get("ok"):
            await proc.wait()
            # A monitor killed before its teardown leaves the host state.
            cleanup_host_state(self.paths)
            # The monitor's error keeps its kind: front ends map kinds to codes.
            kind = getattr(errors, str(message.get("kind", "")), HypervisorError)
            if not (isinstance(kind, type) and issubclass(kind, PykataError)):
                kind = HypervisorError
            raise kind(str(message.get("error", "the pod monitor failed")),
                       hint=str(message.get("hint") or "") or None)
        qemu_pid = message.get("qemu_pid")
        self.vm = MonitorProcess(proc, qemu_pid if isinstance(qemu_pid, int) else 0, self)
        await self._connect_monitor()
        self.times = PhaseTimes(vm_launch=time.monotonic() - started)

    async def _connect_monitor(self) -> None:
        self._owns_state = True
        self.monitor_socket = str(self.paths.run_dir / "monitor.sock")
        client = await Client.connect_unix(self.monitor_socket)
        self.agent = AgentClient(client)
        self._monitor_client = client

    async def _from_cache(self) -> bool:
        """Take a warm VM from the VM cache; False (with a log line saying
        why) when it has none for this pod, which then boots its own."""
        from pykata.factory import cache

        if self.options.netns:
            monitor_log.info("pod %s boots its own VM: cached VMs have no network "
                             "interfaces", self.id)
            return False
        try:
            shape = cache.vm_shape(self.vm_config())
            handed = await cache.request_vm(self.config, self.id, self.paths.key,
                                            self.options, shape)
        except PykataError as exc:
            monitor_log.warning("pod %s boots its own VM: %s", self.id, exc)
            return False
        self.vm = CachedMonitor(handed.monitor_pidfd, handed.monitor_pid, handed.qemu_pid, self)
        self.boot = handed.boot
        self.from_cache = True
        try:
            await self._connect_monitor()
        except BaseException:
            await self.vm.kill()
            cleanup_host_state(self.paths)
            raise
        return True

    async def stop(self) -> None:
        """Ask the monitor to end the sandbox (it destroys it in the guest,
        stops the VM and removes the host state), then make sure."""
        if self._stopped:
            return
        if isinstance(self.vm, MonitorProcess) and self.vm.running:
            with contextlib.suppress(PykataError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._monitor_client.call(
                    MONITOR_SERVICE, "Shutdown", empty_pb2.Empty(), empty_pb2.Empty), 10)
        await self._teardown()


    async def kill(self) -> None:
        """End at once: the monitor, and with it the VM."""
        if isinstance(self.vm, MonitorProcess):
            await self.vm.kill()
        await self._teardown()


async def _relay_log(stream: asyncio.StreamReader) -> None:
    """The monitor's log lines ("LEVEL logger: message") into this process's
    log, so they reach containerd's log with the shim's own."""
    while True:
        try:
            line = await stream.readline()
        except (ValueError, asyncio.LimitOverrunError):
            continue
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip()
        level, _, rest = text.partition(" ")
        monitor_log.log(logging.getLevelName(level) if level in _LEVELS else logging.INFO,
                        "%s", rest[:4096] if level in _LEVELS else text[:4096])


async def _read_line(fd: int) -> bytes:
    """One line from the monitor's report pipe, read on the event loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        return await reader.readline()
    finally:
        transport.close()


def _decode(answer: bytes) -> dict[str, object]:
    if not answer:
        return {"error": "the pod monitor died while booting the sandbox"}
    try:
        message = json.loads(answer)
    except ValueError:
        return {"error": f"the pod monitor sent {answer[:200]!r}"}
    return message if isinstance(message, dict) else {"error": "the pod monitor sent garbage"}
