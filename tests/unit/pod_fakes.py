"""A fake VM and a fake guest agent under the real pod core, for lifecycle
tests that need no VM: every transition of pod, container and process runs
through the real `Pod`, `Sandbox`, `Container` and `AgentClient`, over a
real ttRPC connection to an agent that simulates processes in memory.

Processes behave by their first argument: `echo WORDS` prints and exits 0
at start, `exit N` exits N at start, `cat` copies its stdin to its stdout
and exits at its end, `missing` cannot be executed (NOT_FOUND, as crun's
"executable file not found"); anything else runs until signalled (exit
128+N) or until a test ends it (`FakeAgent.end`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from google.protobuf import empty_pb2

from pykata.channels import AGENT_SERVICE, HEALTH_SERVICE
from pykata.config import Config, QemuConfig
from pykata.hypervisor.qemu import VmConfig
from pykata.protocols import agent_pb2, health_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.pod import Pod, PodEvent, PodPolicy
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from pykata.runtime.vm_source import BootedVm, VmWant
from pykata.runtime.volumes import Volume
from pykata.ttrpc import Code, RequestContext, Server, StatusError


@dataclass
class FakeProcess:
    args: list[str]
    pid: int
    started: bool = False
    exit: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop()
                                      .create_future())
    stdout: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    signals: list[int] = field(default_factory=list)
    stdin_closed: bool = False

    def end(self, code: int) -> None:
        if not self.exit.done():
            self.exit.set_result(code)
            self.stdout.put_nowait(b"")


class FakeAgent:
    """The guest's side: AgentService and Health over ttRPC, in memory."""

    def __init__(self) -> None:
        self.containers: dict[str, dict[str, FakeProcess]] = {}
        self.paused: set[str] = set()
        self.calls: list[str] = []
        self.oom: asyncio.Queue[str] = asyncio.Queue()
        self.sandbox_created = False
        self._next_pid = 100

    def process(self, cid: str, exec_id: str = "") -> FakeProcess:
        try:
            return self.containers[cid][exec_id or cid]
        except KeyError:
            raise StatusError(Code.NOT_FOUND, f"process {cid}/{exec_id} not found") from None

    def end(self, cid: str, exec_id: str = "", code: int = 0) -> None:
        self.process(cid, exec_id).end(code)

    def _new(self, args: Sequence[str]) -> FakeProcess:
        self._next_pid += 1
        return FakeProcess(list(args), self._next_pid)

    def _run(self, proc: FakeProcess) -> None:
        proc.started = True
        if proc.args[:1] == ["echo"]:
            proc.stdout.put_nowait(" ".join(proc.args[1:]).encode() + b"\n")
            proc.end(0)
        elif proc.args[:1] == ["exit"]:
            proc.end(int(proc.args[1]))

    def register(self, server: Server) -> None:
        server.register(HEALTH_SERVICE, "Check", health_pb2.CheckRequest, self.Check)
        for name, request in (
                ("CreateSandbox", agent_pb2.CreateSandboxRequest),
                ("DestroySandbox", agent_pb2.DestroySandboxRequest),
                ("CreateContainer", agent_pb2.CreateContainerRequest),
                ("StartContainer", agent_pb2.StartContainerRequest),
                ("RemoveContainer", agent_pb2.RemoveContainerRequest),
                ("ExecProcess", agent_pb2.ExecProcessRequest),
                ("SignalProcess", agent_pb2.SignalProcessRequest),
                ("WaitProcess", agent_pb2.WaitProcessRequest),
                ("ReadStdout", agent_pb2.ReadStreamRequest),
                ("ReadStderr", agent_pb2.ReadStreamRequest),
                ("WriteStdin", agent_pb2.WriteStreamRequest),
                ("CloseStdin", agent_pb2.CloseStdinRequest),
                ("TtyWinResize", agent_pb2.TtyWinResizeRequest),
                ("PauseContainer", agent_pb2.PauseContainerRequest),
                ("ResumeContainer", agent_pb2.ResumeContainerRequest),
                ("UpdateContainer", agent_pb2.UpdateContainerRequest),
                ("StatsContainer", agent_pb2.StatsContainerRequest),
                ("ListProcesses", agent_pb2.ListProcessesRequest),
                ("GetOOMEvent", agent_pb2.GetOOMEventRequest)):
            server.register(AGENT_SERVICE, name, request, self._logged(name))

    def _logged(self, name: str) -> Any:
        method = getattr(self, name)

        async def handler(req: Any, ctx: RequestContext) -> Any:
            self.calls.append(name)
            return await method(req)
        return handler

    async def Check(self, req: Any, ctx: RequestContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def CreateSandbox(self, req: Any) -> empty_pb2.Empty:
        self.sandbox_created = True
        return empty_pb2.Empty()

    async def DestroySandbox(self, req: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def CreateContainer(self, req: agent_pb2.CreateContainerRequest) -> empty_pb2.Empty:
        args = list(req.OCI.Process.Args)
        if args[:1] == ["missing"]:
            raise StatusError(Code.NOT_FOUND, "exec: \"missing\": executable file not found "
                                              "in $PATH")
        self.containers[req.container_id] = {req.container_id: self._new(args)}
        return empty_pb2.Empty()

    async def StartContainer(self, req: Any) -> empty_pb2.Empty:
        self._run(self.process(req.container_id))
        return empty_pb2.Empty()

    async def RemoveContainer(self, req: Any) -> empty_pb2.Empty:
        for proc in self.containers.pop(req.container_id, {}).values():
            proc.end(137)
        return empty_pb2.Empty()

    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest) -> empty_pb2.Empty:
        args = list(req.process.Args)
        if args[:1] == ["missing"]:
            raise StatusError(Code.NOT_FOUND, "executable file not found in $PATH")
        proc = self._new(args)
        self.containers[req.container_id][req.exec_id] = proc
        self._run(proc)
        return empty_pb2.Empty()

    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest) -> empty_pb2.Empty:
        procs = (list(self.containers.get(req.container_id, {}).values()) if not req.exec_id
                 else [self.process(req.container_id, req.exec_id)])
        for proc in procs:
            proc.signals.append(req.signal)
            if req.signal in (2, 9, 15):
                proc.end(128 + req.signal)
        return empty_pb2.Empty()

    async def WaitProcess(self, req: Any) -> agent_pb2.WaitProcessResponse:
        proc = self.process(req.container_id, req.exec_id)
        return agent_pb2.WaitProcessResponse(status=await asyncio.shield(proc.exit))

    async def ReadStdout(self, req: Any) -> agent_pb2.ReadStreamResponse:
        data = await self.process(req.container_id, req.exec_id).stdout.get()
        if not data:
            raise StatusError(Code.OUT_OF_RANGE, "EOF")
        return agent_pb2.ReadStreamResponse(data=data)

    async def ReadStderr(self, req: Any) -> agent_pb2.ReadStreamResponse:
        proc = self.process(req.container_id, req.exec_id)
        await asyncio.shield(proc.exit)
        raise StatusError(Code.OUT_OF_RANGE, "EOF")

    async def WriteStdin(self, req: agent_pb2.WriteStreamRequest) -> agent_pb2.WriteStreamResponse:
        proc = self.process(req.container_id, req.exec_id)
        if proc.args[:1] == ["cat"]:
            proc.stdout.put_nowait(req.data)
        return agent_pb2.WriteStreamResponse(len=len(req.data))

    async def CloseStdin(self, req: Any) -> empty_pb2.Empty:
        proc = self.process(req.container_id, req.exec_id)
        proc.stdin_closed = True
        if proc.args[:1] == ["cat"]:
            proc.end(0)
        return empty_pb2.Empty()

    async def TtyWinResize(self, req: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def PauseContainer(self, req: Any) -> empty_pb2.Empty:
        self.paused.add(req.container_id)
        return empty_pb2.Empty()

    async def ResumeContainer(self, req: Any) -> empty_pb2.Empty:
        self.paused.discard(req.container_id)
        return empty_pb2.Empty()

    async def UpdateContainer(self, req: Any) -> empty_pb2.Empty:
        return empty_pb2.Empty()

    async def StatsContainer(self, req: Any) -> agent_pb2.StatsContainerResponse:
        return agent_pb2.StatsContainerResponse()

    async def ListProcesses(self, req: Any) -> agent_pb2.ListProcessesResponse:
        pids = [p.pid for p in self.containers.get(req.container_id, {}).values()
                if not p.exit.done()]
        return agent_pb2.ListProcessesResponse(process_list=json.dumps(pids).encode())

    async def GetOOMEvent(self, req: Any) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self.oom.get())


