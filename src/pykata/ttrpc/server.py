"""The ttRPC server: unary methods registered by service and method name.

One `Server` serves any number of connections: unix sockets, already-listening
sockets (vsock in the guest), or a single byte stream such as a virtio-serial port
handed to `Server.serve_connection`. Each request runs in its own task, so a slow
handler never holds up the others and answers go out in completion order.

Only unary RPCs are supported. Data frames (type 3, streaming RPCs) are read,
logged and dropped: pykata does not use streaming RPCs yet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from google.protobuf.message import DecodeError, Message

from pykata.protocols import status_pb2, ttrpc_pb2
from pykata.ttrpc.errors import (
    Code,
    ConnectionClosedError,
    MessageTooLargeError,
    StatusError,
    status_from_exception,
)
from pykata.ttrpc.framing import Frame, MessageType, is_client_stream_id
from pykata.ttrpc.protocol import FrameStream

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=Message)
Handler = Callable[[Any, "RequestContext"], Awaitable[Message]]


class PeerCredentials(NamedTuple):
    """Who is at the other end of a unix socket connection (SO_PEERCRED: as
    the kernel recorded it when the peer connected)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(writer: asyncio.StreamWriter) -> PeerCredentials | None:
    """The peer of a unix socket connection; None for any other transport."""
    sock = writer.get_extra_info("socket")
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return PeerCredentials(*struct.unpack("3i", raw))


class RequestContext(NamedTuple):
    """What a handler knows about the request besides its message.

    ``deadline`` is in event-loop time (``loop.time()``), computed from the
    request's ``timeout_nano`` when it arrived; None when the caller set no timeout.
    The server enforces it: the handler is cancelled and DEADLINE_EXCEEDED is sent.
    """

    service: str
    method: str
    metadata: dict[str, list[str]]
    deadline: float | None
    stream_id: int
    # The caller, on a unix socket (None elsewhere).
    peer: PeerCredentials | None = None

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), None without one."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()


class _Method(NamedTuple):
    request_type: type[Message]
    handler: Handler


class _Connection:
    """Book-keeping for one served connection."""

    def __init__(self, frames: FrameStream, peer: PeerCredentials | None = None) -> None:
        self.frames = frames
        self.peer = peer
        self.handlers: set[asyncio.Task[None]] = set()
        self.last_stream_id = 0
        self.finished = asyncio.Event()
        self.reader_task: asyncio.Task[None] | None = None

    def stop(self) -> None:
        if self.reader_task is not None:
            self.reader_task.cancel()


