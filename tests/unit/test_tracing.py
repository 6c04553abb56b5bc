"""Tracing: the guest's recorder, the host's checks of guest spans, and the
whole host path (AgentClient → ttRPC metadata → the agent's recorder →
GetTraceSpans → OTLP/HTTP) against a receiver decoding what it gets."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from google.protobuf import empty_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from pykata import tracing
from pykata.agent import spans
from pykata.agent.service import AgentService, _traced
from pykata.channels import AGENT_SERVICE
from pykata.config import parse
from pykata.errors import ConfigError, HypervisorError
from pykata.protocols import agent_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.container import bind_rootfs
from pykata.tracing import guest
from pykata.tracing.otel import OtelBackend, traces_url
from pykata.ttrpc import RequestContext, Server
from tests.otlp_receiver import OtlpReceiver, check_trace
from tests.unit.pod_fakes import CapturedIO, FakeSource, fake_pod, spec

TRACE = bytes(range(1, 17))
HOST_SPAN = bytes(range(1, 9))
TRACEPARENT = f"00-{TRACE.hex()}-{HOST_SPAN.hex()}-01"


@pytest.fixture(autouse=True)
def empty_guest_buffer() -> Iterator[None]:
    spans.drain()
    yield
    spans.drain()


# --- the guest's recorder -------------------------------------------------

async def test_guest_records_a_traced_request_and_its_steps() -> None:
    """A request with a traceparent gets a span under the host's span; a
    step inside it a child; each is drained once."""
    with (spans.request({"traceparent": [TRACEPARENT]}, "guest CreateContainer"),
          spans.span("crun create", container="c1")):
        await asyncio.sleep(0.001)
    done, dropped = spans.drain()
    assert dropped == 0
    crun, request = done
    assert request.name == "guest CreateContainer"
    assert (request.trace_id, request.parent_id) == (TRACE, HOST_SPAN)
    assert crun.trace_id == TRACE and crun.parent_id == request.span_id
    assert crun.attributes == {"container": "c1"}
    assert request.start <= crun.start <= crun.end <= request.end
    assert spans.drain() == ([], 0)


@pytest.mark.parametrize("value", [
    "", "garbage", f"01-{TRACE.hex()}-{HOST_SPAN.hex()}-01",
    f"00-{'0' * 32}-{HOST_SPAN.hex()}-01", f"00-{TRACE.hex()}-{'0' * 16}-01",
    f"00-{TRACE.hex()[:-1]}x-{HOST_SPAN.hex()}-01",
])
def test_guest_records_nothing_without_a_valid_traceparent(value: str) -> None:
    """No (valid) traceparent: no span, and steps inside record nothing."""
    with (spans.request({"traceparent": [value]} if value else {}, "guest X"),
          spans.span("crun start")):
        pass
    assert spans.drain() == ([], 0)


def test_guest_buffer_is_bounded_and_counts_what_it_dropped() -> None:
    """The guest keeps the newest MAX_SPANS spans and counts the others."""
    for _ in range(spans.MAX_SPANS + 10):
        with spans.request({"traceparent": [TRACEPARENT]}, "guest X"):
            pass
    done, dropped = spans.drain()
    assert len(done) == spans.MAX_SPANS and dropped == 10


def test_the_agent_does_not_import_tracing_libraries() -> None:
    """The recorder adds no import to the guest's boot path beyond the stdlib
    modules asyncio imports anyway."""
    code = ("import sys; import pykata.agent.main; "
            "print(sorted(m for m in sys.modules if 'opentelemetry' in m "
            "or m.startswith('pykata.tracing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- the host's checks of guest spans ---------------------------------------

def _window(start: int = 1000, end: int | None = 2000) -> guest.Window:
    return guest.Window(int.from_bytes(TRACE, "big"), int.from_bytes(HOST_SPAN, "big"),
                        start, end)


def _span(span_id: bytes, parent: bytes = HOST_SPAN, *, name: str = "guest X",
          start: int = 1100, end: int = 1200, trace: bytes = TRACE,
          attributes: dict[str, str] | None = None) -> agent_pb2.GuestSpan:
    return agent_pb2.GuestSpan(
        trace_id=trace, span_id=span_id, parent_span_id=parent, name=name,
        start_unix_nano=start, end_unix_nano=end,
        attributes=[agent_pb2.SpanAttribute(key=k, value=v)
                    for k, v in (attributes or {}).items()])


def _accept(spans_in: list[agent_pb2.GuestSpan], window: guest.Window | None = None,
            now: int = 5000) -> list[guest.GuestSpan]:
    window = window or _window()
    return guest.accept(spans_in, lambda span_id: window if span_id == window.span_id
                        else None, now)


def test_host_keeps_guest_spans_under_its_own_rpc_span_parents_first() -> None:
    """A request span and its child: both kept, the parent first, times unmoved."""
    child = _span(b"childid1", b"parentid", name="crun create", start=1120, end=1150)
    accepted = _accept([child, _span(b"parentid")])
    assert [(s.name, s.parent) for s in accepted] == [("guest X", None), ("crun create", 0)]
    assert (accepted[1].start, accepted[1].end) == (1120, 1150)  # inside: unmoved


@pytest.mark.parametrize("bad", [
    _span(b"spanid01", b"unknown!"),                 # a parent the host never made
    _span(b"spanid01", trace=bytes(16)),             # another trace
    _span(b"spanid01", trace=b"short"),
    _span(b"short"),                                 # ids of the wrong size
    _span(bytes(8)),
    _span(b"spanid01", name=""),                     # names that are not plain words
    _span(b"spanid01", name="x" * 65),
    _span(b"spanid01", name="evil\x1b[31m"),
    _span(b"spanid01", start=10, end=5),             # ends before it starts
])
def test_host_refuses_guest_spans_it_did_not_ask_for(bad: agent_pb2.GuestSpan) -> None:
    """Unknown parents, other traces, bad ids, names or times: dropped."""
    assert _accept([bad]) == []


def test_host_refuses_loops_deep_chains_and_orphans_of_refused_parents() -> None:
    """A parent loop, a chain past MAX_DEPTH, a child of a refused span: dropped."""
    loop = [_span(b"aaaaaaaa", b"bbbbbbbb"), _span(b"bbbbbbbb", b"aaaaaaaa")]
    assert _accept(loop) == []
    chain = [_span(b"span%04d" % 0)] + [_span(b"span%04d" % i, b"span%04d" % (i - 1))
                                        for i in range(1, 20)]
    assert len(_accept(chain)) == guest.MAX_DEPTH
    orphan = [_span(b"parentid", name="bad\n"), _span(b"childid1", b"parentid")]
    assert _accept(orphan) == []


def test_host_exports_at_most_a_bounded_number_per_rpc() -> None:
    """1000 spans under one RPC: MAX_PER_WINDOW kept, then none for that RPC."""
    window = _window()
    many = [_span(b"%08d" % i) for i in range(1000)]
    assert len(_accept(many, window)) == guest.MAX_PER_WINDOW
    assert _accept([_span(b"onemore!")], window) == []  # the budget is per RPC, not per drain


def test_host_bounds_and_escapes_attributes() -> None:
    """Control characters escaped, long values cut, at most MAX_ATTRIBUTES kept."""
    attributes = {f"k{i}": "v" for i in range(20)} | {"Bad Key": "x"}
    (one,) = _accept([_span(b"spanid01", attributes={"a": "\x1b[2J\n", "b": "y" * 5000})])
    assert one.attributes["guest.a"] == "\\x1b[2J\\n"
    assert len(one.attributes["guest.b"]) < 200
    (two,) = _accept([_span(b"spanid02", attributes=attributes)])
    assert len(two.attributes) == guest.MAX_ATTRIBUTES
    assert all(k.startswith("guest.k") for k in two.attributes)


def test_guest_times_outside_the_rpc_span_are_moved_inside_keeping_lengths() -> None:
    """A guest clock an hour ahead: its spans are centred in the host's span,
    their order and lengths kept."""
    hour = 3600 * 10**9
    parent = _span(b"parentid", start=hour + 100, end=hour + 500)
    child = _span(b"childid1", b"parentid", name="crun", start=hour + 200, end=hour + 300)
    accepted = _accept([parent, child], _window(1000, 2000))
    (p, c) = accepted
    assert (p.start, p.end) == (1300, 1700)
    assert (c.start, c.end) == (1400, 1500)
    # Longer than the host's span (a clock running fast): clamped into it.
    (long,) = _accept([_span(b"longspan", start=0, end=10**12)], _window(1000, 2000))
    assert (long.start, long.end) == (1000, 2000)
    # A call still in flight ends at `now` at the latest.
    (open_,) = _accept([_span(b"openspan", start=0, end=10**12)], _window(1000, None), now=1500)
    assert (open_.start, open_.end) == (1000, 1500)


# --- configuration ----------------------------------------------------------

def test_tracing_is_off_by_default_and_the_endpoint_must_be_http() -> None:
    """Off by default; an endpoint that is no http(s) URL is refused with a hint."""
    config = parse({}, "test")
    assert config.runtime.enable_tracing is False
    assert config.runtime.tracing_endpoint == "http://127.0.0.1:4318/v1/traces"
    for good in ("https://collector.example:4318/v1/traces", "http://[::1]:4318/v1/traces"):
        parse({"runtime": {"tracing_endpoint": good}}, "test")
    for bad in ("127.0.0.1:4318", "grpc://localhost:4317", "http://", "file:///tmp/x",
                "http://a b:4318"):
        with pytest.raises(ConfigError, match="not an http\\(s\\) URL") as info:
            parse({"runtime": {"tracing_endpoint": bad}}, "test")
        assert "4318" in (info.value.hint or "")


@pytest.mark.parametrize(("given", "posted"), [
    ("http://jaeger:4318", "http://jaeger:4318/v1/traces"),
    ("http://jaeger:4318/", "http://jaeger:4318/v1/traces"),
    ("http://[::1]:4318", "http://[::1]:4318/v1/traces"),
    ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
    ("https://gateway.example/otlp/v1/traces", "https://gateway.example/otlp/v1/traces"),
])
def test_a_collectors_base_url_gets_the_traces_path(given: str, posted: str) -> None:
    """`http://jaeger:4318` works as Jaeger's docs write it: /v1/traces is added."""
    assert traces_url(given) == posted


