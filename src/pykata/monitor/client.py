"""A connection to a sandbox monitor: its Monitor service, and the agent
calls it passes on (an AgentClient over the same connection)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from pykata.errors import InvalidStateError, NotFoundError, PykataError
from pykata.monitor.service import MONITOR_SERVICE
from pykata.protocols import monitor_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.ttrpc import Client, Code, ConnectionClosedError, StatusError, TtrpcError

R = TypeVar("R", bound=Message)
_TIMEOUT = 120.0


class MonitorClient:
    def __init__(self, client: Client, container_id: str) -> None:
        self._client = client
        self.container_id = container_id
        self.agent = AgentClient(client)

    @classmethod
    async def connect(cls, socket_path: str | Path, container_id: str) -> MonitorClient:
        try:
            client = await asyncio.wait_for(Client.connect_unix(socket_path), 10)
        except (TimeoutError, OSError) as exc:
            raise InvalidStateError(
                f"container {container_id} is not running (its monitor does not answer at "
                f"{socket_path}: {exc})") from exc
        return cls(client, container_id)

    async def close(self) -> None:
        await self._client.aclose()

    async def call(self, method: str, request: Message, response_type: type[R],
                   timeout: float = _TIMEOUT) -> R:
        try:
            return await self._client.call(MONITOR_SERVICE, method, request, response_type,
                                           timeout=timeout)
        except StatusError as exc:
            if exc.code == Code.FAILED_PRECONDITION:
                raise InvalidStateError(exc.message) from None
            if exc.code == Code.NOT_FOUND:
                raise NotFoundError(exc.message) from None
            raise PykataError(exc.message) from None
        except ConnectionClosedError as exc:
            raise InvalidStateError(
                f"container {self.container_id}: its monitor went away during {method}"
            ) from exc
        except TtrpcError as exc:
            raise PykataError(f"container {self.container_id}: {method}: {exc}") from exc

    async def state(self) -> monitor_pb2.StateResponse:
        return await self.call("State", empty_pb2.Empty(), monitor_pb2.StateResponse, 10)

    async def simple(self, method: str) -> None:
        await self.call(method, empty_pb2.Empty(), empty_pb2.Empty)
