"""The ttRPC client: unary calls multiplexed over one connection.

Requests go out without waiting for earlier answers; a background reader task
matches each response to its call by stream id, so any number of calls can be in
flight on one connection and the server may answer them in any order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import DecodeError, Message

from pykata.protocols import ttrpc_pb2
from pykata.ttrpc.errors import (
    Code,
    ConnectionClosedError,
    MessageTooLargeError,
    ProtocolError,
    StatusError,
)
from pykata.ttrpc.framing import MAX_STREAM_ID, Frame, MessageType
from pykata.ttrpc.protocol import FrameStream

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)

ResponseT = TypeVar("ResponseT", bound=Message)
_DROP_LOG_INTERVAL = 10.0
Metadata = Mapping[str, str | Sequence[str]]


class ClientState(enum.Enum):
    """Lifecycle of a `Client`: RUNNING from construction, CLOSED once the connection is gone."""

    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class Client:
    """A ttRPC client over one connection.

    Construct it inside a running event loop, from a connected reader/writer pair
    or with `connect_unix`; it starts reading responses at once. When the
    connection drops, every pending call fails with `ConnectionClosedError` chained
    to the root cause, and `wait_closed` returns.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 *, first_stream_id: int = 1) -> None:
        """`first_stream_id` continues a connection another client began (a
        server refuses a stream id it has seen): see `next_stream_id`."""
        if first_stream_id < 1 or first_stream_id % 2 == 0 or first_stream_id > MAX_STREAM_ID:
            raise ValueError(f"client stream ids are odd and positive, not {first_stream_id}")
        self._frames = FrameStream(reader, writer)
        self._state = ClientState.RUNNING
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._next_stream_id = first_stream_id  # client-initiated streams are odd: 1, 3, 5, ...
        self._close_cause: BaseException | None = None
        self._closed = asyncio.Event()
        # Frames nobody waits for (a hostile peer can send them without end):
        # counted, and logged at most once per _DROP_LOG_INTERVAL.
        self.dropped_frames = 0
        self._drop_logged_at = float("-inf")
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_responses(), name="ttrpc-client-reader"
        )

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str]) -> Client:
        """Connect to a ttRPC server listening on the unix socket at ``path``."""
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @property
    def next_stream_id(self) -> int:
        """The id the next call will use."""
        return self._next_stream_id

    @property
    def state(self) -> ClientState:
        """Where the client is in its lifecycle."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once the connection is gone (closed by us or lost)."""
        return self._state is ClientState.CLOSED

    @property
    def close_cause(self) -> BaseException | None:
        """Why the connection ended: the error that ended it, None after `aclose`."""
        return self._close_cause

    async def wait_closed(self) -> None:
        """Return once the connection is gone, for owners watching for a vanished peer."""
        await self._closed.wait()

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResponseT:
        """Call ``service``/``method`` with ``request``; return the decoded response.

        ``timeout`` (seconds) is sent as the request's ``timeout_nano`` and also
        bounds the local wait; running out raises `StatusError` with
        DEADLINE_EXCEEDED, the same error a server-side deadline produces, so
        callers catch one type. A non-OK response status raises `StatusError`; a
        lost connection `ConnectionClosedError`; a request above the 4 MiB limit
        `MessageTooLargeError` before anything is sent.
        """
        if self._state is not ClientState.RUNNING:
            raise ConnectionClosedError(f"client is {self._state.value}") from self._close_cause
        if timeout is not None and timeout <= 0:
            raise StatusError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no time left")
        envelope = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=0 if timeout is None else max(1, int(timeout * 1e9)),
            metadata=_encode_metadata(metadata),
        )
        payload = await self._roundtrip(envelope.SerializeToString(), service, method, timeout)
        return _decode_response(payload, response_type, service, method)

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with `ConnectionClosedError`."""
        if self._state is ClientState.RUNNING:
            self._state = ClientState.CLOSING
            self._reader_task.cancel()
        await asyncio.wait([self._reader_task])
        if not self._closed.is_set():
            # Cancelled before its first step, the reader never shut down:
            # the transport (and the loop's watch of its descriptor) stays.
            await self._shutdown(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _roundtrip(
        self, data: bytes, service: str, method: str, limit: float | None
    ) -> bytes:
        stream_id = self._allocate_stream_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            async with asyncio.timeout(limit):
                await self._frames.write_frame(stream_id, MessageType.REQUEST, data)
                return await future
        except TimeoutError as exc:
            raise StatusError(
                Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response within {limit}s"
            ) from exc
        finally:
            # A response arriving after this point is for a call nobody waits on
            # any more; the reader logs and drops it.
            self._pending.pop(stream_id, None)

    def _allocate_stream_id(self) -> int:
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise ProtocolError("stream ids exhausted on this connection; reconnect")
        self._next_stream_id += 2
        return stream_id

    async def _read_responses(self) -> None:
        cause: BaseException | None = None
        try:
            while True:
                try:
                    frame = await self._frames.read_frame()
                except MessageTooLargeError as exc:
                    # The payload was skipped; only that call fails (containerd's
                    # client routes this status error to the stream the same way).
                    self._fail_stream(exc.stream_id, StatusError(Code.RESOURCE_EXHAUSTED, str(exc)))
                    continue
                if frame is None:
                    cause = ConnectionClosedError("server closed the connection")
                    break
                self._dispatch(frame)
        except asyncio.CancelledError:
            await self._shutdown(None)  # aclose(): a deliberate close has no cause
            raise
        except Exception as exc:  # the root cause every pending call is chained to
            cause = exc
        await self._shutdown(cause)

    def _dispatch(self, frame: Frame) -> None:
        header = frame.header
        if header.message_type is not MessageType.RESPONSE:
            # Data frames belong to streaming RPCs, which pykata does not issue;
            # anything else is not meant for a client. Skipping keeps us in sync.
            self._drop(f"a frame of type {header.type} on stream {header.stream_id}")
            return
        future = self._pending.get(header.stream_id)
        if future is None:
            if header.stream_id < self._next_stream_id:
                # An answer to a call that timed out: expected now and then.
                logger.debug("dropping response for stream %d: no call waits on it",
                             header.stream_id)
            else:
                self._drop(f"a response for stream {header.stream_id}, never called")
            return
        if not future.done():
            future.set_result(frame.payload)

    def _drop(self, what: str) -> None:
        self.dropped_frames += 1
        now = asyncio.get_running_loop().time()
        if now - self._drop_logged_at >= _DROP_LOG_INTERVAL:
            self._drop_logged_at = now
            logger.warning("dropping frames nobody waits for (%d so far; latest: %s)",
                           self.dropped_frames, what)

    def _fail_stream(self, stream_id: int | None, error: Exception) -> None:
        future = self._pending.get(stream_id) if stream_id is not None else None
        if future is None:
            self._drop(f"an error for stream {stream_id}: {error}")
        elif not future.done():
            future.set_exception(error)

    async def _shutdown(self, cause: BaseException | None) -> None:
        if cause is not None:
            logger.debug("ttrpc connection lost: %s", cause)
        # Mark closed and fail the pending calls before awaiting anything, so no
        # call can slip in between and wait forever.
        self._state = ClientState.CLOSED
        self._close_cause = cause
        reason = "connection lost" if cause is not None else "client closed"
        for stream_id, future in list(self._pending.items()):
            if not future.done():
                error = ConnectionClosedError(f"{reason} while stream {stream_id} was pending")
                error.__cause__ = cause
                future.set_exception(error)
        self._pending.clear()
        try:
            await self._frames.aclose()
        finally:
            self._closed.set()


def _encode_metadata(metadata: Metadata | None) -> list[ttrpc_pb2.KeyValue]:
    """One KeyValue per value: several values for a key repeat the key, as containerd does."""
    pairs: list[ttrpc_pb2.KeyValue] = []
    for key, values in (metadata or {}).items():
        for value in [values] if isinstance(values, str) else values:
            pairs.append(ttrpc_pb2.KeyValue(key=key, value=value))
    return pairs


def _decode_response(
    payload: bytes, response_type: type[ResponseT], service: str, method: str
) -> ResponseT:
    try:
        response = ttrpc_pb2.Response.FromString(payload)
    except DecodeError as exc:
        raise ProtocolError(f"{service}/{method}: undecodable response: {exc}") from exc
    if response.status.code != Code.OK:
        raise StatusError.from_status(response.status)
    try:
        return response_type.FromString(response.payload)
    except DecodeError as exc:
        raise ProtocolError(
            f"{service}/{method}: response payload is not a {response_type.__name__}: {exc}"
        ) from exc
