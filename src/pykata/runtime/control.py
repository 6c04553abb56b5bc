"""The pod's control socket: the one API through which any pykata process
reaches a pod, whichever front end owns it.

The owner serves `pykata.pod.v1.Pod` (lifecycle calls, each through the
`Pod`, so the same rules answer) and passes the agent calls a client needs
to relay a process's stdio (reads, writes, waits, signals, resizes, process
lists, statistics) to the agent, for this pod's containers only. The socket
is 0600 in the sandbox's 0700 directory: only root reaches it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata.channels import AGENT_SERVICE, CONTROL_SERVICE, DEBUG_CONSOLE_ID
from pykata.errors import PykataError
from pykata.protocols import agent_pb2, pod_pb2
from pykata.runtime.debug_console import ConsoleSessions
from pykata.runtime.error_codes import to_status
from pykata.runtime.pod import Pod, parse_json_object
from pykata.runtime.pod_metrics import pod_metrics
from pykata.runtime.process import PodProcess
from pykata.ttrpc import Code, RequestContext, Server, StatusError

CONTROL_SOCKET = "control.sock"
_EMPTY = empty_pb2.Empty()

# The agent calls a client of the control socket may make, with their
# request and reply types: what relaying an exec'd process's stdio needs,
# and the container's own process list and statistics.
FORWARDED_AGENT_CALLS: dict[str, tuple[type[Message], type[Message]]] = {
    "ReadStdout": (agent_pb2.ReadStreamRequest, agent_pb2.ReadStreamResponse),
    "ReadStderr": (agent_pb2.ReadStreamRequest, agent_pb2.ReadStreamResponse),
    "WriteStdin": (agent_pb2.WriteStreamRequest, agent_pb2.WriteStreamResponse),
    "CloseStdin": (agent_pb2.CloseStdinRequest, empty_pb2.Empty),
    "TtyWinResize": (agent_pb2.TtyWinResizeRequest, empty_pb2.Empty),
    "WaitProcess": (agent_pb2.WaitProcessRequest, agent_pb2.WaitProcessResponse),
    "SignalProcess": (agent_pb2.SignalProcessRequest, empty_pb2.Empty),
    "ListProcesses": (agent_pb2.ListProcessesRequest, agent_pb2.ListProcessesResponse),
    "StatsContainer": (agent_pb2.StatsContainerRequest, agent_pb2.StatsContainerResponse),
}

_REQUESTS: dict[str, type[Message]] = {
    "State": empty_pb2.Empty, "Start": pod_pb2.ProcessRef, "Kill": pod_pb2.KillRequest,
    "Exec": pod_pb2.ExecRequest, "Pause": pod_pb2.ContainerRef,
    "Resume": pod_pb2.ContainerRef, "Update": pod_pb2.UpdateRequest,
    "Shutdown": empty_pb2.Empty,
    # the pod's event log (`pykata events`)
    "Events": pod_pb2.EventsRequest,
}
# The longest an Events call waits for a new entry (a follower asks again).
MAX_EVENTS_WAIT = 30.0


def control_socket(run_dir: Path) -> Path:
    return run_dir / CONTROL_SOCKET


@dataclass(frozen=True)
class ControlHooks:
    """What an owner adds to the control calls: `on_start` runs after a
    process started (the OCI poststart hooks), `on_shutdown` replaces the
    pod's own shutdown."""

    on_start: Callable[[str, str], Awaitable[None]] | None = None
    on_shutdown: Callable[[], Awaitable[None]] | None = None


NO_HOOKS = ControlHooks()


