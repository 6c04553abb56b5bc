"""The tracing backend on the OpenTelemetry SDK: spans exported over OTLP/HTTP.

Imported only when tracing is on (`pykata.tracing.configure`). The SDK's
batch processor exports from its own thread, so a slow or absent collector
never holds up a pod; what it cannot export is dropped (and logged by the
SDK), never queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from pykata import __version__
from pykata.tracing import Drain, Send
from pykata.tracing import guest as guest_spans

log = logging.getLogger(__name__)

R = TypeVar("R")
# Agent RPC spans whose guest spans may still arrive: the latest ones.
MAX_WINDOWS = 256
# Guest spans looked at per drain (the guest buffers at most 512).
MAX_DRAINED = 512
FLUSH_MILLIS = 5000


def traces_url(endpoint: str) -> str:
    """The URL spans are posted to: a collector's base URL (no path) gets
    OTLP/HTTP's traces path, `/v1/traces`; a URL with a path is kept."""
    scheme, _, rest = endpoint.partition("://")
    host, _, path = rest.partition("/")
    return endpoint if path else f"{scheme}://{host}/v1/traces"


class _PodTrace:
    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.span.set_status(StatusCode.ERROR, type(error).__name__)
        self.span.end()


class OtelBackend:
    def __init__(self, endpoint: str, service: str,
                 exporter: SpanExporter | None = None) -> None:
        self._provider = TracerProvider(resource=Resource.create(
            {"service.name": service, "service.version": __version__}))
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter or OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=10)))
        self._tracer = self._provider.get_tracer("pykata", __version__)
        self._windows: OrderedDict[int, guest_spans.Window] = OrderedDict()

    @contextlib.contextmanager
    def span(self, name: str, parent: Any, attributes: dict[str, Any]) -> Iterator[None]:
        context = None
        if isinstance(parent, _PodTrace):
            context = trace.set_span_in_context(parent.span)
        with self._tracer.start_as_current_span(name, context=context, attributes=attributes):
            yield

    def pod_trace(self, name: str, attributes: dict[str, Any]) -> _PodTrace:
        # An empty context: a new trace, whatever span is current.
        return _PodTrace(self._tracer.start_span(name, context=otel_context.Context(),
                                                 attributes=attributes))

    async def agent_rpc(self, method: str, send: Send[R], drain: Drain) -> R:
        # An RPC outside every traced step (an OOM poll, a forwarded call)
        # would start a trace of its own: not traced.
        if not trace.get_current_span().get_span_context().is_valid:
            return await send(None)
        window: guest_spans.Window | None = None
        collect = True
        try:
            with self._tracer.start_as_current_span(
                    f"agent {method}", kind=SpanKind.CLIENT,
                    attributes={"rpc.system": "ttrpc", "rpc.method": method}) as span:
                ids = span.get_span_context()
                window = self._open(ids.trace_id, ids.span_id)
                try:
                    return await send(
                        {"traceparent": f"00-{ids.trace_id:032x}-{ids.span_id:016x}-01"})
                except asyncio.CancelledError:
                    collect = False
                    raise
                finally:
                    window.end = time.time_ns()
        finally:
            if collect and window is not None:
                await self._collect(drain)

    def _open(self, trace_id: int, span_id: int) -> guest_spans.Window:
        window = guest_spans.Window(trace_id, span_id, time.time_ns())
        self._windows[span_id] = window
        while len(self._windows) > MAX_WINDOWS:
            self._windows.popitem(last=False)
        return window

    async def _collect(self, drain: Drain) -> None:
        try:
            reply = await drain()
        except Exception as exc:  # tracing must never fail the call it traced
            log.debug("cannot get the guest's spans: %s", exc)
            return
        if reply is None:
            return
        if reply.dropped:
            log.info("the guest dropped %d spans (its buffer was full)", reply.dropped)
        accepted = guest_spans.accept(reply.spans[:MAX_DRAINED], self._windows.get,
                                      time.time_ns())
        if len(accepted) < len(reply.spans):
            log.debug("refused %d of the guest's %d spans",
                      len(reply.spans) - len(accepted), len(reply.spans))
        self.export_guest(accepted)

    def export_guest(self, accepted: list[guest_spans.GuestSpan]) -> None:
        made: list[trace.Span] = []
        for span in accepted:
            if span.parent is None:
                parent: trace.Span = NonRecordingSpan(SpanContext(
                    span.window.trace_id, span.window.span_id, is_remote=False,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED)))
            else:
                parent = made[span.parent]
            made.append(self._tracer.start_span(
                span.name, context=trace.set_span_in_context(parent),
                attributes={**span.attributes, "pykata.guest": True}, start_time=span.start))
        for made_span, span in zip(made, accepted, strict=True):
            made_span.end(end_time=span.end)

    def flush(self) -> None:
        self._provider.force_flush(FLUSH_MILLIS)
