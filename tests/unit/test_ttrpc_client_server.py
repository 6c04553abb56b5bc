"""Tests for pykata.ttrpc's Client and Server, talking over real sockets and pipes."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pykata.protocols import status_pb2, ttrpc_pb2
from pykata.ttrpc import (
    MAX_MESSAGE_SIZE,
    Client,
    ClientState,
    Code,
    ConnectionClosedError,
    MessageTooLargeError,
    RequestContext,
    Server,
    StatusError,
    open_fd_streams,
)

KeyValue = ttrpc_pb2.KeyValue
StringList = ttrpc_pb2.StringList
SERVICE = "pykata.test.Echo"
# Every test is bounded so a broken client or server fails it instead of hanging it.
TEST_TIMEOUT = 10


class EchoService:
    """Handlers exercising every path of the server; request/response are KeyValue."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def Echo(self, request: KeyValue, ctx: RequestContext) -> KeyValue:
        return KeyValue(key=request.key, value=request.value)

    async def Sleep(self, request: KeyValue, ctx: RequestContext) -> KeyValue:
        self.started.set()
        try:
            await asyncio.sleep(float(request.value))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished.append(request.key)
        return KeyValue(key=request.key)

    async def Fail(self, request: KeyValue, ctx: RequestContext) -> KeyValue:
        raise StatusError(Code.NOT_FOUND, f"no such thing: {request.key}")

    async def Crash(self, request: KeyValue, ctx: RequestContext) -> KeyValue:
        raise RuntimeError("boom")

    async def Metadata(self, request: KeyValue, ctx: RequestContext) -> StringList:
        return StringList(list=[f"{k}={v}" for k, vs in ctx.metadata.items() for v in vs])

    async def Deadline(self, request: KeyValue, ctx: RequestContext) -> KeyValue:
        remaining = ctx.time_remaining()
        return KeyValue(key=ctx.method, value="none" if remaining is None else repr(remaining))

    async def Huge(self, request: KeyValue, ctx: RequestContext) -> KeyValue:
        return KeyValue(value="x" * (MAX_MESSAGE_SIZE + 1))


METHODS = ["Echo", "Sleep", "Fail", "Crash", "Metadata", "Deadline", "Huge"]


def make_server() -> tuple[Server, EchoService]:
    """A Server with the EchoService registered."""
    service = EchoService()
    server = Server()
    server.register_object(SERVICE, service, dict.fromkeys(METHODS, KeyValue))
    return server, service


@asynccontextmanager
async def served_socketpair(server: Server) -> AsyncIterator[tuple[Client, asyncio.Task[None]]]:
    """A Client connected over a socketpair to ``server.serve_connection``."""
    ours, theirs = socket.socketpair()
    task = asyncio.create_task(server.serve_connection(*await asyncio.open_connection(sock=theirs)))
    client = Client(*await asyncio.open_connection(sock=ours))
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            yield client, task
    finally:
        async with asyncio.timeout(TEST_TIMEOUT):
            await client.aclose()
            await server.aclose()
            await task


@asynccontextmanager
async def raw_peer_of(server: Server) -> AsyncIterator[RawPeer]:
    """A hand-driven client socket connected to ``server.serve_connection``."""
    ours, theirs = socket.socketpair()
    task = asyncio.create_task(server.serve_connection(*await asyncio.open_connection(sock=theirs)))
    peer = RawPeer(*await asyncio.open_connection(sock=ours))
    peer.serve_task = task
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            yield peer
    finally:
        peer.writer.close()
        async with asyncio.timeout(TEST_TIMEOUT):
            await server.aclose()
            await task


@asynccontextmanager
async def client_with_raw_server() -> AsyncIterator[tuple[Client, RawPeer]]:
    """A Client whose peer is a hand-driven server socket."""
    ours, theirs = socket.socketpair()
    client = Client(*await asyncio.open_connection(sock=ours))
    peer = RawPeer(*await asyncio.open_connection(sock=theirs))
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            yield client, peer
    finally:
        peer.writer.close()
        async with asyncio.timeout(TEST_TIMEOUT):
            await client.aclose()


