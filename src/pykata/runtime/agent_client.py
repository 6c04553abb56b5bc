"""The host's client of the guest agent: one method per RPC, each with its timeout.

This is the boundary where the guest's answers enter the host, and the guest
may be hostile: every failure comes out as an `AgentError` (a garbled or
unexpected answer included) with the guest's text escaped; every value is
checked or clamped here (exit statuses to 0..255, process lists bounded, ids
checked), so nothing above this module sees a value a real agent could not
send. Sizes are bounded by the ttRPC layer, and callers never build host paths
from agent data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata import tracing
from pykata.channels import AGENT_SERVICE, HEALTH_SERVICE
from pykata.errors import AgentError
from pykata.protocols import agent_pb2, health_pb2, oci_pb2
from pykata.ttrpc import Client, Code, ConnectionClosedError, StatusError, TtrpcError
from pykata.ttrpc.client import Metadata
from pykata.untrusted import guest_line, guest_text

log = logging.getLogger(__name__)


# Seconds per RPC. Long-polling calls (reads, waits, OOM events) have none:
# they legitimately block until something happens in the guest.
_TIMEOUTS = {
    "CreateSandbox": 60.0,
    "DestroySandbox": 30.0,
    "CreateContainer": 120.0,
    "StartContainer": 60.0,
    "ExecProcess": 60.0,
    "RemoveContainer": 60.0,
    "SignalProcess": 30.0,
    "WriteStdin": 60.0,
    "CloseStdin": 30.0,
    "TtyWinResize": 10.0,
    "PauseContainer": 30.0,
    "ResumeContainer": 30.0,
    "UpdateContainer": 30.0,
    "StatsContainer": 30.0,
    "ListProcesses": 30.0,
    "GetGuestDetails": 30.0,
    "GetBootProfile": 10.0,
    "ReseedRandomDev": 10.0,
    "SetGuestDateTime": 10.0,
    "UpdateInterface": 30.0,
    "UpdateRoutes": 30.0,
    "AddARPNeighbors": 30.0,
    "ListInterfaces": 30.0,
    # `pykata monitor`: a scrape must not wait long for one guest.
    "GetMetrics": 5.0,
    "GetTraceSpans": 10.0,
}

R = TypeVar("R", bound=Message)

# Told of every finished agent call: its method, its seconds, and the error
# it ended with (None on success). Metrics, the pod's event log and tracing
# listen here, so the call path itself stays one place.
RpcObserver = Callable[[str, float, BaseException | None], None]

# The longest a guest's boot step may claim to have taken (GetBootProfile).
MAX_BOOT_SECONDS = 3600.0


def boot_steps(reply: agent_pb2.BootProfile) -> dict[str, float]:
    """The steps of a guest's BootProfile that can be times of a boot."""
    steps = {}
    for field in agent_pb2.BootProfile.DESCRIPTOR.fields:
        value = getattr(reply, field.name)
        if math.isfinite(value) and 0 < value <= MAX_BOOT_SECONDS:
            steps[field.name] = float(value)
    return steps


# Not traced: long polls and stream traffic, which run for a container's
# whole life; tracing's own call; and setting the guest's clock (its span
# would start on one clock and end on another).
_UNTRACED = frozenset({"WaitProcess", "GetOOMEvent", "WriteStdin", "CloseStdin",
                       "TtyWinResize", "GetTraceSpans", "SetGuestDateTime"})

# An exit status the agent reports outside a shell's 0..255 becomes this.
INVALID_EXIT_STATUS = 255
MAX_PROCESSES = 65536
MAX_PID = 4194304  # the kernel's PID_MAX_LIMIT
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
MAX_INTERFACES = 256
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


class StreamEnd(Exception):
    """A ReadStdout/ReadStderr reached the end of the stream."""


