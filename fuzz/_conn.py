"""One side of a connection in memory: a real StreamReader/StreamWriter pair
whose transport hands written bytes to a callback instead of a socket.

The harness plays the peer: it feeds bytes with `MemoryConnection.send`, ends
its direction with `send_eof`, and sees what the side under test wrote in
`written`. No fd, no syscall, so an input costs microseconds and can touch
nothing outside the process. Closing the writer ends both directions, as
closing a socket does.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _MemoryTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, conn: MemoryConnection) -> None:
        super().__init__()
        self._loop = loop
        self._conn = conn
        self._closing = False
        self._protocol: asyncio.BaseProtocol | None = None

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # A real transport drops writes once closing; so does this one.
        if not self._closing:
            self._conn.on_write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._conn.closed_by_local = True
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_reading(self) -> bool:
        return not self._closing

    def pause_reading(self) -> None:
        pass  # everything fed is already in memory; nothing to hold back

    def resume_reading(self) -> None:
        pass


class MemoryConnection:
    """The side under test gets `reader`/`writer`; the harness is the peer."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader()
        self.written = bytearray()
        self.closed_by_local = False
        self.write_count = 0
        self._peer_eof = False
        self._transport = _MemoryTransport(loop, self)
        protocol = asyncio.StreamReaderProtocol(self.reader)
        self._transport.attach(protocol)
        self.writer = asyncio.StreamWriter(self._transport, protocol, self.reader, loop)

    def on_write(self, data: bytes) -> None:
        self.written += data
        self.write_count += 1

    @property
    def open_for_peer(self) -> bool:
        """Whether bytes sent now can still arrive."""
        return not self._peer_eof and not self.closed_by_local

    def send(self, data: bytes) -> None:
        if data and self.open_for_peer:
            self.reader.feed_data(data)

    def send_eof(self) -> None:
        if self.open_for_peer:
            self._peer_eof = True
            self.reader.feed_eof()

    def take_written(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data
