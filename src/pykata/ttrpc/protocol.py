"""Frames over an asyncio byte stream: `FrameStream`, and streams over raw fds.

This layer knows the frame format but nothing of requests, responses or protobuf;
the client and the server build on it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from pykata.ttrpc.errors import ConnectionClosedError, MessageTooLargeError
from pykata.ttrpc.framing import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Flags,
    Frame,
    MessageType,
    decode_header,
    encode_frame,
)

logger = logging.getLogger(__name__)

_DISCARD_CHUNK = 64 * 1024


class FrameStream:
    """Reads and writes whole ttRPC frames on a StreamReader/StreamWriter pair.

    Reading is meant for one task at a time (each side has a single reader loop);
    writing is safe from many tasks at once.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        # Concurrent calls and handlers all write here. Each frame goes to the
        # transport in a single write() call so frames never interleave, and the
        # lock makes writers take turns waiting for the buffer to drain instead of
        # piling up behind a slow peer.
        self._write_lock = asyncio.Lock()

    @property
    def is_closing(self) -> bool:
        """True once the writing side is closed or closing."""
        return self._writer.is_closing()

    async def read_frame(self) -> Frame | None:
        """Read the next frame; None when the peer closed cleanly between frames.

        A frame announcing more than `MAX_MESSAGE_SIZE` bytes has its payload read
        and discarded, then `MessageTooLargeError` (naming the stream) is raised; the
        stream is still in sync and the caller may keep reading, as containerd's
        ttRPC channel does. The peer vanishing inside a frame raises
        `ConnectionClosedError` saying how many bytes were missing.
        """
        raw = await self._read_exactly(HEADER_SIZE, "frame header", eof_ok=True)
        if raw is None:
            return None
        header = decode_header(raw)
        if header.length > MAX_MESSAGE_SIZE:
            await self._discard(header.length)
            raise MessageTooLargeError(header.length, MAX_MESSAGE_SIZE, header.stream_id)
        payload = b""
        if header.length:
            payload = await self._read_exactly(header.length, "frame payload") or b""
        return Frame(header, payload)

    async def write_frame(
        self,
        stream_id: int,
        message_type: MessageType | int,
        payload: bytes = b"",
        flags: Flags | int = Flags.NONE,
    ) -> None:
        """Write one frame and wait for the transport to accept it.

        Raises `MessageTooLargeError` before writing anything for an oversized
        payload, and `ConnectionClosedError` when the connection is gone.
        """
        data = encode_frame(stream_id, message_type, payload, flags)
        async with self._write_lock:
            if self._writer.is_closing():
                raise ConnectionClosedError("connection is closed")
            try:
                self._writer.write(data)
                await self._writer.drain()
            except OSError as exc:  # ConnectionResetError, BrokenPipeError, ...
                raise ConnectionClosedError(f"writing a frame failed: {exc}") from exc

    def close(self) -> None:
        """Start closing the connection; pending reads then see end of file."""
        self._writer.close()

    async def aclose(self) -> None:
        """Close the connection and wait until the transport is gone."""
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError as exc:
            # The peer may already have reset the connection: it is closed either way.
            logger.debug("error while closing connection: %s", exc)

    async def _read_exactly(self, size: int, what: str, *, eof_ok: bool = False) -> bytes | None:
        try:
            return await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            got = len(exc.partial)
            if eof_ok and got == 0:
                return None
            raise ConnectionClosedError(
                f"connection closed inside a {size}-byte {what}: {size - got} bytes missing"
            ) from exc
        except OSError as exc:
            raise ConnectionClosedError(f"reading a {what} failed: {exc}") from exc

    async def _discard(self, size: int) -> None:
        remaining = size
        try:
            while remaining:
                chunk = await self._reader.read(min(remaining, _DISCARD_CHUNK))
                if not chunk:
                    raise ConnectionClosedError(
                        f"connection closed while discarding an oversized {size}-byte "
                        f"payload: {remaining} bytes missing"
                    )
                remaining -= len(chunk)
        except OSError as exc:
            raise ConnectionClosedError(f"discarding an oversized payload failed: {exc}") from exc


class _WritePipeProtocol(asyncio.StreamReaderProtocol):
    """Protocol for the writing half of an fd pair.

    A StreamReaderProtocol (not a bare FlowControlMixin) so StreamWriter.wait_closed
    works; when the writing half closes it also closes the reading half, so closing
    the writer ends the connection as it does for a socket.
    """

    def __init__(self, read_transport: asyncio.BaseTransport) -> None:
        super().__init__(asyncio.StreamReader())
        self._read_transport = read_transport

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._read_transport.close()


async def open_fd_streams(
    read_fd: int, write_fd: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Wrap pipe or character-device fds (e.g. a virtio-serial port) in asyncio streams.

    Takes ownership of the fds. With one bidirectional fd (``write_fd`` None or equal
    to ``read_fd``) the writing half uses a duplicate. For sockets use
    ``asyncio.open_connection(sock=...)`` instead: a write-pipe transport treats a
    readable socket as closed by its peer.
    """
    loop = asyncio.get_running_loop()
    if write_fd is None or write_fd == read_fd:
        write_fd = os.dup(read_fd)
    reader = asyncio.StreamReader()
    read_file = os.fdopen(read_fd, "rb", buffering=0)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), read_file
    )
    try:
        write_file = os.fdopen(write_fd, "wb", buffering=0)
        write_transport, write_protocol = await loop.connect_write_pipe(
            lambda: _WritePipeProtocol(read_transport), write_file
        )
    except BaseException:
        read_transport.close()
        raise
    writer = asyncio.StreamWriter(write_transport, write_protocol, reader, loop)
    return reader, writer
