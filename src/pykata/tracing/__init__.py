"""Tracing of what a user waits on, exported with OpenTelemetry (OTLP/HTTP).

Off by default (`[runtime] enable_tracing`). This module is all a pod's
owner imports while tracing is off: `span` hands back one shared no-op
context manager, so off costs a function call and an `if`; the
OpenTelemetry SDK and its exporter are imported by `configure` only when
tracing is on (`pykata.tracing.otel`).

The traces: one per pod, its root span `pod` from the pod's start to its
teardown; under it each step (`pod.start` with its phases, container
create/start, exec, kill, delete, `pod.teardown`), under those every agent
RPC, and under those the guest's own spans (the agent's handling, crun,
mounts), drained from the guest after each traced RPC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from pykata.protocols import agent_pb2

R = TypeVar("R")
Metadata = Mapping[str, str]
# Sends one agent request with the given ttRPC metadata (None: none).
Send = Callable[[Metadata | None], Awaitable[R]]
# Asks the guest for the spans it recorded (GetTraceSpans); None when it
# cannot (an agent without the RPC).
Drain = Callable[[], Awaitable["agent_pb2.TraceSpans | None"]]


class PodTrace(Protocol):
    """A pod's root span, held by the pod from its start to its teardown."""

    def end(self, error: BaseException | None = None) -> None: ...


class Backend(Protocol):
    def span(self, name: str, parent: PodTrace | None,
             attributes: dict[str, Any]) -> contextlib.AbstractContextManager[None]: ...
    def pod_trace(self, name: str, attributes: dict[str, Any]) -> PodTrace: ...
    async def agent_rpc(self, method: str, send: Send[R], drain: Drain) -> R: ...
    def flush(self) -> None: ...


_backend: Backend | None = None
_NO_SPAN = contextlib.nullcontext()


def enabled() -> bool:
    return _backend is not None


def configure(enable: bool, endpoint: str, service: str) -> None:
    """Turn tracing on for this process (once; later calls change nothing),
    exporting to `endpoint` (an OTLP/HTTP traces URL) as `service`."""
    global _backend
    if not enable or _backend is not None:
        return
    from pykata.tracing.otel import OtelBackend

    _backend = OtelBackend(endpoint, service)


def span(name: str, parent: PodTrace | None = None,
         **attributes: Any) -> contextlib.AbstractContextManager[None]:
    """A span around a step, the child of `parent` (a pod's trace) or else
    of the current span; a no-op while tracing is off."""
    if _backend is None:
        return _NO_SPAN
    return _backend.span(name, parent, attributes)


def pod_trace(name: str, **attributes: Any) -> PodTrace | None:
    """A new trace's root span (None while tracing is off)."""
    return None if _backend is None else _backend.pod_trace(name, attributes)


def end(trace: PodTrace | None, error: BaseException | None = None) -> None:
    if trace is not None:
        trace.end(error)


async def agent_rpc(method: str, send: Send[R], drain: Drain) -> R:
    """`send` inside a span for the agent RPC `method` (when a traced step
    is current), with its `traceparent` in the request's metadata; the
    guest's spans are drained and exported afterwards."""
    if _backend is None:
        return await send(None)
    return await _backend.agent_rpc(method, send, drain)


def flush() -> None:
    """Export what is finished (the pod's owner calls it before it goes)."""
    if _backend is not None:
        _backend.flush()


@contextlib.contextmanager
def installed(backend: Backend | None) -> Iterator[None]:
    """Use `backend` for a while (tests)."""
    global _backend
    saved, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = saved