class RawPeer:
    """The far end of a connection, speaking frames built by hand with struct."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.serve_task: asyncio.Task[None] | None = None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_frame(self, stream_id: int, message_type: int, payload: bytes) -> None:
        await self.send(struct.pack(">IIBB", len(payload), stream_id, message_type, 0) + payload)

    async def send_request(
        self, stream_id: int, method: str, payload: bytes, timeout_nano: int = 0
    ) -> None:
        request = ttrpc_pb2.Request(
            service=SERVICE, method=method, payload=payload, timeout_nano=timeout_nano
        )
        await self.send_frame(stream_id, 1, request.SerializeToString())

    async def read_frame(self) -> tuple[int, int, bytes]:
        length, stream_id, message_type, _ = struct.unpack(
            ">IIBB", await asyncio.wait_for(self.reader.readexactly(10), 5)
        )
        return stream_id, message_type, await self.reader.readexactly(length)

    async def read_response(self) -> tuple[int, ttrpc_pb2.Response]:
        stream_id, message_type, payload = await self.read_frame()
        assert message_type == 2
        return stream_id, ttrpc_pb2.Response.FromString(payload)

    async def answer(self, stream_id: int, message: KeyValue) -> None:
        response = ttrpc_pb2.Response(
            status=status_pb2.Status(code=0), payload=message.SerializeToString()
        )
        await self.send_frame(stream_id, 2, response.SerializeToString())


async def echo(client: Client, key: str) -> KeyValue:
    """Call Echo with ``key`` and return the response."""
    return await client.call(SERVICE, "Echo", KeyValue(key=key), KeyValue)


# --- calls over each kind of transport ---------------------------------------------


async def test_call_over_unix_socket(tmp_path: Path) -> None:
    """A call over a unix socket returns the handler's response."""
    server, _ = make_server()
    path = tmp_path / "t.sock"
    async with asyncio.timeout(TEST_TIMEOUT), server:
        await server.serve_unix(path)
        async with await Client.connect_unix(path) as client:
            assert (await echo(client, "hello")).key == "hello"
            assert client.state is ClientState.RUNNING
        assert client.closed


async def test_call_over_socketpair() -> None:
    """A call over a socketpair served by serve_connection returns the response."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        response = await client.call(SERVICE, "Echo", KeyValue(key="k", value="v"), KeyValue)
    assert (response.key, response.value) == ("k", "v")


async def test_call_over_pipe_pair() -> None:
    """serve_connection works over pipe transports, as the agent's virtio-serial port needs."""
    server, _ = make_server()
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    async with asyncio.timeout(TEST_TIMEOUT), server:
        task = asyncio.create_task(server.serve_connection(*await open_fd_streams(up_r, down_w)))
        client = Client(*await open_fd_streams(down_r, up_w))
        assert (await echo(client, "through pipes")).key == "through pipes"
        await client.aclose()
        await task  # the server sees EOF and ends the connection


async def test_serve_socket_accepts_many_connections(tmp_path: Path) -> None:
    """A server given a listening socket serves several clients at once."""
    server, _ = make_server()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "l.sock")
    listener.bind(path)
    listener.listen()
    async with asyncio.timeout(TEST_TIMEOUT):
        await server.serve_socket(listener)
        clients = [await Client.connect_unix(path) for _ in range(3)]
        answers = await asyncio.gather(*(echo(c, f"c{i}") for i, c in enumerate(clients)))
        assert [a.key for a in answers] == ["c0", "c1", "c2"]
        await server.aclose()
        for client in clients:
            await client.wait_closed()
            assert client.closed


async def test_concurrent_calls_answered_out_of_order() -> None:
    """Many calls in flight on one connection each get their own answer, in any order."""
    server, service = make_server()
    delays = {f"call{i}": (20 - i) * 0.02 for i in range(20)}
    async with served_socketpair(server) as (client, _task):
        results = await asyncio.gather(
            *(
                client.call(SERVICE, "Sleep", KeyValue(key=k, value=str(d)), KeyValue)
                for k, d in delays.items()
            )
        )
    assert [r.key for r in results] == list(delays)
    # The server really answered out of order: the last request finished first.
    assert service.finished == list(reversed(delays))