def test_off_imports_no_opentelemetry() -> None:
    """Tracing off: the CLI, the shim and the core import no OpenTelemetry."""
    code = ("import sys; import pykata.cli.main, pykata.shim.cli, pykata.oci.cli, "
            "pykata.runtime.owner; print([m for m in sys.modules if 'opentelemetry' in m])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# --- the whole host path, against a real ttRPC server and OTLP receiver ---------

class _Agent:
    """The agent's tracing, served for real: each handler wrapped as the agent
    wraps it, GetTraceSpans the agent's own."""

    async def StartContainer(self, req: agent_pb2.StartContainerRequest,
                             ctx: RequestContext) -> empty_pb2.Empty:
        with spans.span("crun start", container=req.container_id):
            await asyncio.sleep(0.01)
        return empty_pb2.Empty()


@pytest.fixture
async def traced_agent() -> AsyncIterator[AgentClient]:
    server = Server()
    real = AgentService(cast(Any, None), cast(Any, None))
    server.register_methods(AGENT_SERVICE, {
        "StartContainer": (agent_pb2.StartContainerRequest,
                           _traced("StartContainer", _Agent().StartContainer)),
        "GetTraceSpans": (agent_pb2.GetTraceSpansRequest, real.GetTraceSpans),
    })
    host_end, guest_end = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=guest_end)
    serving = asyncio.ensure_future(server.serve_connection(reader, writer))
    agent = await AgentClient.over_socket(host_end)
    yield agent
    await agent.close()
    await server.aclose()
    await serving