class PodControl:
    """`pykata.pod.v1.Pod` over one `Pod`."""

    def __init__(self, pod: Pod, hooks: ControlHooks = NO_HOOKS) -> None:
        self.pod = pod
        self.hooks = hooks
        self.console = ConsoleSessions(pod.id, pod.sandbox.debug_console_enabled,
                                       pod.sandbox.config.source)

    def register(self, server: Server) -> None:
        for method, request_type in _REQUESTS.items():
            server.register(CONTROL_SERVICE, method, request_type,
                            self._translated(getattr(self, method)))
        for method, (request_type, response_type) in FORWARDED_AGENT_CALLS.items():
            server.register(AGENT_SERVICE, method, request_type,
                            self._forwarder(method, response_type))
        server.register(CONTROL_SERVICE, "DebugConsole", pod_pb2.DebugConsoleRequest,
                        self.DebugConsole)
        # `pykata monitor`: it needs the caller's deadline.
        server.register(CONTROL_SERVICE, "Metrics", pod_pb2.MetricsRequest, self.Metrics)

    @staticmethod
    def _translated(call: Callable[[Any], Awaitable[Message]]
                    ) -> Callable[[Any, RequestContext], Awaitable[Message]]:
        async def handler(request: Any, ctx: RequestContext) -> Message:
            try:
                return await call(request)
            except PykataError as exc:
                raise to_status(exc) from exc
        return handler

    def _forwarder(self, method: str, response_type: type[Message]
                   ) -> Callable[[Any, RequestContext], Awaitable[Message]]:
        async def forward(request: Any, ctx: RequestContext) -> Message:
            if request.container_id == DEBUG_CONSOLE_ID:
                # Only the processes of the console sessions this owner
                # started, and only while the console is enabled.
                await self.console.allows(getattr(request, "exec_id", ""),
                                          ctx.time_remaining())
            elif request.container_id not in self.pod.containers:
                raise StatusError(Code.NOT_FOUND,
                                  f"container {request.container_id!r} is not in this pod")
            agent = self.pod.sandbox.agent
            if agent is None or self.pod.lifecycle.stopped:
                raise StatusError(Code.UNAVAILABLE, f"pod {self.pod.id} has stopped")
            return await agent.forward(method, request, response_type, ctx.time_remaining())
        return forward

    # --- pykata.pod.v1.Pod ------------------------------------------------

    async def State(self, req: empty_pb2.Empty) -> pod_pb2.PodState:
        return pod_state(self.pod)

    async def Start(self, req: pod_pb2.ProcessRef) -> empty_pb2.Empty:
        await self.pod.start_process(req.container_id, req.exec_id)
        if self.hooks.on_start is not None:
            await self.hooks.on_start(req.container_id, req.exec_id)
        return _EMPTY

    async def Kill(self, req: pod_pb2.KillRequest) -> empty_pb2.Empty:
        await self.pod.kill(req.container_id, req.exec_id, req.signal, all_processes=req.all)
        return _EMPTY

    async def Exec(self, req: pod_pb2.ExecRequest) -> empty_pb2.Empty:
        process = parse_json_object(req.process, "the process")
        await self.pod.exec(req.container_id, req.exec_id, process, io=None,
                            host_pid=req.host_pid)
        return _EMPTY

    async def Pause(self, req: pod_pb2.ContainerRef) -> empty_pb2.Empty:
        await self.pod.pause(req.container_id)
        return _EMPTY

    async def Resume(self, req: pod_pb2.ContainerRef) -> empty_pb2.Empty:
        await self.pod.resume(req.container_id)
        return _EMPTY

    async def Update(self, req: pod_pb2.UpdateRequest) -> empty_pb2.Empty:
        await self.pod.update(req.container_id, parse_json_object(req.resources,
                                                                  "the resources"))
        return _EMPTY

    async def DebugConsole(self, req: pod_pb2.DebugConsoleRequest, ctx: RequestContext
                           ) -> pod_pb2.DebugConsoleExit:
        agent = self.pod.sandbox.agent
        if agent is None or self.pod.lifecycle.stopped:
            raise StatusError(Code.UNAVAILABLE, f"pod {self.pod.id} has stopped")
        status = await self.console.run(agent, req, ctx.peer)
        return pod_pb2.DebugConsoleExit(status=status)

    async def Shutdown(self, req: empty_pb2.Empty) -> empty_pb2.Empty:
        if self.hooks.on_shutdown is not None:
            await self.hooks.on_shutdown()
        else:
            await self.pod.shutdown()
        return _EMPTY

    async def Events(self, req: pod_pb2.EventsRequest) -> pod_pb2.EventsReply:
        # Clamped: a client's wait must not hold the call past ttRPC's deadline.
        # (NaN compares false both ways and would pass both bounds.)
        wait = min(max(req.wait_seconds, 0.0), MAX_EVENTS_WAIT) \
            if math.isfinite(req.wait_seconds) else 0.0
        entries = await self.pod.events.wait(req.since_seq, wait)
        return pod_pb2.EventsReply(
            entries=[pod_pb2.EventEntry(seq=e.seq, time=e.time, kind=e.kind, text=e.text,
                                        error=e.error) for e in entries],
            last_seq=self.pod.events.last_seq)

    # --- pykata monitor --------------------------------------

    async def Metrics(self, req: pod_pb2.MetricsRequest, ctx: RequestContext
                      ) -> pod_pb2.PodMetrics:
        """Never fails for the guest's sake: a guest that does not answer in
        the caller's time leaves its figures out (`guest_error`)."""
        return await pod_metrics(self.pod, ctx.time_remaining(), guest=not req.skip_guest)


def _process_state(proc: PodProcess) -> pod_pb2.ProcessState:
    return pod_pb2.ProcessState(exec_id=proc.exec_id, status=proc.status.value,
                                exit_status=proc.exit_status, exited_at=proc.exited_at,
                                terminal=proc.terminal, host_pid=proc.host_pid)


def pod_state(pod: Pod) -> pod_pb2.PodState:
    return pod_pb2.PodState(
        id=pod.id, status=pod.lifecycle.status.value, front_end=pod.sandbox.front_end,
        owner_pid=os.getpid(), vm_pid=pod.vm_pid, boot=pod.sandbox.boot,
        containers=[pod_pb2.ContainerState(
            id=c.id, status=c.lifecycle.status.value, bundle=c.bundle,
            init=_process_state(c.init),
            execs=[_process_state(p) for p in c.execs.values()])
            for c in pod.containers.values()])


async def serve_control(pod: Pod, path: Path, hooks: ControlHooks = NO_HOOKS) -> Server:
    """Serve the pod's control socket at `path` (0600); the caller closes
    the server (`aclose`) when the pod ends (the socket goes with the
    sandbox's directory)."""
    server = Server()
    PodControl(pod, hooks).register(server)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    await server.serve_unix(path)
    os.chmod(path, 0o600)
    return server