class FakeVm:
    """A VM that is only its agent channel: `die` is QEMU's death."""

    def __init__(self, agent_socket: socket.socket, server_task: asyncio.Task[None]) -> None:
        self.agent_socket: socket.socket | None = agent_socket
        self.pid: int | None = os.getpid()
        self._exited = asyncio.Event()
        self._server_task = server_task
        self.stopped_by_host = False

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    async def start(self) -> None:
        raise AssertionError("a fake VM is started by its source")

    async def wait(self) -> int:
        await self._exited.wait()
        return 0

    def die(self) -> None:
        self._server_task.cancel()
        self._exited.set()

    async def stop(self, grace: float = 0) -> None:
        self.stopped_by_host = True
        await self.kill()

    async def kill(self) -> None:
        self.die()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server_task
        if self.agent_socket is not None:
            self.agent_socket.close()
            self.agent_socket = None

    def failure_report(self, lines: int = 15) -> str:
        return "the fake VM died"

    def moved_to(self, run_dir: Path) -> None:
        pass


class FakeSource:
    """A `VmSource` whose VMs are fake: each boot serves a fresh FakeAgent."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.agent = FakeAgent()
        self.vms: list[FakeVm] = []
        self.fail = fail

    async def take(self, want: VmWant) -> BootedVm | None:
        return None

    async def boot(self, config: VmConfig, name: str) -> BootedVm:
        if self.fail is not None:
            raise self.fail
        host, guest = socket.socketpair()
        server = Server()
        self.agent.register(server)
        reader, writer = await asyncio.open_connection(sock=guest)
        task = asyncio.ensure_future(server.serve_connection(reader, writer))
        vm = FakeVm(host, task)
        self.vms.append(vm)
        agent = await AgentClient.over_socket(host)
        return BootedVm(vm, agent, config, "cold", vm_name=config.name)  # type: ignore[arg-type]


class FakeContainerShare:
    def __init__(self, paths: SandboxPaths, container_id: str) -> None:
        self.paths = paths
        self.id = container_id
        self.created = False
        self.mounted: list[Any] = []
        self.volumes: list[Volume] = []

    @property
    def rootfs(self) -> Path:
        return self.paths.container_rootfs(self.id)

    def create(self) -> None:
        self.created = True

    def scratch(self) -> Path:
        return self.paths.run_dir / "scratch-" / self.id

    def mount_rootfs(self, mounts: Sequence[Any], *, readonly: bool) -> None:
        self.mounted.extend(mounts)

    def add_volume(self, volume: Volume) -> PurePosixPath:
        self.volumes.append(volume)
        return PurePosixPath("volumes", str(len(self.volumes) - 1))

    def remove(self) -> None:
        self.created = False
        self.mounted.clear()


class FakeShare:
    """A sandbox's share without mounts."""

    def __init__(self, paths: SandboxPaths) -> None:
        self.paths = paths
        self.shares: dict[str, FakeContainerShare] = {}
        self.full = False

    def prepare(self) -> None:
        self.paths.run_dir.mkdir(exist_ok=True)

    def container(self, container_id: str) -> FakeContainerShare:
        return self.shares.setdefault(container_id, FakeContainerShare(self.paths, container_id))

    def scratch_full(self) -> bool:
        return self.full