async def test_guest_spans_arrive_under_the_host_rpc_span_over_otlp(
        traced_agent: AgentClient) -> None:
    """One pod trace: step → agent RPC → the guest's request → crun, decoded
    by an OTLP/HTTP receiver; guest spans inside their parents."""
    with OtlpReceiver() as receiver:
        backend = OtelBackend(receiver.endpoint, "pykata-test")
        with tracing.installed(backend):
            trace = tracing.pod_trace("pod")
            with tracing.span("container.start", trace):
                await traced_agent.start_container("c1")
            await traced_agent.start_container("untraced")  # outside every step
            tracing.end(trace)
            tracing.flush()
        receiver.wait_for("pod")
        (spans_of_pod,) = receiver.traces().values()
        names = sorted(s.name for s in spans_of_pod)
        assert names == ["agent StartContainer", "container.start", "crun start",
                         "guest StartContainer", "pod"]
        guest_spans = check_trace(spans_of_pod)
        assert {s.name for s in guest_spans} == {"guest StartContainer", "crun start"}
        crun = next(s for s in guest_spans if s.name == "crun start")
        assert crun.attributes["guest.container"] == "c1"
        assert {s.service for s in spans_of_pod} == {"pykata-test"}


async def test_without_a_current_step_no_span_and_no_drain(traced_agent: AgentClient) -> None:
    """An RPC outside every traced step sends no traceparent: the guest
    records nothing (so nothing waits in its buffer)."""
    with OtlpReceiver() as receiver:
        with tracing.installed(OtelBackend(receiver.endpoint, "pykata-test")):
            await traced_agent.start_container("c1")
            tracing.flush()
        assert receiver.spans == []
    assert spans.drain() == ([], 0)


