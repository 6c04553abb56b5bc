"""The agent's ttRPC services: grpc.AgentService and grpc.Health.

Each handler checks its request, delegates to `Containers`, and answers; a
bad request is answered with a status and never ends the agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata import __version__
from pykata.agent import boot_profile, loopback, spans
from pykata.agent.containers import Containers
from pykata.agent.reaper import Reaper
from pykata.agent.storage import mount_storage, unmount
from pykata.channels import AGENT_SERVICE, HEALTH_SERVICE
from pykata.protocols import agent_pb2, health_pb2
from pykata.ttrpc import Code, RequestContext, Server, StatusError
from pykata.ttrpc.server import Handler

log = logging.getLogger(__name__)

_OOM_POLL_SECONDS = 1.0
_EMPTY = empty_pb2.Empty()


class AgentService:
    def __init__(self, reaper: Reaper, containers: Containers) -> None:
        self._reaper = reaper
        self.containers = containers
        self._sandbox_mounts: list[Path] = []
        self._sandbox_id = ""
        self._creating = False
        self._oom_events: asyncio.Queue[str] = asyncio.Queue()
        self._oom_seen: dict[str, int] = {}
        self._oom_task: asyncio.Task[None] | None = None
        self.destroyed = asyncio.Event()

    # --- sandbox ----------------------------------------------------------

    async def CreateSandbox(
        self, req: agent_pb2.CreateSandboxRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        if self._sandbox_id or self._creating:
            raise StatusError(Code.ALREADY_EXISTS,
                              f"sandbox {self._sandbox_id or '(being created)'} already exists")
        # Set before the first await: a second CreateSandbox arriving while
        # the mounts are made must be refused, not run alongside.
        self._creating = True
        try:
            if req.hostname:
                Path("/proc/sys/kernel/hostname").write_text(req.hostname[:64])
            loopback.up()
            for storage in req.storages:
                self._sandbox_mounts.append(await mount_storage(self._reaper, storage))
        finally:
            self._creating = False
        self._sandbox_id = req.sandbox_id or "sandbox"
        if req.debug_console:
            self.containers.console.enable()
        self._oom_task = asyncio.ensure_future(self._watch_oom())
        log.info("sandbox %s ready", self._sandbox_id)
        return _EMPTY

    async def DestroySandbox(
        self, req: agent_pb2.DestroySandboxRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.remove_all()
        for mount in reversed(self._sandbox_mounts):
            await unmount(self._reaper, mount)
        self._sandbox_mounts.clear()
        if self._oom_task is not None:
            self._oom_task.cancel()
        os.sync()
        self.destroyed.set()
        return _EMPTY

    async def GetBootProfile(
        self, req: agent_pb2.BootProfileRequest, ctx: RequestContext
    ) -> agent_pb2.BootProfile:
        return agent_pb2.BootProfile(**boot_profile.marks())

    async def GetMetrics(
        self, req: agent_pb2.GetMetricsRequest, ctx: RequestContext
    ) -> agent_pb2.GuestMetrics:
        from pykata.agent import guest_metrics  # asked only by `pykata monitor`

        return guest_metrics.guest_metrics()

    async def ReseedRandomDev(
        self, req: agent_pb2.ReseedRandomDevRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        from pykata.agent import clone  # only clones of a template call it

        _clone_step("reseed the guest's RNG", clone.reseed, req.data)
        return _EMPTY

    async def SetGuestDateTime(
        self, req: agent_pb2.SetGuestDateTimeRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        from pykata.agent import clone

        _clone_step("set the guest's clock", clone.set_wall_clock, req.Sec, req.Usec)
        return _EMPTY

    async def GetGuestDetails(
        self, req: agent_pb2.GuestDetailsRequest, ctx: RequestContext
    ) -> agent_pb2.GuestDetailsResponse:
        details = agent_pb2.AgentDetails(
            version=__version__,
            init_daemon=os.getpid() == 1,
            storage_handlers=["9p", "virtio-fs", "local"],
            supports_seccomp=True,
            extra_features=[f"kernel={os.uname().release}"],
        )
        return agent_pb2.GuestDetailsResponse(agent_details=details)

    # --- network ----------------------------------------------------------

    async def UpdateInterface(
        self, req: agent_pb2.UpdateInterfaceRequest, ctx: RequestContext
    ) -> agent_pb2.Interface:
        from pykata.agent import network

        return await network.update_interface(self._reaper, req.interface)

    async def UpdateRoutes(
        self, req: agent_pb2.UpdateRoutesRequest, ctx: RequestContext
    ) -> agent_pb2.Routes:
        from pykata.agent import network

        return await network.update_routes(self._reaper, req.routes)

    async def AddARPNeighbors(
        self, req: agent_pb2.AddARPNeighborsRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        from pykata.agent import network

        await network.add_neighbors(self._reaper, req.neighbors)
        return empty_pb2.Empty()

    async def ListInterfaces(
        self, req: agent_pb2.ListInterfacesRequest, ctx: RequestContext
    ) -> agent_pb2.Interfaces:
        from pykata.agent import network

        return network.list_interfaces()

    async def ListRoutes(
        self, req: agent_pb2.ListRoutesRequest, ctx: RequestContext
    ) -> agent_pb2.Routes:
        from pykata.agent import network

        return await network.list_routes(self._reaper)

    # --- containers -------------------------------------------------------

    async def CreateContainer(
        self, req: agent_pb2.CreateContainerRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.create(req)
        return _EMPTY

    async def StartContainer(
        self, req: agent_pb2.StartContainerRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.start(req.container_id)
        return _EMPTY

    async def RemoveContainer(
        self, req: agent_pb2.RemoveContainerRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.remove(req.container_id)
        self._oom_seen.pop(req.container_id, None)
        return _EMPTY

    async def PauseContainer(
        self, req: agent_pb2.PauseContainerRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.pause(req.container_id)
        return _EMPTY

    async def ResumeContainer(
        self, req: agent_pb2.ResumeContainerRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.resume(req.container_id)
        return _EMPTY

    async def UpdateContainer(
        self, req: agent_pb2.UpdateContainerRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.update(req.container_id, req.resources)
        return _EMPTY

    async def StatsContainer(
        self, req: agent_pb2.StatsContainerRequest, ctx: RequestContext
    ) -> agent_pb2.StatsContainerResponse:
        from pykata.agent import stats  # only for a container: not at boot

        self.containers.get(req.container_id)
        return stats.container_stats(req.container_id)

    async def ListProcesses(
        self, req: agent_pb2.ListProcessesRequest, ctx: RequestContext
    ) -> agent_pb2.ListProcessesResponse:
        pids = await self.containers.pids(req.container_id)
        if req.format not in ("", "json"):
            raise StatusError(Code.INVALID_ARGUMENT, f"process list format {req.format!r} "
                                                     "is not supported (use json)")
        import json

        return agent_pb2.ListProcessesResponse(process_list=json.dumps(pids).encode())

    # --- processes --------------------------------------------------------

    async def ExecProcess(
        self, req: agent_pb2.ExecProcessRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.exec(req)
        return _EMPTY

    async def SignalProcess(
        self, req: agent_pb2.SignalProcessRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        if not 0 < req.signal < 65:
            raise StatusError(Code.INVALID_ARGUMENT, f"invalid signal {req.signal}")
        await self.containers.signal(req.container_id, req.exec_id, req.signal)
        return _EMPTY

    async def WaitProcess(
        self, req: agent_pb2.WaitProcessRequest, ctx: RequestContext
    ) -> agent_pb2.WaitProcessResponse:
        code = await self.containers.wait(req.container_id, req.exec_id)
        # A process the OOM killer ended is reported as OOM before its exit is.
        self._check_oom(req.container_id)
        return agent_pb2.WaitProcessResponse(status=code)

    async def WriteStdin(
        self, req: agent_pb2.WriteStreamRequest, ctx: RequestContext
    ) -> agent_pb2.WriteStreamResponse:
        proc = self.containers.process(req.container_id, req.exec_id)
        return agent_pb2.WriteStreamResponse(len=await proc.write_stdin(req.data))

    async def ReadStdout(
        self, req: agent_pb2.ReadStreamRequest, ctx: RequestContext
    ) -> agent_pb2.ReadStreamResponse:
        proc = self.containers.process(req.container_id, req.exec_id)
        return agent_pb2.ReadStreamResponse(data=await proc.read("stdout", req.len))

    async def ReadStderr(
        self, req: agent_pb2.ReadStreamRequest, ctx: RequestContext
    ) -> agent_pb2.ReadStreamResponse:
        proc = self.containers.process(req.container_id, req.exec_id)
        return agent_pb2.ReadStreamResponse(data=await proc.read("stderr", req.len))

    async def CloseStdin(
        self, req: agent_pb2.CloseStdinRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        self.containers.process(req.container_id, req.exec_id).close_stdin()
        return _EMPTY

    async def TtyWinResize(
        self, req: agent_pb2.TtyWinResizeRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        proc = self.containers.process(req.container_id, req.exec_id)
        proc.resize(req.row, req.column)
        return _EMPTY

    async def StartDebugConsole(
        self, req: agent_pb2.StartDebugConsoleRequest, ctx: RequestContext
    ) -> empty_pb2.Empty:
        await self.containers.console.start(req)
        return _EMPTY

    # --- tracing -------------------------------------------------

    async def GetTraceSpans(
        self, req: agent_pb2.GetTraceSpansRequest, ctx: RequestContext
    ) -> agent_pb2.TraceSpans:
        finished, dropped = spans.drain()
        return agent_pb2.TraceSpans(dropped=min(dropped, 2**32 - 1), spans=[
            agent_pb2.GuestSpan(
                trace_id=s.trace_id, span_id=s.span_id, parent_span_id=s.parent_id,
                name=s.name, start_unix_nano=s.start, end_unix_nano=s.end,
                attributes=[agent_pb2.SpanAttribute(key=k, value=v)
                            for k, v in s.attributes.items()])
            for s in finished])

    # --- out-of-memory events ----------------------------------------------

    async def GetOOMEvent(
        self, req: agent_pb2.GetOOMEventRequest, ctx: RequestContext
    ) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self._oom_events.get())

    async def _watch_oom(self) -> None:
        # memory.events changes are not signalled through any fd the agent
        # can wait on without inotify bindings; a once-a-second read per
        # container is cheap next to everything else in the guest.
        while True:
            await asyncio.sleep(_OOM_POLL_SECONDS)
            for container in self.containers.all():
                self._check_oom(container.id)

    def _check_oom(self, container_id: str) -> None:
        from pykata.agent import stats

        kills = stats.oom_kills(container_id)
        if kills > self._oom_seen.get(container_id, 0):
            self._oom_seen[container_id] = kills
            self._oom_events.put_nowait(container_id)


class HealthService:
    async def Check(
        self, req: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.HealthCheckResponse:
        boot_profile.mark("first_request")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, req: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(agent_version=__version__, grpc_version="ttrpc")


def _clone_step(what: str, step: Callable[..., None], *args: object) -> None:
    """Run one of `clone`'s steps; its refusals become the caller's statuses."""
    try:
        step(*args)
    except ValueError as exc:
        raise StatusError(Code.INVALID_ARGUMENT, str(exc)) from None
    except OSError as exc:
        raise StatusError(Code.INTERNAL, f"cannot {what}: {exc}") from None


_AGENT_REQUESTS = {
    "CreateSandbox": agent_pb2.CreateSandboxRequest,
    "DestroySandbox": agent_pb2.DestroySandboxRequest,
    "GetGuestDetails": agent_pb2.GuestDetailsRequest,
    "GetBootProfile": agent_pb2.BootProfileRequest,
    "ReseedRandomDev": agent_pb2.ReseedRandomDevRequest,
    "SetGuestDateTime": agent_pb2.SetGuestDateTimeRequest,
    "CreateContainer": agent_pb2.CreateContainerRequest,
    "StartContainer": agent_pb2.StartContainerRequest,
    "RemoveContainer": agent_pb2.RemoveContainerRequest,
    "PauseContainer": agent_pb2.PauseContainerRequest,
    "ResumeContainer": agent_pb2.ResumeContainerRequest,
    "UpdateContainer": agent_pb2.UpdateContainerRequest,
    "StatsContainer": agent_pb2.StatsContainerRequest,
    "ListProcesses": agent_pb2.ListProcessesRequest,
    "ExecProcess": agent_pb2.ExecProcessRequest,
    "SignalProcess": agent_pb2.SignalProcessRequest,
    "WaitProcess": agent_pb2.WaitProcessRequest,
    "WriteStdin": agent_pb2.WriteStreamRequest,
    "ReadStdout": agent_pb2.ReadStreamRequest,
    "ReadStderr": agent_pb2.ReadStreamRequest,
    "CloseStdin": agent_pb2.CloseStdinRequest,
    "TtyWinResize": agent_pb2.TtyWinResizeRequest,
    "GetOOMEvent": agent_pb2.GetOOMEventRequest,
    "UpdateInterface": agent_pb2.UpdateInterfaceRequest,
    "UpdateRoutes": agent_pb2.UpdateRoutesRequest,
    "AddARPNeighbors": agent_pb2.AddARPNeighborsRequest,
    "ListInterfaces": agent_pb2.ListInterfacesRequest,
    "ListRoutes": agent_pb2.ListRoutesRequest,
    "StartDebugConsole": agent_pb2.StartDebugConsoleRequest,
    # pykata monitor
    "GetMetrics": agent_pb2.GetMetricsRequest,
    "GetTraceSpans": agent_pb2.GetTraceSpansRequest,
}


def _traced(method: str, handler: Handler) -> Handler:
    """`handler`, recording a span when the host's request carries a traceparent."""
    async def run(req: Any, ctx: RequestContext) -> Message:
        with spans.request(ctx.metadata, f"guest {method}"):
            return await handler(req, ctx)
    return run


def build_server(agent: AgentService, health: HealthService) -> Server:
    server = Server()
    server.register_methods(AGENT_SERVICE, {
        method: (request_type, _traced(method, getattr(agent, method)))
        for method, request_type in _AGENT_REQUESTS.items()})
    health_requests = {"Check": health_pb2.CheckRequest, "Version": health_pb2.CheckRequest}
    server.register_object(HEALTH_SERVICE, health, health_requests)
    return server
