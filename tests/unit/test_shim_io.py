"""The shim's I/O: events to a real ttRPC events server, stdio FIFOs, the stdio relay."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from pykata.protocols import events_pb2, events_service_pb2
from pykata.runtime.agent_client import StreamEnd
from pykata.runtime.stdio import StdioRelay
from pykata.shim.events import EVENTS_SERVICE, NAMESPACE_KEY, EventPublisher, pack
from pykata.shim.fifo import FifoError, FifoReader, FifoWriter
from pykata.ttrpc import RequestContext, Server


async def _events_server(tmp_path: Path, forward: Any) -> tuple[Server, str]:
    """A ttRPC events service answering Forward with `forward`, and its address."""
    server = Server()
    server.register(EVENTS_SERVICE, "Forward", events_service_pb2.ForwardRequest, forward)
    address = str(tmp_path / "events.sock")
    await server.serve_unix(address)
    return server, address


async def test_events_arrive_in_order_with_namespace(tmp_path: Path) -> None:
    """Published events reach containerd's Forward in order, with topic and namespace."""
    received: list[tuple[str, str, str, list[str]]] = []

    async def forward(req: events_service_pb2.ForwardRequest,
                      ctx: RequestContext) -> empty_pb2.Empty:
        env = req.envelope
        received.append((env.topic, env.namespace, env.event.type_url,
                         ctx.metadata.get(NAMESPACE_KEY, [])))
        return empty_pb2.Empty()

    server, address = await _events_server(tmp_path, forward)
    publisher = EventPublisher(address, "k8s.io")
    try:
        publisher.publish(events_pb2.TaskStart(container_id="c", pid=1))
        publisher.publish(events_pb2.TaskExit(container_id="c", id="c", exit_status=3))
        publisher.publish(events_pb2.TaskDelete(container_id="c"))
        await publisher.flush()
    finally:
        await publisher.close()
        await server.aclose()
    assert [r[0] for r in received] == ["/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert all(r[1] == "k8s.io" and r[3] == ["k8s.io"] for r in received)
    assert received[1][2] == "containerd.events.TaskExit"


async def test_publisher_gives_up_quietly_without_containerd(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unreachable events address is retried, then given up, never raised."""
    caplog.set_level(logging.WARNING, logger="pykata.shim.events")
    publisher = EventPublisher(str(tmp_path / "nobody.sock"), "ns")
    publisher.publish(events_pb2.TaskOOM(container_id="c"))
    await publisher.flush(timeout=10)
    attempts = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(attempts) == 5, attempts
    assert all(f"publishing /tasks/oom (attempt {n})" in line
               for n, line in enumerate(attempts, 1)), attempts
    given_up = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert given_up == [f"gave up publishing /tasks/oom to {tmp_path / 'nobody.sock'}"]
    await publisher.close()


async def test_failed_publishes_close_their_connections(tmp_path: Path) -> None:
    """An events server that answers every Forward with an error: each retry's
    connection is closed, so the shim's descriptors do not pile up."""
    async def refuse(req: events_service_pb2.ForwardRequest,
                     ctx: RequestContext) -> empty_pb2.Empty:
        raise OSError("containerd is busy")

    server, address = await _events_server(tmp_path, refuse)
    publisher = EventPublisher(address, "ns")
    before = len(os.listdir("/proc/self/fd"))
    try:
        publisher.publish(events_pb2.TaskStart(container_id="c", pid=1))  # 5 attempts
        await publisher.flush(timeout=30)
        await asyncio.sleep(0.1)
        assert len(os.listdir("/proc/self/fd")) <= before + 1
    finally:
        await publisher.close()
        await server.aclose()


async def test_oom_events_are_coalesced_but_lifecycle_events_never_dropped(
    tmp_path: Path,
) -> None:
    """While containerd is slow, 10,000 OOM events for one container become
    one queued event; 300 exits and deletes all arrive, in order."""
    received: list[str] = []
    gate = asyncio.Event()

    async def forward(req: events_service_pb2.ForwardRequest,
                      ctx: RequestContext) -> empty_pb2.Empty:
        await gate.wait()
        received.append(req.envelope.topic)
        return empty_pb2.Empty()

    server, address = await _events_server(tmp_path, forward)
    publisher = EventPublisher(address, "ns")
    try:
        publisher.publish(events_pb2.TaskStart(container_id="c", pid=1))
        await asyncio.sleep(0.1)  # the start is in flight, held by the gate
        for _ in range(10_000):
            publisher.publish(events_pb2.TaskOOM(container_id="c"))
        for i in range(150):
            publisher.publish(events_pb2.TaskExit(container_id=f"t{i}", id=f"t{i}"))
            publisher.publish(events_pb2.TaskDelete(container_id=f"t{i}"))
        gate.set()
        await publisher.flush(timeout=60)
    finally:
        await publisher.close()
        await server.aclose()
    assert received.count("/tasks/oom") == 1
    assert received.count("/tasks/exit") == 150 and received.count("/tasks/delete") == 150
    assert publisher.dropped == 9_999


def test_event_any_uses_the_full_protobuf_name() -> None:
    """containerd's typeurl names events by full name, without a URL prefix."""
    assert pack(events_pb2.TaskOOM(container_id="c")).type_url == "containerd.events.TaskOOM"


async def test_fifo_writer_then_reader_sees_eof(tmp_path: Path) -> None:
    """Output written to a stdio FIFO reaches its reader, then end-of-file on close."""
    path = tmp_path / "out"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    writer = FifoWriter(str(path))
    await writer.write(b"hello")
    await writer.close()
    assert os.read(reader, 100) == b"hello"
    assert os.read(reader, 100) == b""
    os.close(reader)


async def test_fifo_reader_waits_for_a_late_writer(tmp_path: Path) -> None:
    """stdin opened before its writer: data once the writer comes, EOF after it leaves."""
    path = tmp_path / "in"
    os.mkfifo(path)
    reader = FifoReader(str(path))

    async def late_writer() -> None:
        await asyncio.sleep(0.2)
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"input")
        os.close(fd)

    task = asyncio.ensure_future(late_writer())
    assert await asyncio.wait_for(reader.read(), 5) == b"input"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await task
    reader.close()


def test_missing_fifo_is_named(tmp_path: Path) -> None:
    """A stdio path that does not exist fails with its name."""
    with pytest.raises(FifoError, match=str(tmp_path / "gone")):
        FifoWriter(str(tmp_path / "gone"))


class FakeAgent:
    """Just the stream calls of AgentClient, backed by lists."""

    def __init__(self, stdout: list[bytes]) -> None:
        self.stdout = list(stdout)
        self.stdin: list[bytes] = []
        self.stdin_closed = asyncio.Event()
        self.never_ending = False

    async def read_stream(self, stream: str, cid: str, exec_id: str, length: int) -> bytes:
        if stream == "stdout" and self.stdout:
            return self.stdout.pop(0)
        if self.never_ending:
            await asyncio.sleep(3600)
        raise StreamEnd()

    async def write_stdin(self, cid: str, exec_id: str, data: bytes) -> int:
        self.stdin.append(data)
        return len(data)

    async def close_stdin(self, cid: str, exec_id: str) -> None:
        self.stdin_closed.set()


async def test_relay_keeps_order_and_closes_stdin_after_input() -> None:
    """Output chunks arrive in order; input is forwarded, then stdin is closed."""
    agent = FakeAgent([b"a", b"b", b"c"])
    out: list[bytes] = []
    inputs = [b"x", b"y", b""]

    async def sink(data: bytes) -> None:
        out.append(data)

    async def source() -> bytes:
        return inputs.pop(0)

    relay = StdioRelay(agent, "c", "c")  # type: ignore[arg-type]
    relay.start(sink, None, source)
    await relay.drain(5)
    await asyncio.wait_for(agent.stdin_closed.wait(), 5)
    await relay.close()
    assert out == [b"a", b"b", b"c"]
    assert agent.stdin == [b"x", b"y"]


async def test_relay_without_input_closes_stdin_unless_terminal() -> None:
    """No stdin source: the process reads EOF at once; a terminal stays open."""
    plain = FakeAgent([])
    relay = StdioRelay(plain, "c", "c")  # type: ignore[arg-type]
    relay.start(None, None, None)
    await asyncio.wait_for(plain.stdin_closed.wait(), 5)
    await relay.close()
    tty = FakeAgent([])
    relay = StdioRelay(tty, "c", "c")  # type: ignore[arg-type]
    relay.start(None, None, None, terminal=True)
    await asyncio.sleep(0.1)
    assert not tty.stdin_closed.is_set()
    await relay.close()


async def test_drain_gives_up_after_its_timeout() -> None:
    """A stream that never ends does not hold drain past its timeout."""
    agent = FakeAgent([])
    agent.never_ending = True

    async def sink(data: bytes) -> None:
        pass

    relay = StdioRelay(agent, "c", "c")  # type: ignore[arg-type]
    relay.start(sink, None, None, terminal=True)
    started = time.monotonic()
    await asyncio.wait_for(relay.drain(0.2), 5)
    waited = time.monotonic() - started
    # It waited for the output as long as it was told to, and no longer.
    assert 0.2 <= waited < 2.0, waited
    await relay.close()


async def test_finish_input_lets_pending_input_through() -> None:
    """CloseIO waits for input already sent; a source that never ends is cut off."""
    agent = FakeAgent([])
    inputs = [b"late", b""]

    async def slow_source() -> bytes:
        await asyncio.sleep(0.1)
        return inputs.pop(0)

    relay = StdioRelay(agent, "c", "c")  # type: ignore[arg-type]
    relay.start(None, None, slow_source)
    assert await relay.finish_input(5) is True
    assert agent.stdin == [b"late"]
    await relay.close()

    async def endless() -> bytes:
        await asyncio.sleep(3600)
        return b""

    relay = StdioRelay(FakeAgent([]), "c", "c")  # type: ignore[arg-type]
    relay.start(None, None, endless)
    assert await relay.finish_input(0.1) is False
    await relay.close()
