"""Spans the guest sends (GetTraceSpans): checked before the host exports any.

The guest is hostile (see the threat model), so a span from it is accepted
only when it hangs, directly or through other accepted guest spans, under an
agent RPC span the host itself made and still remembers (`Window`), in that
span's trace: a guest cannot put spans into a trace it was not asked into,
nor export more than `MAX_PER_WINDOW` spans per host request. Names and
attribute keys must be plain words, values are escaped and cut; the guest's
span ids are not kept (the exporter gives each span a fresh host id).

Times: the guest's wall clock is its own (a cold-booted VM reads its RTC, a
clone is set by the host, TCG clocks drift). When the guest's spans for one
request do not lie inside the host's RPC span, they are all shifted by one
offset that centres them in it, then clamped into it; so the guest's steps
keep their order and lengths, and always lie inside the host's span.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pykata.protocols import agent_pb2
from pykata.untrusted import guest_line

log = logging.getLogger(__name__)

MAX_PER_WINDOW = 64
MAX_DEPTH = 8
MAX_ATTRIBUTES = 8
MAX_VALUE = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.: /-]{0,63}")
_KEY = re.compile(r"[a-z][a-z0-9_.]{0,63}")


@dataclass
class Window:
    """One agent RPC span of the host: its ids and when it ran (host ns).
    `end` is None while the call is in flight: its span ends after now."""

    trace_id: int
    span_id: int
    start: int
    end: int | None = None
    accepted: int = 0


@dataclass(frozen=True)
class GuestSpan:
    """A guest span the host accepted, with host times. `parent` is the index
    of its parent in the accepted list (earlier in it), or None when its
    parent is the host's RPC span `window`."""

    window: Window
    parent: int | None
    name: str
    start: int
    end: int
    attributes: dict[str, str]


def accept(spans: Sequence[agent_pb2.GuestSpan], find: Callable[[int], Window | None],
           now: int) -> list[GuestSpan]:
    """The spans of `spans` that hang under a known window, parents first,
    with their times moved into their window (`now` ends an open one)."""
    by_id: dict[bytes, agent_pb2.GuestSpan] = {}
    for span in spans:
        if (len(span.span_id) == 8 and any(span.span_id) and span.span_id not in by_id
                and _NAME.fullmatch(span.name) and span.start_unix_nano <= span.end_unix_nano):
            by_id[span.span_id] = span
    # Each span's chain up to the host: its window, and its guest ancestors.
    chains: dict[bytes, tuple[Window, list[bytes]]] = {}
    for span_id in by_id:
        found = _chain(span_id, by_id, find)
        if found is not None:
            chains[span_id] = found
    ordered = sorted(chains, key=lambda s: len(chains[s][1]))  # parents before children
    offsets = _offsets(by_id, chains, now)
    out: list[GuestSpan] = []
    index: dict[bytes, int] = {}
    for span_id in ordered:
        window, ancestors = chains[span_id]
        if window.accepted >= MAX_PER_WINDOW:
            continue
        parent = None
        if ancestors:
            if ancestors[0] not in index:
                continue  # its parent was refused: so is it
            parent = index[ancestors[0]]
        span = by_id[span_id]
        end = window.end if window.end is not None else now
        offset = offsets[id(window)]
        start = _clamp(span.start_unix_nano + offset, window.start, end)
        index[span_id] = len(out)
        window.accepted += 1
        out.append(GuestSpan(window, parent, span.name, start,
                             _clamp(span.end_unix_nano + offset, start, end),
                             _attributes(span.attributes)))
    return out


def _chain(span_id: bytes, by_id: dict[bytes, agent_pb2.GuestSpan],
           find: Callable[[int], Window | None]) -> tuple[Window, list[bytes]] | None:
    """The window `span_id` hangs under and its guest ancestors (nearest
    first); None when it hangs under nothing the host knows, loops, or is
    too deep."""
    ancestors: list[bytes] = []
    span = by_id[span_id]
    for _ in range(MAX_DEPTH):
        parent = span.parent_span_id
        if parent in by_id:
            if parent == span_id or parent in ancestors:
                return None
            ancestors.append(parent)
            span = by_id[parent]
            continue
        if len(parent) != 8 or len(span.trace_id) != 16:
            return None
        window = find(int.from_bytes(parent, "big"))
        if window is None or window.trace_id != int.from_bytes(span.trace_id, "big"):
            return None
        # Every span of the chain must be in the window's trace.
        trace_id = span.trace_id
        if any(by_id[a].trace_id != trace_id for a in ancestors) \
                or by_id[span_id].trace_id != trace_id:
            return None
        return window, ancestors
    return None


def _offsets(by_id: dict[bytes, agent_pb2.GuestSpan],
             chains: dict[bytes, tuple[Window, list[bytes]]], now: int) -> dict[int, int]:
    """Per window, what to add to guest times: 0 when the guest's spans
    already lie inside it, else the shift that centres them in it."""
    extent: dict[int, tuple[Window, int, int]] = {}
    for span_id, (window, _) in chains.items():
        span = by_id[span_id]
        _, lo, hi = extent.get(id(window), (window, span.start_unix_nano, span.end_unix_nano))
        extent[id(window)] = (window, min(lo, span.start_unix_nano),
                              max(hi, span.end_unix_nano))
    offsets = {}
    for key, (window, lo, hi) in extent.items():
        end = window.end if window.end is not None else now
        if window.start <= lo and hi <= end:
            offsets[key] = 0
        else:
            offsets[key] = window.start + max(0, (end - window.start) - (hi - lo)) // 2 - lo
            log.debug("guest spans moved by %.3f ms into the host's RPC span",
                      offsets[key] / 1e6)
    return offsets


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(value, hi))


def _attributes(pairs: Sequence[agent_pb2.SpanAttribute]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        if len(out) >= MAX_ATTRIBUTES:
            break
        if _KEY.fullmatch(pair.key):
            out[f"guest.{pair.key}"] = guest_line(pair.value, MAX_VALUE)
    return out