class Server:
    """A ttRPC server. Register methods, then serve connections; `aclose` to stop."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], _Method] = {}
        self._listeners: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._closing = False

    def register(
        self,
        service: str,
        method: str,
        request_type: type[RequestT],
        handler: Callable[[RequestT, RequestContext], Awaitable[Message]],
    ) -> None:
        """Serve ``service``/``method``: decode requests as ``request_type``, call ``handler``.

        The handler returns the response message, or raises `StatusError` to answer
        with a status; any other exception is answered via `status_from_exception`.
        """
        key = (service, method)
        if key in self._methods:
            raise ValueError(f"{service}/{method} is already registered")
        self._methods[key] = _Method(request_type, handler)

    def register_methods(
        self, service: str, methods: Mapping[str, tuple[type[Message], Handler]]
    ) -> None:
        """Register many methods of one service: ``{method: (request_type, handler)}``."""
        for method, (request_type, handler) in methods.items():
            self.register(service, method, request_type, handler)

    def register_object(
        self, service: str, implementation: object, request_types: Mapping[str, type[Message]]
    ) -> None:
        """Register ``implementation``'s coroutine methods named after the RPC methods.

        ``request_types`` maps each RPC method name to its request type; a missing or
        non-callable attribute fails here, at registration, not at the first call.
        """
        for method, request_type in request_types.items():
            handler = getattr(implementation, method)
            if not callable(handler):
                raise TypeError(f"{type(implementation).__name__}.{method} is not callable")
            self.register(service, method, request_type, handler)

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection until the peer closes it or the server closes.

        Works over any StreamReader/StreamWriter pair: sockets, or pipe and
        character-device transports (see `pykata.ttrpc.protocol.open_fd_streams`).
        Returns normally however the connection ends; problems are logged.
        """
        conn = _Connection(FrameStream(reader, writer), peer_credentials(writer))
        if self._closing:
            await conn.frames.aclose()
            return
        self._connections.add(conn)
        conn.reader_task = asyncio.get_running_loop().create_task(
            self._read_requests(conn), name="ttrpc-server-reader"
        )
        try:
            # wait() rather than awaiting the task: aclose() cancels the reader,
            # and that must end this call normally, not raise CancelledError here.
            await asyncio.wait([conn.reader_task])
        finally:
            await self._end_connection(conn)

    async def serve_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a unix socket at ``path``; return once it accepts connections."""
        self._check_open()
        self._listeners.append(await asyncio.start_unix_server(self.serve_connection, path=path))

    async def serve_socket(self, sock: socket.socket) -> None:
        """Accept connections on an already-listening stream socket (unix, vsock, ...)."""
        self._check_open()
        self._listeners.append(await asyncio.start_server(self.serve_connection, sock=sock))

    def stop_listening(self) -> None:
        """Stop accepting connections; those already served go on."""
        for listener in self._listeners:
            listener.close()

    async def aclose(self) -> None:
        """Stop accepting, cancel in-flight handlers and close every connection."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        connections = list(self._connections)
        for conn in connections:
            conn.stop()
        await asyncio.gather(*(conn.finished.wait() for conn in connections))
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("server is closed")

    async def _end_connection(self, conn: _Connection) -> None:
        # As containerd's server does, a connection's end cancels its requests:
        # their answers would have nowhere to go.
        tasks = [*conn.handlers]
        if conn.reader_task is not None:
            tasks.append(conn.reader_task)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                logger.error("ttrpc server task failed", exc_info=result)
        await conn.frames.aclose()
        self._connections.discard(conn)
        conn.finished.set()

    async def _read_requests(self, conn: _Connection) -> None:
        while True:
            try:
                frame = await conn.frames.read_frame()
            except MessageTooLargeError as exc:
                # The payload was discarded, so the connection is still in sync:
                # fail that stream only, as containerd's server does.
                logger.warning("rejecting oversized message: %s", exc)
                await self._send_status(conn, exc.stream_id or 0, Code.RESOURCE_EXHAUSTED, str(exc))
                continue
            except ConnectionClosedError as exc:
                logger.warning("ttrpc connection ended abruptly: %s", exc)
                return
            if frame is None:
                logger.debug("ttrpc peer closed the connection")
                return
            await self._on_frame(conn, frame)

    async def _on_frame(self, conn: _Connection, frame: Frame) -> None:
        header = frame.header
        if not is_client_stream_id(header.stream_id):
            # Answered on the offending stream id so the client can tell which
            # request was bad (containerd's server does the same).
            logger.warning("rejecting frame on stream %d: not odd", header.stream_id)
            await self._send_status(
                conn,
                header.stream_id,
                Code.INVALID_ARGUMENT,
                "stream id must be odd for client-initiated streams",
            )
        elif header.message_type is MessageType.REQUEST:
            await self._on_request(conn, frame)
        elif header.message_type is MessageType.DATA:
            logger.warning(
                "dropping data frame on stream %d: streaming RPCs are not supported",
                header.stream_id,
            )
        else:
            # Responses and unknown types are not for a server; containerd ignores
            # them (for forward compatibility), and so do we.
            logger.warning(
                "ignoring frame of type %d on stream %d from a client",
                header.type,
                header.stream_id,
            )

    async def _on_request(self, conn: _Connection, frame: Frame) -> None:
        stream_id = frame.header.stream_id
        if stream_id <= conn.last_stream_id:
            await self._send_status(
                conn,
                stream_id,
                Code.INVALID_ARGUMENT,
                "stream id cannot be re-used and must increase",
            )
            return
        conn.last_stream_id = stream_id
        try:
            request = ttrpc_pb2.Request.FromString(frame.payload)
        except DecodeError as exc:
            await self._send_status(
                conn, stream_id, Code.INVALID_ARGUMENT, f"undecodable request: {exc}"
            )
            return
        deadline = None
        if request.timeout_nano:
            deadline = asyncio.get_running_loop().time() + request.timeout_nano / 1e9
        task = asyncio.get_running_loop().create_task(
            self._handle(conn, stream_id, request, deadline),
            name=f"ttrpc {request.service}/{request.method} #{stream_id}",
        )
        conn.handlers.add(task)
        task.add_done_callback(conn.handlers.discard)

    async def _handle(
        self, conn: _Connection, stream_id: int, request: ttrpc_pb2.Request, deadline: float | None
    ) -> None:
        status, payload = await self._invoke(stream_id, request, deadline, conn.peer)
        await self._send_response(conn, stream_id, status, payload)

    async def _invoke(
        self, stream_id: int, request: ttrpc_pb2.Request, deadline: float | None,
        peer: PeerCredentials | None = None,
    ) -> tuple[status_pb2.Status, bytes]:
        name = f"{request.service}/{request.method}"
        method = self._methods.get((request.service, request.method))
        if method is None:
            return _status(Code.UNIMPLEMENTED, f"{name} is not implemented"), b""
        try:
            message = method.request_type.FromString(request.payload)
        except DecodeError as exc:
            return _status(Code.INVALID_ARGUMENT, f"{name}: undecodable request: {exc}"), b""
        context = RequestContext(
            request.service, request.method, _decode_metadata(request), deadline, stream_id,
            peer,
        )
        try:
            async with asyncio.timeout_at(deadline):
                response = await method.handler(message, context)
            if not isinstance(response, Message):
                raise StatusError(Code.INTERNAL, f"{name} returned {type(response).__name__}")
            return _status(Code.OK), response.SerializeToString()
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the server or the connection is going away: no answer
            # The handler let a CancelledError of its own escape; the request
            # itself was not cancelled, so it still gets an answer.
            return status_from_exception(exc), b""
        except Exception as exc:
            _log_handler_error(name, exc)
            return status_from_exception(exc), b""

    async def _send_status(
        self, conn: _Connection, stream_id: int, code: Code, message: str
    ) -> None:
        await self._send_response(conn, stream_id, _status(code, message), b"")

    async def _send_response(
        self, conn: _Connection, stream_id: int, status: status_pb2.Status, payload: bytes
    ) -> None:
        data = ttrpc_pb2.Response(status=status, payload=payload).SerializeToString()
        try:
            try:
                await conn.frames.write_frame(stream_id, MessageType.RESPONSE, data)
            except MessageTooLargeError as exc:
                logger.error("response on stream %d too large: %s", stream_id, exc)
                error = ttrpc_pb2.Response(
                    status=_status(Code.RESOURCE_EXHAUSTED, f"response {exc}")
                )
                await conn.frames.write_frame(
                    stream_id, MessageType.RESPONSE, error.SerializeToString()
                )
        except ConnectionClosedError as exc:
            logger.debug("cannot answer stream %d: %s", stream_id, exc)


def _status(code: Code, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=int(code), message=message)


def _decode_metadata(request: ttrpc_pb2.Request) -> dict[str, list[str]]:
    metadata: dict[str, list[str]] = {}
    for pair in request.metadata:
        metadata.setdefault(pair.key, []).append(pair.value)
    return metadata


def _log_handler_error(name: str, exc: Exception) -> None:
    if isinstance(exc, StatusError):
        logger.debug("%s answered %s", name, exc)
    elif isinstance(exc, TimeoutError):
        logger.info("%s missed its deadline", name)
    else:
        # The full traceback stays in our log; the peer only gets str(exc).
        logger.error("%s failed", name, exc_info=exc)
