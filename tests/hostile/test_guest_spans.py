"""A guest that abuses GetTraceSpans: the host exports only what it asked for.

The agent here is a ttRPC server over a socketpair playing a hostile guest
(no VM: what is tested is the host's handling of the reply, through the real
AgentClient, the real tracing backend and a real OTLP/HTTP receiver). It
answers every traced call, then floods GetTraceSpans with spans in other
traces, under spans the host never made, with colliding ids, absurd times,
names and attributes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest
from google.protobuf import empty_pb2

from pykata import tracing
from pykata.channels import AGENT_SERVICE
from pykata.protocols import agent_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.tracing.guest import MAX_ATTRIBUTES, MAX_PER_WINDOW
from pykata.tracing.otel import OtelBackend
from pykata.ttrpc import RequestContext, Server
from tests.otlp_receiver import OtlpReceiver, check_trace


class HostileGuest:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes]] = []  # (trace id, span id) of each request

    async def StartContainer(self, req: agent_pb2.StartContainerRequest,
                             ctx: RequestContext) -> empty_pb2.Empty:
        parts = ctx.metadata["traceparent"][0].split("-")
        self.seen.append((bytes.fromhex(parts[1]), bytes.fromhex(parts[2])))
        return empty_pb2.Empty()

    async def GetTraceSpans(self, req: agent_pb2.GetTraceSpansRequest,
                            ctx: RequestContext) -> agent_pb2.TraceSpans:
        trace_id, host_span = self.seen[-1]
        spans = []
        # A flood under the real parent: far more than one RPC may bring.
        for i in range(2000):
            spans.append(agent_pb2.GuestSpan(
                trace_id=trace_id, span_id=os.urandom(8), parent_span_id=host_span,
                name=f"flood{i}", start_unix_nano=0, end_unix_nano=2**64 - 1,
                attributes=[agent_pb2.SpanAttribute(key=f"k{j}", value="\x1b]0;pwned\x07" * 4)
                            for j in range(20)]))
        # Another trace (a span smuggled into someone else's), made-up
        # parents, the host's own span id, every earlier RPC of this guest.
        spans.append(agent_pb2.GuestSpan(trace_id=os.urandom(16), span_id=os.urandom(8),
                                         parent_span_id=host_span, name="other-trace"))
        spans.append(agent_pb2.GuestSpan(trace_id=trace_id, span_id=os.urandom(8),
                                         parent_span_id=os.urandom(8), name="made-up"))
        spans.append(agent_pb2.GuestSpan(trace_id=trace_id, span_id=host_span,
                                         parent_span_id=host_span, name="self-parent"))
        spans.append(agent_pb2.GuestSpan(trace_id=trace_id, span_id=os.urandom(8),
                                         parent_span_id=host_span, name="x" * 10_000))
        return agent_pb2.TraceSpans(spans=spans, dropped=2**32 - 1)


@pytest.fixture
async def hostile_agent() -> AsyncIterator[AgentClient]:
    guest = HostileGuest()
    server = Server()
    server.register_methods(AGENT_SERVICE, {
        "StartContainer": (agent_pb2.StartContainerRequest, guest.StartContainer),
        "GetTraceSpans": (agent_pb2.GetTraceSpansRequest, guest.GetTraceSpans),
    })
    host_end, guest_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=guest_end)
    serving = asyncio.ensure_future(server.serve_connection(reader, writer))
    agent = await AgentClient.over_socket(host_end)
    yield agent
    await agent.close()
    await server.aclose()
    await serving


async def test_a_flooding_guest_gets_a_bounded_number_of_spans_into_its_own_trace(
        hostile_agent: AgentClient) -> None:
    """Two traced calls, each answered with 2004 abusive spans: the host
    exports at most MAX_PER_WINDOW per call, all in the pod's trace, under
    its RPC spans, inside them in time, with bounded, escaped attributes; the
    calls themselves succeed."""
    with OtlpReceiver() as receiver:
        with tracing.installed(OtelBackend(receiver.endpoint, "pykata-hostile")):
            trace = tracing.pod_trace("pod")
            for cid in ("c1", "c2"):
                with tracing.span("container.start", trace):
                    await hostile_agent.start_container(cid)
            tracing.end(trace)
            tracing.flush()
        receiver.wait_for("pod")
        traces = receiver.traces()
        assert len(traces) == 1, "a guest span escaped into another trace"
        (spans,) = traces.values()
        guest = [s for s in spans if s.guest]
        assert len(guest) == 2 * MAX_PER_WINDOW
        assert {s.name for s in guest} <= {f"flood{i}" for i in range(2000)}
        rpc_ids = {s.span_id for s in spans if s.name == "agent StartContainer"}
        assert all(s.parent_span_id in rpc_ids for s in guest)
        assert all(s.span_id not in rpc_ids for s in guest)
        for span in guest:
            assert len(span.attributes) <= MAX_ATTRIBUTES + 1  # + pykata.guest
            for key, value in span.attributes.items():
                assert "\x1b" not in str(value) and len(str(value)) < 200, key
        check_trace(spans)