# --- metadata and deadlines ----------------------------------------------------------


async def test_metadata_reaches_handler() -> None:
    """Metadata, including several values for one key, arrives as dict[str, list[str]]."""
    server, _ = make_server()
    metadata = {"containerd-namespace-ttrpc": "k8s.io", "multi": ["a", "b"]}
    async with served_socketpair(server) as (client, _task):
        response = await client.call(SERVICE, "Metadata", KeyValue(), StringList, metadata=metadata)
    assert list(response.list) == ["containerd-namespace-ttrpc=k8s.io", "multi=a", "multi=b"]


async def test_timeout_reaches_handler_deadline() -> None:
    """A client timeout travels as timeout_nano and becomes the handler's deadline."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        timed = await client.call(SERVICE, "Deadline", KeyValue(), KeyValue, timeout=5)
        untimed = await client.call(SERVICE, "Deadline", KeyValue(), KeyValue)
    assert 4.0 < float(timed.value) <= 5.0
    assert untimed.value == "none"


async def test_slow_handler_with_client_timeout_gives_deadline_exceeded() -> None:
    """A call outliving its timeout raises StatusError(DEADLINE_EXCEEDED); the client lives on."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StatusError) as info:
            await client.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue, timeout=0.1)
        assert info.value.code is Code.DEADLINE_EXCEEDED
        assert loop.time() - started < 5
        assert (await echo(client, "after")).key == "after"


async def test_server_enforces_deadline_on_its_own() -> None:
    """With timeout_nano set, the server cancels the handler and answers DEADLINE_EXCEEDED."""
    server, service = make_server()
    async with raw_peer_of(server) as peer:
        payload = KeyValue(value="30").SerializeToString()
        await peer.send_request(1, "Sleep", payload, timeout_nano=50_000_000)
        stream_id, response = await peer.read_response()
    assert stream_id == 1
    assert response.status.code == Code.DEADLINE_EXCEEDED
    assert service.cancelled.is_set()


# --- statuses -----------------------------------------------------------------------


async def test_status_error_reaches_client() -> None:
    """A handler's StatusError arrives at the client with its code and message."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        with pytest.raises(StatusError) as info:
            await client.call(SERVICE, "Fail", KeyValue(key="box"), KeyValue)
    assert info.value.code is Code.NOT_FOUND
    assert info.value.message == "no such thing: box"


async def test_generic_exception_gives_unknown(caplog: pytest.LogCaptureFixture) -> None:
    """Any other handler exception is UNKNOWN with str(exc); the traceback is only logged."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        with pytest.raises(StatusError) as info:
            await client.call(SERVICE, "Crash", KeyValue(), KeyValue)
    assert (info.value.code, info.value.message) == (Code.UNKNOWN, "boom")
    assert any(r.exc_info and r.levelno == logging.ERROR for r in caplog.records)


@pytest.mark.parametrize(("service", "method"), [(SERVICE, "Nope"), ("no.Such", "Echo")])
async def test_unknown_method_gives_unimplemented(service: str, method: str) -> None:
    """An unregistered service or method is answered UNIMPLEMENTED."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        with pytest.raises(StatusError) as info:
            await client.call(service, method, KeyValue(), KeyValue)
    assert info.value.code is Code.UNIMPLEMENTED
    assert f"{service}/{method}" in info.value.message


async def test_handler_response_too_large_gives_resource_exhausted() -> None:
    """A response above 4 MiB is replaced by RESOURCE_EXHAUSTED instead of being sent."""
    server, _ = make_server()
    async with served_socketpair(server) as (client, _task):
        with pytest.raises(StatusError) as info:
            await client.call(SERVICE, "Huge", KeyValue(), KeyValue)
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        assert (await echo(client, "still fine")).key == "still fine"


# --- hand-built and malformed frames to the server -----------------------------------


async def test_hand_built_request_frame_is_answered() -> None:
    """A request packed by hand with struct gets a well-formed OK response on its stream."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        request = ttrpc_pb2.Request(
            service=SERVICE,
            method="Echo",
            payload=KeyValue(key="interop").SerializeToString(),
            metadata=[KeyValue(key="containerd-namespace-ttrpc", value="default")],
        ).SerializeToString()
        await peer.send(struct.pack(">IIBB", len(request), 1, 1, 0) + request)
        stream_id, message_type, payload = await peer.read_frame()
    assert (stream_id, message_type) == (1, 2)
    response = ttrpc_pb2.Response.FromString(payload)
    assert response.HasField("status")
    assert response.status.code == 0
    assert KeyValue.FromString(response.payload).key == "interop"


