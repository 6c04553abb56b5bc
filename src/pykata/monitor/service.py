"""The monitor's control API (`pykata.monitor.v1.Monitor`) and the agent calls
it passes on for its clients.

Lifecycle calls go through the container's `Lifecycle`, so a wrong call gets
InvalidStateError ("container web is running: cannot start it"), answered
as FAILED_PRECONDITION. Stdio, waits and signals of exec'd processes go to
the agent unchanged, for this container only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata.channels import AGENT_SERVICE
from pykata.errors import AgentError, AlreadyExistsError, InvalidStateError, PykataError
from pykata.protocols import agent_pb2, monitor_pb2
from pykata.protocols.oci_spec import InvalidSpecError, resources_from_json
from pykata.runtime.container import Container
from pykata.runtime.lifecycle import Lifecycle, Status
from pykata.ttrpc import Code, RequestContext, Server, StatusError

log = logging.getLogger(__name__)

MONITOR_SERVICE = "pykata.monitor.v1.Monitor"
_EMPTY = empty_pb2.Empty()

# Every agent call a client of a monitor may make, with its request and reply
# types. CreateSandbox and DestroySandbox are the monitor's own.
AGENT_CALLS: dict[str, tuple[type[Message], type[Message]]] = {
    "GetGuestDetails": (agent_pb2.GuestDetailsRequest, agent_pb2.GuestDetailsResponse),
    "CreateContainer": (agent_pb2.CreateContainerRequest, empty_pb2.Empty),
    "StartContainer": (agent_pb2.StartContainerRequest, empty_pb2.Empty),
    "RemoveContainer": (agent_pb2.RemoveContainerRequest, empty_pb2.Empty),
    "PauseContainer": (agent_pb2.PauseContainerRequest, empty_pb2.Empty),
    "ResumeContainer": (agent_pb2.ResumeContainerRequest, empty_pb2.Empty),
    "UpdateContainer": (agent_pb2.UpdateContainerRequest, empty_pb2.Empty),
    "StatsContainer": (agent_pb2.StatsContainerRequest, agent_pb2.StatsContainerResponse),
    "ListProcesses": (agent_pb2.ListProcessesRequest, agent_pb2.ListProcessesResponse),
    "ExecProcess": (agent_pb2.ExecProcessRequest, empty_pb2.Empty),
    "SignalProcess": (agent_pb2.SignalProcessRequest, empty_pb2.Empty),
    "WaitProcess": (agent_pb2.WaitProcessRequest, agent_pb2.WaitProcessResponse),
    "WriteStdin": (agent_pb2.WriteStreamRequest, agent_pb2.WriteStreamResponse),
    "ReadStdout": (agent_pb2.ReadStreamRequest, agent_pb2.ReadStreamResponse),
    "ReadStderr": (agent_pb2.ReadStreamRequest, agent_pb2.ReadStreamResponse),
    "CloseStdin": (agent_pb2.CloseStdinRequest, empty_pb2.Empty),
    "TtyWinResize": (agent_pb2.TtyWinResizeRequest, empty_pb2.Empty),
    "GetOOMEvent": (agent_pb2.GetOOMEventRequest, agent_pb2.OOMEvent),
    "UpdateInterface": (agent_pb2.UpdateInterfaceRequest, agent_pb2.Interface),
    "UpdateRoutes": (agent_pb2.UpdateRoutesRequest, agent_pb2.Routes),
    "AddARPNeighbors": (agent_pb2.AddARPNeighborsRequest, empty_pb2.Empty),
    "ListInterfaces": (agent_pb2.ListInterfacesRequest, agent_pb2.Interfaces),
    "ListRoutes": (agent_pb2.ListRoutesRequest, agent_pb2.Routes),
}
# What an OCI container's monitor passes on: its container's stdio, waits,
# signals to exec'd processes, process lists and statistics; the lifecycle
# goes through the Monitor service.
FORWARDED = {name: AGENT_CALLS[name] for name in (
    "ReadStdout", "ReadStderr", "WriteStdin", "CloseStdin", "TtyWinResize", "WaitProcess",
    "SignalProcess", "ListProcesses", "StatsContainer")}


def status_error(exc: PykataError) -> StatusError:
    if isinstance(exc, InvalidStateError):
        return StatusError(Code.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, AlreadyExistsError):
        return StatusError(Code.ALREADY_EXISTS, str(exc))
    if isinstance(exc, AgentError) and exc.code is not None:
        return StatusError(Code(exc.code), str(exc))
    return StatusError(Code.UNKNOWN, str(exc))


class MonitorService:
    """Serves one container. `on_change` saves the state after every move;
    `on_start` runs after a start (the poststart hooks); `on_shutdown` asks
    the monitor to end."""

    def __init__(self, container: Container, lifecycle: Lifecycle,
                 on_change: Callable[[], None],
                 on_start: Callable[[], Awaitable[None]],
                 on_shutdown: Callable[[], None]) -> None:
        self.container = container
        self.lifecycle = lifecycle
        self.exit_status = -1
        self.exec_pids: dict[str, int] = {}
        self._on_change = on_change
        self._on_start = on_start
        self._on_shutdown = on_shutdown
        self._lock = asyncio.Lock()

    def register(self, server: Server) -> None:
        server.register_object(MONITOR_SERVICE, self, {
            "State": empty_pb2.Empty, "Start": empty_pb2.Empty,
            "Kill": monitor_pb2.KillRequest, "Exec": monitor_pb2.ExecRequest,
            "Pause": empty_pb2.Empty, "Resume": empty_pb2.Empty,
            "Update": monitor_pb2.UpdateRequest, "Shutdown": empty_pb2.Empty,
        })
        for method, (request_type, response_type) in FORWARDED.items():
            server.register(AGENT_SERVICE, method, request_type,
                            self._forwarder(method, response_type))

    def _forwarder(self, method: str, response_type: type[Message]
                   ) -> Callable[[Any, RequestContext], Awaitable[Message]]:
        async def forward(request: Any, ctx: RequestContext) -> Message:
            if request.container_id != self.container.id:
                raise StatusError(Code.NOT_FOUND,
                                  f"container {request.container_id!r} is not served here")
            return await self.container.agent.forward(
                method, request, response_type, ctx.time_remaining())
        return forward

    async def _guarded(self, call: Awaitable[None]) -> None:
        try:
            await call
        except PykataError as exc:
            raise status_error(exc) from exc

    # --- Monitor --------------------------------------------------------

    async def State(self, req: empty_pb2.Empty, ctx: RequestContext
                    ) -> monitor_pb2.StateResponse:
        return monitor_pb2.StateResponse(
            id=self.container.id, status=self.lifecycle.status.value, pid=os.getpid(),
            exit_status=self.exit_status, exec_pids=self.exec_pids)

    async def Start(self, req: empty_pb2.Empty, ctx: RequestContext) -> empty_pb2.Empty:
        async with self._lock:
            await self._guarded(self._start())
        await self._on_start()
        return _EMPTY

    async def _start(self) -> None:
        self.lifecycle.require("start")
        await self.container.start()
        self.lifecycle.move(Status.RUNNING)
        self._on_change()

    async def Kill(self, req: monitor_pb2.KillRequest, ctx: RequestContext) -> empty_pb2.Empty:
        if not 0 < req.signal < 65:
            raise StatusError(Code.INVALID_ARGUMENT, f"invalid signal {req.signal}")
        await self._guarded(self._kill(req.signal, req.all))
        return _EMPTY

    async def _kill(self, signum: int, all_processes: bool) -> None:
        self.lifecycle.require("kill")
        await self.container.kill(signum, all_processes=all_processes)

    async def Exec(self, req: monitor_pb2.ExecRequest, ctx: RequestContext) -> empty_pb2.Empty:
        try:
            process = json.loads(req.process)
        except ValueError as exc:
            raise StatusError(Code.INVALID_ARGUMENT, f"the process is not JSON: {exc}") from exc
        if not isinstance(process, dict):
            raise StatusError(Code.INVALID_ARGUMENT, "the process must be a JSON object")
        await self._guarded(self._exec(req.exec_id, process, req.relay_pid))
        return _EMPTY

    async def _exec(self, exec_id: str, process: dict[str, Any], relay_pid: int) -> None:
        self.lifecycle.require("exec")
        if exec_id in self.exec_pids:
            raise AlreadyExistsError(f"process {exec_id} already exists")
        await self.container.exec(exec_id, process)
        self.exec_pids[exec_id] = relay_pid
        self._on_change()

    async def Pause(self, req: empty_pb2.Empty, ctx: RequestContext) -> empty_pb2.Empty:
        async with self._lock:
            await self._guarded(self._pause(pause=True))
        return _EMPTY

    async def Resume(self, req: empty_pb2.Empty, ctx: RequestContext) -> empty_pb2.Empty:
        async with self._lock:
            await self._guarded(self._pause(pause=False))
        return _EMPTY

    async def _pause(self, *, pause: bool) -> None:
        agent, cid = self.container.agent, self.container.id
        if pause:
            self.lifecycle.require("pause")
            await agent.pause_container(cid)
            self.lifecycle.move(Status.PAUSED)
        else:
            self.lifecycle.require("resume")
            await agent.resume_container(cid)
            self.lifecycle.move(Status.RUNNING)
        self._on_change()

    async def Update(self, req: monitor_pb2.UpdateRequest, ctx: RequestContext
                     ) -> empty_pb2.Empty:
        try:
            data = json.loads(req.resources)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            resources = resources_from_json(data)
        except (ValueError, InvalidSpecError) as exc:
            raise StatusError(Code.INVALID_ARGUMENT, f"invalid resources: {exc}") from exc
        await self._guarded(self._update(resources))
        return _EMPTY

    async def _update(self, resources: Any) -> None:
        self.lifecycle.require("update")
        await self.container.agent.update_container(self.container.id, resources)

    async def Shutdown(self, req: empty_pb2.Empty, ctx: RequestContext) -> empty_pb2.Empty:
        self._on_shutdown()
        return _EMPTY