class AgentClient:
    def __init__(self, client: Client) -> None:
        self._client = client
        self.observers: list[RpcObserver] = []
        self._guest_traces = True

    @classmethod
    async def over_socket(cls, sock: socket.socket, *, first_stream_id: int = 1
                          ) -> AgentClient:
        """`first_stream_id`: above every id the agent has seen on this
        channel (a VM restored from a template remembers the template's)."""
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(Client(reader, writer, first_stream_id=first_stream_id))

    @property
    def next_stream_id(self) -> int:
        return self._client.next_stream_id

    @property
    def closed(self) -> bool:
        return self._client.closed

    async def wait_closed(self) -> None:
        await self._client.wait_closed()

    async def close(self) -> None:
        await self._client.aclose()

    def _observe(self, method: str, started: float, error: BaseException | None) -> None:
        seconds = time.monotonic() - started
        for observer in self.observers:
            # An observer's bug must not turn a good call into a failed one.
            try:
                observer(method, seconds, error)
            except Exception:
                log.exception("observer of agent call %s failed", method)

    async def _call(self, method: str, request: Message, response_type: type[R],
                    *, service: str = AGENT_SERVICE, timeout: float | None = None) -> R:
        if tracing.enabled() and method not in _UNTRACED:
            return await tracing.agent_rpc(
                method, lambda metadata: self._send(method, request, response_type, service,
                                                    timeout, metadata),
                self._guest_spans)
        return await self._send(method, request, response_type, service, timeout, None)

    async def _guest_spans(self) -> agent_pb2.TraceSpans | None:
        """What the guest recorded for traced calls (checked by the tracer)."""
        if not self._guest_traces:
            return None
        try:
            return await self._client.call(AGENT_SERVICE, "GetTraceSpans",
                                           agent_pb2.GetTraceSpansRequest(),
                                           agent_pb2.TraceSpans, timeout=10.0)
        except StatusError as exc:
            if exc.code != Code.UNIMPLEMENTED:
                raise
            self._guest_traces = False  # an agent from before tracing
            return None

    async def _send(self, method: str, request: Message, response_type: type[R],
                    service: str, timeout: float | None, metadata: Metadata | None) -> R:
        started = time.monotonic()
        try:
            reply = await self._client.call(
                service, method, request, response_type,
                timeout=timeout if timeout is not None else _TIMEOUTS.get(method),
                metadata=metadata,
            )
        except StatusError as exc:
            error: BaseException = _agent_error(method, exc)
            self._observe(method, started, error)
            raise error from exc
        except ConnectionClosedError as exc:
            error = AgentError(f"agent connection lost during {method}")
            self._observe(method, started, error)
            raise error from exc
        except TtrpcError as exc:
            # A reply this side cannot decode: the guest is broken or hostile.
            error = AgentError(f"{method}: the agent sent an invalid reply: "
                               f"{guest_line(str(exc))}")
            self._observe(method, started, error)
            raise error from exc
        except BaseException as exc:
            self._observe(method, started, exc)
            raise
        self._observe(method, started, None)
        return reply

    async def forward(self, method: str, request: Message, response_type: type[R],
                      timeout: float | None) -> R:
        """Pass a request from another host process on to the agent unchanged
        (the sandbox monitor serves its clients this way). The answer is not
        checked here: the end client's AgentClient checks it. A refusal comes
        back as the agent's StatusError, so the end client sees its code."""
        started = time.monotonic()
        try:
            reply = await self._client.call(AGENT_SERVICE, method, request, response_type,
                                            timeout=timeout)
        except StatusError as exc:
            self._observe(method, started, exc)
            raise
        except ConnectionClosedError as exc:
            error = StatusError(Code.UNAVAILABLE, f"agent connection lost during {method}")
            self._observe(method, started, error)
            raise error from exc
        except TtrpcError as exc:
            error = StatusError(Code.DATA_LOSS, f"the agent sent an invalid reply: "
                                                f"{guest_line(str(exc))}")
            self._observe(method, started, error)
            raise error from exc
        except BaseException as exc:
            self._observe(method, started, exc)
            raise
        self._observe(method, started, None)
        return reply

    async def check(self, timeout: float) -> None:
        """Health.Check, waiting up to `timeout` for the agent to come up.
        Running out of time raises AgentError with code DEADLINE_EXCEEDED."""
        await self._call("Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
                         service=HEALTH_SERVICE, timeout=timeout)

    async def create_sandbox(self, req: agent_pb2.CreateSandboxRequest) -> None:
        await self._call("CreateSandbox", req, empty_pb2.Empty)

    async def destroy_sandbox(self) -> None:
        await self._call("DestroySandbox", agent_pb2.DestroySandboxRequest(), empty_pb2.Empty)

    async def guest_details(self) -> agent_pb2.GuestDetailsResponse:
        return await self._call(
            "GetGuestDetails", agent_pb2.GuestDetailsRequest(), agent_pb2.GuestDetailsResponse
        )

    async def boot_profile(self) -> dict[str, float]:
        """The guest's boot steps (GetBootProfile), in seconds since its
        kernel started. Guest values: one that is not a time of a boot
        (negative, not finite, over an hour) is left out."""
        return boot_steps(await self._call("GetBootProfile", agent_pb2.BootProfileRequest(),
                                           agent_pb2.BootProfile))

    async def reseed_random(self, data: bytes) -> None:
        await self._call("ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=data),
                         empty_pb2.Empty)

    async def set_guest_time(self, now_ns: int) -> None:
        sec, nsec = divmod(now_ns, 1_000_000_000)
        await self._call("SetGuestDateTime",
                         agent_pb2.SetGuestDateTimeRequest(Sec=sec, Usec=nsec // 1000),
                         empty_pb2.Empty)

    async def create_container(self, req: agent_pb2.CreateContainerRequest) -> None:
        await self._call("CreateContainer", req, empty_pb2.Empty)

    async def start_container(self, cid: str) -> None:
        req = agent_pb2.StartContainerRequest(container_id=cid)
        await self._call("StartContainer", req, empty_pb2.Empty)

    async def remove_container(self, cid: str) -> None:
        req = agent_pb2.RemoveContainerRequest(container_id=cid)
        await self._call("RemoveContainer", req, empty_pb2.Empty)

    async def exec_process(
        self, cid: str, exec_id: str, process: oci_pb2.Process
    ) -> None:
        req = agent_pb2.ExecProcessRequest(container_id=cid, exec_id=exec_id, process=process)
        await self._call("ExecProcess", req, empty_pb2.Empty)

    async def signal_process(self, cid: str, exec_id: str, signal: int) -> None:
        req = agent_pb2.SignalProcessRequest(container_id=cid, exec_id=exec_id, signal=signal)
        await self._call("SignalProcess", req, empty_pb2.Empty)

    async def wait_process(self, cid: str, exec_id: str) -> int:
        req = agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id)
        resp = await self._call("WaitProcess", req, agent_pb2.WaitProcessResponse)
        if not 0 <= resp.status <= 255:
            log.warning("the agent reported exit status %d for %s/%s; reporting %d",
                        resp.status, guest_line(cid), guest_line(exec_id), INVALID_EXIT_STATUS)
            return INVALID_EXIT_STATUS
        return resp.status

    async def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        req = agent_pb2.WriteStreamRequest(container_id=cid, exec_id=exec_id, data=data)
        resp = await self._call("WriteStdin", req, agent_pb2.WriteStreamResponse)
        return min(max(resp.len, 0), len(data))

    async def read_stream(self, stream: str, cid: str, exec_id: str, length: int) -> bytes:
        """Read from "stdout" or "stderr"; raise StreamEnd at end-of-file."""
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        req = agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=length)
        try:
            resp = await self._client.call(
                AGENT_SERVICE, method, req, agent_pb2.ReadStreamResponse
            )
        except StatusError as exc:
            if exc.code in (Code.OUT_OF_RANGE, Code.NOT_FOUND):
                raise StreamEnd() from None
            raise _agent_error(method, exc) from exc
        except ConnectionClosedError as exc:
            raise StreamEnd() from exc
        except TtrpcError as exc:
            raise AgentError(f"{method}: the agent sent an invalid reply: "
                             f"{guest_line(str(exc))}") from exc
        return resp.data

    async def close_stdin(self, cid: str, exec_id: str) -> None:
        req = agent_pb2.CloseStdinRequest(container_id=cid, exec_id=exec_id)
        await self._call("CloseStdin", req, empty_pb2.Empty)

    async def resize(self, cid: str, exec_id: str, rows: int, columns: int) -> None:
        req = agent_pb2.TtyWinResizeRequest(
            container_id=cid, exec_id=exec_id, row=rows, column=columns
        )
        await self._call("TtyWinResize", req, empty_pb2.Empty)

    async def pause_container(self, cid: str) -> None:
        req = agent_pb2.PauseContainerRequest(container_id=cid)
        await self._call("PauseContainer", req, empty_pb2.Empty)

    async def resume_container(self, cid: str) -> None:
        req = agent_pb2.ResumeContainerRequest(container_id=cid)
        await self._call("ResumeContainer", req, empty_pb2.Empty)

    async def update_container(self, cid: str, resources: oci_pb2.LinuxResources) -> None:
        req = agent_pb2.UpdateContainerRequest(container_id=cid, resources=resources)
        await self._call("UpdateContainer", req, empty_pb2.Empty)

    async def stats_container(self, cid: str) -> agent_pb2.StatsContainerResponse:
        req = agent_pb2.StatsContainerRequest(container_id=cid)
        return await self._call("StatsContainer", req, agent_pb2.StatsContainerResponse)

    async def list_processes(self, cid: str) -> list[int]:
        req = agent_pb2.ListProcessesRequest(container_id=cid, format="json")
        resp = await self._call("ListProcesses", req, agent_pb2.ListProcessesResponse)
        try:
            pids = json.loads(resp.process_list or b"[]")
        except (ValueError, RecursionError) as exc:
            raise AgentError("the agent sent an unreadable process list") from exc
        if (not isinstance(pids, list) or len(pids) > MAX_PROCESSES
                or not all(type(p) is int and 0 < p <= MAX_PID for p in pids)):
            raise AgentError("the agent sent an unreadable process list")
        return pids

    async def update_interface(self, iface: agent_pb2.Interface) -> None:
        await self._call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=iface),
                         agent_pb2.Interface)

    async def interface_names_by_mac(self) -> dict[str, str]:
        """The guest's interfaces (ListInterfaces): MAC to name, for the
        names and MACs that are well-formed (guest values)."""
        reply = await self._call("ListInterfaces", agent_pb2.ListInterfacesRequest(),
                                 agent_pb2.Interfaces)
        out: dict[str, str] = {}
        for iface in reply.Interfaces[:MAX_INTERFACES]:
            mac, name = iface.hwAddr.lower(), iface.name
            if _MAC.fullmatch(mac) and _IFNAME.fullmatch(name):
                out[mac] = name
        return out

    async def update_routes(self, routes: list[agent_pb2.Route]) -> None:
        req = agent_pb2.UpdateRoutesRequest(routes=agent_pb2.Routes(Routes=routes))
        await self._call("UpdateRoutes", req, agent_pb2.Routes)

    async def add_arp_neighbors(self, neighbors: list[agent_pb2.ARPNeighbor]) -> None:
        req = agent_pb2.AddARPNeighborsRequest(
            neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=neighbors))
        await self._call("AddARPNeighbors", req, empty_pb2.Empty)

    async def guest_metrics(self, timeout: float | None = None) -> agent_pb2.GuestMetrics:
        """The guest's figures (GetMetrics), checked and clamped
        (`runtime.guest_metrics`): guest values."""
        from pykata.runtime.guest_metrics import checked

        return checked(await self._call("GetMetrics", agent_pb2.GetMetricsRequest(),
                                        agent_pb2.GuestMetrics, timeout=timeout))

    async def get_oom_event(self) -> str:
        """The next container the guest reports out of memory (a long poll)."""
        resp = await self._call("GetOOMEvent", agent_pb2.GetOOMEventRequest(),
                                agent_pb2.OOMEvent)
        if not _ID.fullmatch(resp.container_id):
            raise AgentError(f"the agent sent an invalid container id "
                             f"{guest_line(resp.container_id, 140)!r} in an OOM event")
        return resp.container_id


def _agent_error(method: str, exc: StatusError) -> AgentError:
    if exc.code == Code.DEADLINE_EXCEEDED:
        # Not the guest's failure to report: it did not answer at all.
        return AgentError(f"{method}: the agent did not answer in time "
                          f"({guest_text(exc.message)})", code=int(exc.code))
    return AgentError(f"{method} failed in the guest: {guest_text(exc.message)}",
                      code=int(exc.code))
