"""The agent's span recorder: what the guest did for a traced host request.

A request whose ttRPC metadata carries a W3C `traceparent` (the host's RPC
span) gets a span of its own here, and the steps inside it (crun, mounts)
child spans; the host drains them with GetTraceSpans and exports them.
Nothing else is recorded: a request without a traceparent costs one dict
lookup. Only stdlib modules the agent imports anyway are used (contextvars,
os, time), so the boot path stays as it was.

The buffer is bounded (the oldest spans go first, counted as dropped), and
so are names and attributes; the host checks everything again anyway.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

MAX_SPANS = 512
MAX_ATTRIBUTES = 8
MAX_TEXT = 128
TRACEPARENT = "traceparent"


class Span:
    __slots__ = ("attributes", "end", "name", "parent_id", "span_id", "start", "trace_id")

    def __init__(self, trace_id: bytes, parent_id: bytes, name: str,
                 attributes: Mapping[str, str]) -> None:
        self.trace_id = trace_id
        self.span_id = os.urandom(8)
        self.parent_id = parent_id
        self.name = name[:MAX_TEXT]
        self.start = time.time_ns()
        self.end = 0
        self.attributes = {k[:MAX_TEXT]: str(v)[:MAX_TEXT]
                           for k, v in list(attributes.items())[:MAX_ATTRIBUTES]}


_current: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "pykata_agent_span", default=None)
_finished: deque[Span] = deque(maxlen=MAX_SPANS)
_dropped = 0


def parse_traceparent(value: str) -> tuple[bytes, bytes] | None:
    """(trace id, parent span id) of a W3C traceparent, version 00; None
    for anything else (all-zero ids are invalid there)."""
    parts = value.split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
    if not any(trace_id) or not any(span_id):
        return None
    return trace_id, span_id


@contextmanager
def request(metadata: Mapping[str, Sequence[str]], name: str) -> Iterator[None]:
    """A span for one host request, when the host sent a traceparent."""
    values = metadata.get(TRACEPARENT)
    parent = parse_traceparent(values[0]) if values else None
    if parent is None:
        yield
        return
    with _recorded(Span(parent[0], parent[1], name, {})):
        yield


@contextmanager
def span(name: str, **attributes: str) -> Iterator[None]:
    """A child of the current request's span; nothing outside a traced request."""
    parent = _current.get()
    if parent is None:
        yield
        return
    with _recorded(Span(parent.trace_id, parent.span_id, name, attributes)):
        yield


@contextmanager
def _recorded(new: Span) -> Iterator[None]:
    global _dropped
    token = _current.set(new)
    try:
        yield
    except BaseException as exc:
        new.attributes.setdefault("error", type(exc).__name__)
        raise
    finally:
        _current.reset(token)
        new.end = time.time_ns()
        if len(_finished) == MAX_SPANS:
            _dropped += 1
        _finished.append(new)


def drain() -> tuple[list[Span], int]:
    """Every finished span, oldest first, and how many were dropped since
    the last drain; the buffer is emptied."""
    global _dropped
    spans = list(_finished)
    _finished.clear()
    dropped, _dropped = _dropped, 0
    return spans, dropped
