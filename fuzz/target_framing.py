"""Target ``framing``: ttRPC frames from raw bytes.

The input is a byte stream (after one mode byte). It is read with
`FrameStream.read_frame` twice, fed at once and in odd-sized chunks, and both
reads must agree with a reference parser written here from the frame format
alone. The pure functions of `pykata.ttrpc.framing` are checked on the same
bytes. Allowed outcomes: frames, None, or TtrpcError subclasses.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import cast

from fuzz._bytes import Cursor
from fuzz._conn import MemoryConnection
from fuzz._harness import Harness, Target, Violation, bounded
from pykata.protocols import ttrpc_pb2
from pykata.ttrpc import framing
from pykata.ttrpc.errors import (
    ConnectionClosedError,
    MessageTooLargeError,
    ProtocolError,
    TtrpcError,
)
from pykata.ttrpc.protocol import FrameStream

_HEADER = struct.Struct(">IIBB")
_MAX = 4 << 20
_CHUNK_SIZES = (1, 2, 3, 5, 9, 10, 11, 17)
# An oversized payload the reader must skip, for the rare inputs that ask for one.
_FILLER = b"\xff" * (_MAX + 0x1_0000)
_FILLER_CHUNK = 64 * 1024

Outcome = tuple[object, ...]


def _reference(stream: bytes) -> list[Outcome]:
    """What reading `stream` to its end must give, from the frame format alone."""
    out: list[Outcome] = []
    pos, end = 0, len(stream)
    while True:
        if pos == end:
            out.append(("eof",))
            return out
        if end - pos < _HEADER.size:
            out.append(("closed",))
            return out
        length, stream_id, kind, flags = _HEADER.unpack_from(stream, pos)
        pos += _HEADER.size
        if end - pos < length:
            out.append(("closed",))
            return out
        if length > _MAX:
            out.append(("too-large", length, stream_id))
        else:
            out.append(("frame", (length, stream_id, kind, flags), stream[pos : pos + length]))
        pos += length


async def _read_all(conn: MemoryConnection) -> list[Outcome]:
    frames = FrameStream(conn.reader, conn.writer)
    out: list[Outcome] = []
    while True:
        try:
            frame = await frames.read_frame()
        except MessageTooLargeError as exc:
            # Allowed, and the stream stays in sync: the client and the server
            # both go on reading after one.
            if exc.stream_id is None:
                raise Violation("too-large-without-stream", str(exc)) from exc
            out.append(("too-large", exc.size, exc.stream_id))
            continue
        except ConnectionClosedError:
            out.append(("closed",))
            return out
        except TtrpcError as exc:
            # Allowed by the contract, though the reference never expects one.
            out.append(("error", type(exc).__name__))
            return out
        if frame is None:
            out.append(("eof",))
            return out
        header = frame.header
        if not isinstance(frame.payload, bytes) or len(frame.payload) != header.length:
            raise Violation("payload-length", f"{header} with {len(frame.payload)} payload bytes")
        out.append(("frame", tuple(header), frame.payload))


def _chunks(data: bytes, first: int) -> list[bytes]:
    out, pos, size = [], 0, first
    while pos < len(data):
        out.append(data[pos : pos + size])
        pos += size
        size = size + 2 if size < 32 else first  # odd steps: boundaries fall everywhere
    return out


async def _read_chunked(pieces: Sequence[bytes | memoryview]) -> list[Outcome]:
    conn = MemoryConnection()
    reading = asyncio.ensure_future(_read_all(conn))
    for piece in pieces:
        conn.reader.feed_data(piece)
        await asyncio.sleep(0)
    conn.reader.feed_eof()
    return await reading


async def _read_at_once(stream: bytes) -> list[Outcome]:
    conn = MemoryConnection()
    conn.reader.feed_data(stream)
    conn.reader.feed_eof()
    return await _read_all(conn)


def _check_pure(head: bytes, c: Cursor, payload: bytes) -> None:
    try:
        header = framing.decode_header(head)
    except ProtocolError:
        if len(head) == framing.HEADER_SIZE:
            raise
    else:
        if len(head) != framing.HEADER_SIZE:
            raise Violation("decode-header-length", f"decoded {len(head)} bytes: {header}")
        if framing.encode_header(header) != head:
            raise Violation("header-round-trip", f"{header} does not encode back to {head!r}")
        known = header.type in (1, 2, 3)
        if (header.message_type is not None) != known:
            raise Violation("message-type", f"type {header.type} -> {header.message_type}")
        if framing.is_client_stream_id(header.stream_id) != (header.stream_id % 2 == 1):
            raise Violation("client-stream-id", str(header.stream_id))
        try:
            framing.check_message_size(header.length, header.stream_id)
        except MessageTooLargeError as exc:
            if header.length <= _MAX or exc.stream_id != header.stream_id:
                raise Violation("check-size", f"{header.length}: {exc}") from exc
        else:
            if header.length > _MAX:
                raise Violation("check-size", f"{header.length} accepted")

    # encode_frame with fields that may be out of range: ProtocolError then.
    stream_id, kind, flags = c.u32(), c.u8(), c.u8()
    widen = c.u8()
    if widen & 1:
        stream_id += 1 << 32
    if widen & 2:
        kind = -kind - 1
    if widen & 4:
        flags += 256
    in_range = not widen & 7
    try:
        frame = framing.encode_frame(stream_id, kind, payload, flags)
    except MessageTooLargeError:
        raise Violation("encode-too-large", f"{len(payload)} bytes refused") from None
    except ProtocolError:
        if in_range:
            raise
        return
    if not in_range:
        raise Violation("encode-out-of-range", f"{stream_id}, {kind}, {flags} encoded")
    if frame[framing.HEADER_SIZE :] != payload or framing.decode_header(
        frame[: framing.HEADER_SIZE]
    ) != (len(payload), stream_id, kind, flags):
        raise Violation("frame-round-trip", f"{stream_id}, {kind}, {flags}, {payload!r}")


async def _check_write(stream_id: int, kind: int, flags: int, payload: bytes) -> None:
    conn = MemoryConnection()
    frames = FrameStream(conn.reader, conn.writer)
    await frames.write_frame(stream_id, kind, payload, flags)
    expected = _HEADER.pack(len(payload), stream_id, kind, flags) + payload
    if conn.written != expected:
        raise Violation("write-frame", f"wrote {bytes(conn.written)!r}, not {expected!r}")
    await frames.aclose()
    try:
        await frames.write_frame(stream_id, kind, payload, flags)
    except ConnectionClosedError:
        pass
    else:
        raise Violation("write-after-close", "a frame was written on a closed stream")


class FramingTarget(Target):
    max_len = 4096

    async def one_input(self, data: bytes) -> None:
        c = Cursor(data)
        mode = c.u8()
        stream = c.rest()
        _check_pure(stream[: framing.HEADER_SIZE + (mode & 1)], Cursor(stream), stream[10:64])

        expected = _reference(stream)
        at_once = await bounded(_read_at_once(stream), "reading the stream fed at once")
        if at_once != expected:
            raise Violation("read-at-once", f"read {at_once!r}\nexpected {expected!r}")
        pieces = list(_chunks(stream, _CHUNK_SIZES[(mode >> 1) & 7]))
        chunked = await bounded(_read_chunked(pieces), "reading the stream fed in chunks")
        if chunked != expected:
            raise Violation("read-chunked", f"read {chunked!r}\nexpected {expected!r}")

        if mode == 0xFF:
            # A whole oversized payload: skipped, reported on its stream, and the
            # frames after it still read. Fed as a peer would send it, in pieces.
            size = _MAX + 1 + (stream[0] if stream else 0)
            prefix = _HEADER.pack(size, 7, 1, 0)
            view = memoryview(_FILLER)[:size]
            big: list[bytes | memoryview] = [prefix]
            big += [view[i : i + _FILLER_CHUNK] for i in range(0, size, _FILLER_CHUNK)]
            big += _chunks(stream, 64)
            got = await bounded(_read_chunked(big), "reading past an oversized payload")
            want = [("too-large", size, 7), *expected]
            if got != want:
                raise Violation("read-oversized", f"read {got[:3]!r}...\nexpected {want[:3]!r}")

        for outcome in expected[:2]:
            if outcome[0] == "frame":
                _length, stream_id, kind, flags = cast(tuple[int, int, int, int], outcome[1])
                await bounded(_check_write(stream_id, kind, flags, cast(bytes, outcome[2])),
                              "writing a frame")

    def seeds(self) -> list[bytes]:
        request = ttrpc_pb2.Request(
            service="grpc.AgentService", method="CreateContainer", payload=b"\x0a\x02c1",
            timeout_nano=120_000_000_000,
            metadata=[ttrpc_pb2.KeyValue(key="containerd-namespace-ttrpc", value="k8s.io")],
        ).SerializeToString()
        response = ttrpc_pb2.Response(payload=b"\x08\x01").SerializeToString()
        one = framing.encode_frame(1, framing.MessageType.REQUEST, request)
        two = framing.encode_frame(2, framing.MessageType.RESPONSE, response)
        data = framing.encode_frame(
            3, framing.MessageType.DATA, b"xyz", framing.Flags.REMOTE_CLOSED
        )
        oversized = _HEADER.pack(_MAX + 1, 5, 1, 0)
        return [
            b"\x00",
            b"\x00" + one,
            b"\x03" + one + two,
            b"\x06" + one + two + data,
            b"\x09" + one[:-3],
            b"\x0c" + one[:7],
            b"\x0e" + oversized + b"abc",
            b"\x05" + framing.encode_frame(9, 4, b"", 0xFF) + data,
            b"\x00" + _HEADER.pack(_MAX, 1, 1, 0),
        ]


def make_target(harness: Harness) -> Target:
    return FramingTarget()