async def test_undecodable_payload_gives_invalid_argument() -> None:
    """A request whose payload is not a valid request message is answered INVALID_ARGUMENT."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send_request(1, "Echo", b"\x0a\x05ab")  # field 1 claims 5 bytes, has 2
        stream_id, response = await peer.read_response()
    assert stream_id == 1
    assert response.status.code == Code.INVALID_ARGUMENT


async def test_undecodable_request_envelope_gives_invalid_argument() -> None:
    """A request frame whose payload is not a ttrpc.Request is answered INVALID_ARGUMENT."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send_frame(1, 1, b"\xff\xff\xff")
        stream_id, response = await peer.read_response()
        await peer.send_request(3, "Echo", KeyValue(key="next").SerializeToString())
        next_id, next_response = await peer.read_response()
    assert (stream_id, response.status.code) == (1, Code.INVALID_ARGUMENT)
    assert (next_id, next_response.status.code) == (3, Code.OK)


async def test_garbage_header_of_unknown_type_is_skipped() -> None:
    """A frame of an unknown type is skipped by its length; the next request is served."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send(b"\x00\x00\x00\x04\xde\xad\xbe\xef\x7f\x99" + b"junk")
        await peer.send_request(1, "Echo", KeyValue(key="after junk").SerializeToString())
        stream_id, response = await peer.read_response()
    assert (stream_id, response.status.code) == (1, Code.OK)
    assert KeyValue.FromString(response.payload).key == "after junk"


async def test_garbage_bytes_then_close_end_the_connection_cleanly() -> None:
    """Text that is not ttRPC at all, then a close, ends serve_connection without error."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        peer.writer.close()
        assert peer.serve_task is not None
        await asyncio.wait_for(peer.serve_task, 5)
        assert peer.serve_task.exception() is None


async def test_response_frame_sent_to_server_is_ignored() -> None:
    """A response-type frame from a client is dropped and the connection keeps serving."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.answer(1, KeyValue(key="not for you"))
        await peer.send_request(3, "Echo", KeyValue(key="real").SerializeToString())
        stream_id, response = await peer.read_response()
    assert stream_id == 3
    assert KeyValue.FromString(response.payload).key == "real"


@pytest.mark.parametrize("stream_id", [0, 2, 0xFFFF_FFFE])
async def test_even_stream_id_gets_invalid_argument(stream_id: int) -> None:
    """A zero or even stream id is answered INVALID_ARGUMENT on that same stream id."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send_request(stream_id, "Echo", b"")
        answered_id, response = await peer.read_response()
        await peer.send_request(1, "Echo", KeyValue(key="odd").SerializeToString())
        next_id, next_response = await peer.read_response()
    assert (answered_id, response.status.code) == (stream_id, Code.INVALID_ARGUMENT)
    assert (next_id, next_response.status.code) == (1, Code.OK)


