"""An OTLP/HTTP trace receiver for tests: POST /v1/traces, decoded with
opentelemetry-proto, every span kept for the test to look at."""

from __future__ import annotations

import gzip
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start: int
    end: int
    attributes: dict[str, object]
    service: str

    @property
    def guest(self) -> bool:
        return self.attributes.get("pykata.guest") is True


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces"
                if ok:
                    receiver._take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def _take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(ReceivedSpan(
                            span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                            span.name, span.start_time_unix_nano, span.end_time_unix_nano,
                            {a.key: _value(a.value) for a in span.attributes}, service))

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        with self._lock:
            out: dict[str, list[ReceivedSpan]] = defaultdict(list)
            for span in self.spans:
                out[span.trace_id].append(span)
            return dict(out)

    def wait_for(self, name: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until `count` spans called `name` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if sum(s.name == name for s in self.spans) >= count:
                    return
            time.sleep(0.1)
        raise AssertionError(f"no {count} span(s) {name!r} within {timeout}s; got "
                             f"{sorted({s.name for s in self.spans})}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


def check_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """Assert the shape every pykata trace has: one root `pod`, every other
    span's parent in the trace, and each guest span inside its parent (a
    host agent RPC span for the guest's request spans). Returns the guest
    spans."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert [r.name for r in roots] == ["pod"], [r.name for r in roots]
    for span in spans:
        if span.parent_span_id:
            assert span.parent_span_id in by_id, f"{span.name}: parent not in the trace"
    guest = [s for s in spans if s.guest]
    for span in guest:
        parent = by_id[span.parent_span_id]
        if span.name.startswith("guest "):
            assert parent.name == "agent " + span.name.removeprefix("guest ") \
                and not parent.guest, (span.name, parent.name)
        assert parent.start <= span.start <= span.end <= parent.end, \
            (span.name, parent.name, span.start, span.end, parent.start, parent.end)
    return guest