def fake_config(tmp_path: Path) -> Config:
    """A configuration whose guest assets are files that exist (no VM reads them)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.img"
    kernel.write_bytes(b"")
    initrd.write_bytes(b"")
    return Config(qemu=QemuConfig(kernel=str(kernel), initrd=str(initrd), accel="tcg",
                                  shared_fs="virtio-9p"))


def fake_pod(tmp_path: Path, *, ends_with_init: bool = False, source: FakeSource | None = None,
             name: str = "pod1") -> tuple[Pod, FakeSource, list[PodEvent]]:
    """A pod over the fake VM, its source, and the events it emitted."""
    source = source or FakeSource()
    events: list[PodEvent] = []
    config = fake_config(tmp_path)
    share = FakeShare(SandboxPaths.for_key(name))
    sandbox = Sandbox(name, config, SandboxOptions(), front_end="run", source=source,
                      share=share)  # type: ignore[arg-type]
    pod = Pod(sandbox, policy=PodPolicy(ends_with_init=ends_with_init), on_event=events.append)
    return pod, source, events


class CapturedIO:
    """A ProcessIO that keeps what the process printed."""

    def __init__(self, stdin: list[bytes] | None = None) -> None:
        self.out = bytearray()
        self.closed = False
        self._input = list(stdin) if stdin is not None else None

    async def _sink(self, data: bytes) -> None:
        self.out.extend(data)

    async def _source(self) -> bytes:
        assert self._input is not None
        return self._input.pop(0) if self._input else b""

    @property
    def stdout(self) -> Any:
        return self._sink

    @property
    def stderr(self) -> Any:
        return None

    @property
    def stdin(self) -> Any:
        return self._source if self._input is not None else None

    async def close(self) -> None:
        self.closed = True

    def close_stdin(self) -> None:
        pass


def spec(*args: str, terminal: bool = False) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "process": {"args": list(args), "cwd": "/",
                                               "terminal": terminal,
                                               "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"}}