async def test_reused_stream_id_gets_invalid_argument() -> None:
    """Stream ids must increase: re-using one is answered INVALID_ARGUMENT."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send_request(5, "Echo", b"")
        first = await peer.read_response()
        await peer.send_request(5, "Echo", b"")
        second = await peer.read_response()
    assert first[1].status.code == Code.OK
    assert (second[0], second[1].status.code) == (5, Code.INVALID_ARGUMENT)


async def test_data_frame_is_dropped() -> None:
    """A data frame (streaming RPCs are unsupported) is dropped; requests still work."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send_frame(1, 3, b"stream data")
        await peer.send_request(3, "Echo", KeyValue(key="unary").SerializeToString())
        stream_id, response = await peer.read_response()
    assert (stream_id, response.status.code) == (3, Code.OK)


async def test_oversized_request_gets_resource_exhausted_and_connection_survives() -> None:
    """A 4 MiB + 1 frame is discarded and answered RESOURCE_EXHAUSTED; the next call works."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        size = MAX_MESSAGE_SIZE + 1
        await peer.send(struct.pack(">IIBB", size, 1, 1, 0) + b"\x00" * size)
        stream_id, response = await peer.read_response()
        await peer.send_request(3, "Echo", KeyValue(key="normal").SerializeToString())
        next_id, next_response = await peer.read_response()
    assert (stream_id, response.status.code) == (1, Code.RESOURCE_EXHAUSTED)
    assert (next_id, next_response.status.code) == (3, Code.OK)
    assert KeyValue.FromString(next_response.payload).key == "normal"


@pytest.mark.parametrize(
    ("data", "missing"),
    [
        (b"\x00\x00\x00\x10", "6 bytes missing"),
        (struct.pack(">IIBB", 100, 1, 1, 0) + b"x" * 30, "70 bytes missing"),
    ],
    ids=["mid-header", "mid-payload"],
)
async def test_peer_disconnecting_mid_frame_ends_connection_cleanly(
    data: bytes, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client vanishing inside a frame ends serve_connection normally, logging what was lost."""
    server, _ = make_server()
    async with raw_peer_of(server) as peer:
        await peer.send(data)
        peer.writer.close()
        assert peer.serve_task is not None
        await asyncio.wait_for(peer.serve_task, 5)
        assert peer.serve_task.exception() is None
    assert any(missing in r.getMessage() for r in caplog.records)


# --- the client facing a misbehaving or vanishing server ------------------------------


async def test_client_refuses_oversized_request() -> None:
    """A request above 4 MiB raises before any byte is written; the client stays usable."""
    async with client_with_raw_server() as (client, peer):
        big = KeyValue(value="x" * MAX_MESSAGE_SIZE)
        with pytest.raises(MessageTooLargeError):
            await client.call(SERVICE, "Echo", big, KeyValue)
        call = asyncio.create_task(echo(client, "small"))
        stream_id, message_type, payload = await peer.read_frame()
        assert message_type == 1
        assert len(payload) < 100  # the first bytes on the wire are the small request
        await peer.answer(stream_id, KeyValue(key="small"))
        assert (await call).key == "small"


async def test_pending_calls_fail_when_server_vanishes() -> None:
    """Every pending call fails with ConnectionClosedError once the server goes away."""
    async with client_with_raw_server() as (client, peer):
        calls = [asyncio.create_task(echo(client, str(i))) for i in range(3)]
        for _ in calls:
            await peer.read_frame()
        peer.writer.close()
        for call in calls:
            with pytest.raises(ConnectionClosedError) as info:
                await call
            assert isinstance(info.value.__cause__, ConnectionClosedError)
        await asyncio.wait_for(client.wait_closed(), 5)
        assert client.closed
        with pytest.raises(ConnectionClosedError):
            await echo(client, "too late")


async def test_pending_call_fails_when_server_vanishes_mid_response() -> None:
    """A response cut off mid-payload fails the call, chained to the missing-bytes cause."""
    async with client_with_raw_server() as (client, peer):
        call = asyncio.create_task(echo(client, "x"))
        stream_id, _, _ = await peer.read_frame()
        await peer.send(struct.pack(">IIBB", 50, stream_id, 2, 0) + b"\x00" * 10)
        peer.writer.close()
        with pytest.raises(ConnectionClosedError) as info:
            await call
    assert "40 bytes missing" in str(info.value.__cause__)
    assert client.close_cause is info.value.__cause__


