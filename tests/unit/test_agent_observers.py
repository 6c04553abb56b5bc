"""The agent client tells its observers of every call: method, time, error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pykata.errors import AgentError
from pykata.runtime.agent_client import AgentClient
from pykata.ttrpc import Code, ConnectionClosedError, StatusError


class _ScriptedClient:
    """Answers each call with the next outcome: a message or an exception."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes

    async def call(self, service: str, method: str, request: Any, response_type: Any,
                   *, timeout: float | None = None, metadata: Any = None) -> Any:
        await asyncio.sleep(0)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _agent(outcomes: list[Any]) -> tuple[AgentClient, list[tuple[str, float, Any]]]:
    agent = AgentClient(_ScriptedClient(outcomes))  # type: ignore[arg-type]
    seen: list[tuple[str, float, Any]] = []
    agent.observers.append(lambda m, s, e: seen.append((m, s, e)))
    return agent, seen


def test_success_and_failures_are_observed() -> None:
    from google.protobuf import empty_pb2
    agent, seen = _agent([
        empty_pb2.Empty(),
        StatusError(Code.NOT_FOUND, "no such container"),
        ConnectionClosedError("gone"),
    ])

    async def run() -> None:
        await agent.start_container("c1")
        with pytest.raises(AgentError):
            await agent.start_container("c2")
        with pytest.raises(AgentError, match="connection lost"):
            await agent.remove_container("c3")

    asyncio.run(run())
    assert [m for m, _, _ in seen] == ["StartContainer", "StartContainer", "RemoveContainer"]
    assert seen[0][2] is None
    assert isinstance(seen[1][2], AgentError) and "no such container" in str(seen[1][2])
    assert isinstance(seen[2][2], AgentError)
    assert all(s >= 0 for _, s, _ in seen)


def test_a_failing_observer_does_not_fail_the_call() -> None:
    from google.protobuf import empty_pb2
    agent, seen = _agent([empty_pb2.Empty()])

    def broken(method: str, seconds: float, error: BaseException | None) -> None:
        raise RuntimeError("observer bug")

    agent.observers.insert(0, broken)
    asyncio.run(agent.start_container("c1"))
    assert [m for m, _, _ in seen] == ["StartContainer"]


def test_forwarded_calls_are_observed_with_the_agents_status() -> None:
    from google.protobuf import empty_pb2
    agent, seen = _agent([StatusError(Code.PERMISSION_DENIED, "refused")])

    async def run() -> None:
        with pytest.raises(StatusError):
            await agent.forward("SignalProcess", empty_pb2.Empty(), empty_pb2.Empty, None)

    asyncio.run(run())
    assert seen[0][0] == "SignalProcess"
    assert isinstance(seen[0][2], StatusError)
