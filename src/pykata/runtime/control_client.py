"""A client of a pod's control socket (`runtime.control`): the pod's
lifecycle calls, and an AgentClient over the same connection for the agent
calls the owner passes on (a process's stdio, waits, signals)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata.channels import CONTROL_SERVICE
from pykata.errors import InvalidStateError, PykataError
from pykata.protocols import pod_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.error_codes import from_status
from pykata.ttrpc import Client, ConnectionClosedError, StatusError, TtrpcError

R = TypeVar("R", bound=Message)
_TIMEOUT = 120.0
_CONNECT_SECONDS = 10.0


class PodClient:
    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name
        self.agent = AgentClient(client)

    @classmethod
    async def connect(cls, socket_path: str | Path, name: str) -> PodClient:
        """Connect to the owner of `name` (a container or pod, for messages);
        an owner that does not answer means the pod is not running."""
        try:
            client = await asyncio.wait_for(Client.connect_unix(socket_path), _CONNECT_SECONDS)
        except (TimeoutError, OSError) as exc:
            raise InvalidStateError(
                f"{name} is not running (its owner does not answer at {socket_path}: "
                f"{exc})") from exc
        return cls(client, name)

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> PodClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, method: str, request: Message, response_type: type[R],
                   timeout: float = _TIMEOUT) -> R:
        try:
            return await self._client.call(CONTROL_SERVICE, method, request, response_type,
                                           timeout=timeout)
        except StatusError as exc:
            raise from_status(exc) from None
        except ConnectionClosedError as exc:
            raise InvalidStateError(f"{self.name}: its owner went away during {method}"
                                    ) from exc
        except TtrpcError as exc:
            raise PykataError(f"{self.name}: {method}: {exc}") from exc

    async def state(self) -> pod_pb2.PodState:
        return await self.call("State", empty_pb2.Empty(), pod_pb2.PodState, 10)

    async def start(self, container_id: str, exec_id: str = "") -> None:
        await self.call("Start", pod_pb2.ProcessRef(container_id=container_id, exec_id=exec_id),
                        empty_pb2.Empty)

    async def kill(self, container_id: str, signum: int, exec_id: str = "",
                   all_processes: bool = False) -> None:
        await self.call("Kill", pod_pb2.KillRequest(container_id=container_id, exec_id=exec_id,
                                                    signal=signum, all=all_processes),
                        empty_pb2.Empty)

    async def exec(self, container_id: str, exec_id: str, process: bytes, host_pid: int
                   ) -> None:
        await self.call("Exec", pod_pb2.ExecRequest(container_id=container_id, exec_id=exec_id,
                                                    process=process, host_pid=host_pid),
                        empty_pb2.Empty)

    async def pause(self, container_id: str) -> None:
        await self.call("Pause", pod_pb2.ContainerRef(container_id=container_id),
                        empty_pb2.Empty)

    async def resume(self, container_id: str) -> None:
        await self.call("Resume", pod_pb2.ContainerRef(container_id=container_id),
                        empty_pb2.Empty)

    async def update(self, container_id: str, resources: bytes) -> None:
        await self.call("Update", pod_pb2.UpdateRequest(container_id=container_id,
                                                        resources=resources), empty_pb2.Empty)

    async def guest_pids(self, container_id: str) -> list[int]:
        """The container's processes, as the guest numbers them."""
        return await self.agent.list_processes(container_id)

    async def debug_console(self, request: pod_pb2.DebugConsoleRequest) -> int:
        """A debug console session (`runtime.debug_console`), start to end:
        its process's exit status. No deadline: a shell lasts as its user."""
        try:
            reply = await self._client.call(CONTROL_SERVICE, "DebugConsole", request,
                                            pod_pb2.DebugConsoleExit)
        except StatusError as exc:
            raise from_status(exc) from None
        except ConnectionClosedError as exc:
            raise InvalidStateError(f"{self.name}: its owner went away during the debug "
                                    "console session") from exc
        return reply.status

    async def shutdown(self) -> None:
        await self.call("Shutdown", empty_pb2.Empty(), empty_pb2.Empty)

    async def events(self, since_seq: int = 0, wait_seconds: float = 0.0
                     ) -> pod_pb2.EventsReply:
        """The pod's event log after `since_seq` (waiting up to `wait_seconds`
        for an entry when there is none yet)."""
        return await self.call("Events", pod_pb2.EventsRequest(
            since_seq=since_seq, wait_seconds=wait_seconds), pod_pb2.EventsReply,
            timeout=wait_seconds + 30)