# --- the pod's steps, over the fake VM and agent ----------------------------

@pytest.fixture
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    return root


async def test_a_pods_life_is_one_trace_of_its_steps(tmp_path: Path, run_root: Path) -> None:
    """Start, create, start, exec, kill, delete (the last container takes the
    pod): one trace, its root `pod`, every step under it and every agent RPC
    under a step; an agent without GetTraceSpans (this fake) changes nothing."""
    exporter = InMemorySpanExporter()
    with tracing.installed(OtelBackend("http://unused", "pykata-test", exporter)):
        pod, _source, _events = fake_pod(tmp_path)
        await pod.start()
        rootfs = tmp_path / "rootfs"
        rootfs.mkdir()
        mounts = bind_rootfs(rootfs)
        await pod.create_container("web", spec("sleep"), lambda _c: mounts, io=CapturedIO())
        await pod.start_process("web")
        await pod.exec("web", "e1", {"args": ["echo", "hi"], "cwd": "/"}, io=CapturedIO())
        await pod.kill("web", "", 9)
        await pod.wait("web")
        await pod.delete_container("web")
        tracing.flush()
    spans_out = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans_out}) == 1
    by_id = {s.context.span_id: s for s in spans_out}
    (root,) = [s for s in spans_out if s.parent is None]
    assert root.name == "pod" and (root.attributes or {})["pykata.pod"] == pod.id
    steps = {s.name for s in spans_out if s.parent is not None
             and s.parent.span_id == root.context.span_id}
    assert steps == {"pod.start", "container.create", "container.start", "exec.start",
                     "kill", "container.delete", "pod.teardown"}
    rpcs = [s for s in spans_out if s.name.startswith("agent ")]
    assert {"agent CreateSandbox", "agent CreateContainer", "agent StartContainer",
            "agent ExecProcess", "agent SignalProcess", "agent RemoveContainer",
            "agent DestroySandbox"} <= {s.name for s in rpcs}
    assert not {"agent WaitProcess", "agent GetOOMEvent"} & {s.name for s in rpcs}
    for rpc in rpcs:
        assert rpc.parent is not None and by_id[rpc.parent.span_id].name != "pod"


async def test_a_failed_start_ends_its_trace_with_the_error(tmp_path: Path,
                                                            run_root: Path) -> None:
    """A start that fails: the pod's root span and its start step end, marked failed."""
    exporter = InMemorySpanExporter()
    with tracing.installed(OtelBackend("http://unused", "pykata-test", exporter)):
        source = FakeSource(fail=HypervisorError("no QEMU"))
        pod, _source, _events = fake_pod(tmp_path, source=source)
        with pytest.raises(HypervisorError):
            await pod.start()
        tracing.flush()
    names = {s.name: s for s in exporter.get_finished_spans()}
    assert names["pod"].status.status_code is StatusCode.ERROR
    assert names["pod.start"].status.status_code is StatusCode.ERROR