async def test_response_for_unknown_stream_is_dropped() -> None:
    """A response nobody waits for is dropped without disturbing the reader."""
    async with client_with_raw_server() as (client, peer):
        call = asyncio.create_task(echo(client, "wanted"))
        stream_id, _, _ = await peer.read_frame()
        await peer.answer(99, KeyValue(key="stray"))
        await peer.send_frame(stream_id, 3, b"data frame")
        await peer.answer(stream_id, KeyValue(key="wanted"))
        assert (await call).key == "wanted"


async def test_client_fails_only_the_stream_with_oversized_response() -> None:
    """An oversized response fails its call with RESOURCE_EXHAUSTED; later calls work."""
    async with client_with_raw_server() as (client, peer):
        call = asyncio.create_task(echo(client, "big"))
        stream_id, _, _ = await peer.read_frame()
        size = MAX_MESSAGE_SIZE + 1
        await peer.send(struct.pack(">IIBB", size, stream_id, 2, 0) + b"\x00" * size)
        with pytest.raises(StatusError) as info:
            await call
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        call = asyncio.create_task(echo(client, "next"))
        next_id, _, _ = await peer.read_frame()
        await peer.answer(next_id, KeyValue(key="next"))
        assert (await call).key == "next"
        assert next_id == stream_id + 2


async def test_server_closing_fails_pending_calls() -> None:
    """Closing the server cancels in-flight handlers and fails the client's pending calls."""
    server, service = make_server()
    async with served_socketpair(server) as (client, task):
        call = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue))
        await asyncio.wait_for(service.started.wait(), 5)
        await server.aclose()
        with pytest.raises(ConnectionClosedError):
            await call
        assert service.cancelled.is_set()
        await asyncio.wait_for(task, 5)


async def test_client_aclose_fails_pending_calls() -> None:
    """Closing the client fails its own pending calls and refuses new ones."""
    server, service = make_server()
    async with served_socketpair(server) as (client, _task):
        call = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue))
        await asyncio.wait_for(service.started.wait(), 5)
        await client.aclose()
        with pytest.raises(ConnectionClosedError):
            await call
        assert client.state is ClientState.CLOSED
        assert client.close_cause is None
        with pytest.raises(ConnectionClosedError):
            await echo(client, "closed")


# --- registration ---------------------------------------------------------------------


def test_register_twice_is_refused() -> None:
    """Registering the same service/method twice is a programming error."""
    server, service = make_server()
    with pytest.raises(ValueError, match="already registered"):
        server.register(SERVICE, "Echo", KeyValue, service.Echo)


def test_register_object_checks_methods_exist() -> None:
    """register_object fails at registration when the object lacks a method."""
    with pytest.raises(AttributeError):
        Server().register_object(SERVICE, EchoService(), {"Missing": KeyValue})


async def test_register_methods_from_a_dict() -> None:
    """register_methods serves every (request type, handler) pair of a dict."""
    server = Server()
    service = EchoService()
    server.register_methods("dict.Service", {"Echo": (KeyValue, service.Echo)})
    async with served_socketpair(server) as (client, _task):
        response = await client.call("dict.Service", "Echo", KeyValue(key="d"), KeyValue)
    assert response.key == "d"


async def test_a_client_closed_at_once_closes_its_connection() -> None:
    """A client closed before its reader ever ran still closes its transport:
    the event loop stops watching the descriptor, and the socket is closed
    (the VM cache closes a warm VM's agent client so, at hand-over)."""
    import socket

    from pykata.ttrpc import Client

    ours, theirs = socket.socketpair()
    fd = ours.fileno()
    reader, writer = await asyncio.open_connection(sock=ours)
    client = Client(reader, writer)
    await client.aclose()
    assert fd not in asyncio.get_running_loop()._selector.get_map()  # type: ignore[attr-defined]
    assert ours.fileno() == -1 and client.closed
    assert theirs.recv(1) == b""  # the other end sees the close
    theirs.close()
