"""Tests for pykata.ttrpc.protocol: frames over real sockets and pipes."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from pykata.ttrpc.errors import ConnectionClosedError, MessageTooLargeError
from pykata.ttrpc.framing import MAX_MESSAGE_SIZE, MessageType
from pykata.ttrpc.protocol import FrameStream, open_fd_streams

# Every test is bounded so a broken reader fails it instead of hanging it.
TEST_TIMEOUT = 10


@asynccontextmanager
async def frame_stream_and_raw_socket() -> AsyncIterator[tuple[FrameStream, socket.socket]]:
    """A FrameStream on one end of a socketpair and the blocking raw socket on the other."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    stream = FrameStream(reader, writer)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            yield stream, theirs
    finally:
        theirs.close()
        await stream.aclose()


async def test_read_frame_parses_hand_packed_bytes() -> None:
    """A frame packed with struct is read back with its header and payload."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        raw.sendall(struct.pack(">IIBB", 5, 9, 2, 4) + b"hello")
        frame = await stream.read_frame()
    assert frame is not None
    assert (frame.header.length, frame.header.stream_id, frame.header.type) == (5, 9, 2)
    assert frame.header.flags == 4
    assert frame.payload == b"hello"


async def test_read_frame_returns_none_on_clean_eof() -> None:
    """EOF exactly between frames is a clean close, not an error."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        raw.sendall(struct.pack(">IIBB", 0, 1, 1, 0))
        raw.shutdown(socket.SHUT_WR)
        first = await stream.read_frame()
        assert first is not None
        assert first.payload == b""
        assert await stream.read_frame() is None


async def test_eof_mid_header_names_missing_bytes() -> None:
    """The peer vanishing 4 bytes into a header leaves 6 bytes missing."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        raw.sendall(b"\x00\x00\x00\x05")
        raw.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosedError, match="6 bytes missing"):
            await stream.read_frame()


async def test_eof_mid_payload_names_missing_bytes() -> None:
    """The peer vanishing 30 bytes into a 100-byte payload leaves 70 bytes missing."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        raw.sendall(struct.pack(">IIBB", 100, 1, 1, 0) + b"x" * 30)
        raw.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosedError, match="70 bytes missing") as info:
            await stream.read_frame()
        assert isinstance(info.value.__cause__, asyncio.IncompleteReadError)


async def test_oversized_frame_is_discarded_and_stream_stays_in_sync() -> None:
    """An oversized frame raises for its stream, and the next frame reads intact."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        size = MAX_MESSAGE_SIZE + 1
        data = struct.pack(">IIBB", size, 7, 1, 0) + b"\xaa" * size
        data += struct.pack(">IIBB", 2, 9, 1, 0) + b"ok"
        raw.settimeout(TEST_TIMEOUT)  # a broken reader must not strand the sending thread
        sender = asyncio.create_task(asyncio.to_thread(raw.sendall, data))
        with pytest.raises(MessageTooLargeError) as info:
            await stream.read_frame()
        assert (info.value.stream_id, info.value.size) == (7, size)
        frame = await stream.read_frame()
        await sender
    assert frame is not None
    assert (frame.header.stream_id, frame.payload) == (9, b"ok")


async def test_write_frame_refuses_oversized_payload_before_writing() -> None:
    """Nothing reaches the peer when a payload is too large."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        with pytest.raises(MessageTooLargeError):
            await stream.write_frame(1, MessageType.REQUEST, b"\x00" * (MAX_MESSAGE_SIZE + 1))
        await stream.write_frame(3, MessageType.REQUEST, b"small")
        raw.settimeout(5)
        assert raw.recv(100) == struct.pack(">IIBB", 5, 3, 1, 0) + b"small"


async def test_concurrent_writers_never_interleave_frames() -> None:
    """Many tasks writing large frames at once produce whole, separate frames."""
    ours, theirs = socket.socketpair()
    a_reader, a_writer = await asyncio.open_connection(sock=ours)
    b_reader, b_writer = await asyncio.open_connection(sock=theirs)
    sender, receiver = FrameStream(a_reader, a_writer), FrameStream(b_reader, b_writer)
    payloads = {2 * i + 1: bytes([i]) * (200_000 + i) for i in range(20)}
    received = {}
    async with asyncio.timeout(TEST_TIMEOUT):
        writes = asyncio.gather(
            *(sender.write_frame(sid, MessageType.REQUEST, p) for sid, p in payloads.items())
        )
        for _ in payloads:
            frame = await receiver.read_frame()
            assert frame is not None
            received[frame.header.stream_id] = frame.payload
        await writes
        await sender.aclose()
        await receiver.aclose()
    assert received == payloads


async def test_write_after_peer_closed_raises_connection_closed() -> None:
    """Writing to a vanished peer raises ConnectionClosedError, not a bare OSError."""
    async with frame_stream_and_raw_socket() as (stream, raw):
        raw.close()
        with pytest.raises(ConnectionClosedError):
            for _ in range(100):
                await stream.write_frame(1, MessageType.REQUEST, b"x" * 65536)


async def test_fd_streams_carry_frames_over_a_pipe_pair() -> None:
    """open_fd_streams turns two pipes into a bidirectional frame stream."""
    up_r, up_w = os.pipe()
    down_r, down_w = os.pipe()
    near = FrameStream(*await open_fd_streams(down_r, up_w))
    far = FrameStream(*await open_fd_streams(up_r, down_w))
    async with asyncio.timeout(TEST_TIMEOUT):
        await near.write_frame(1, MessageType.REQUEST, b"ping")
        frame = await far.read_frame()
        assert frame is not None
        assert frame.payload == b"ping"
        await far.write_frame(1, MessageType.RESPONSE, b"pong")
        frame = await near.read_frame()
        assert frame is not None
        assert frame.payload == b"pong"
        await near.aclose()
        assert await far.read_frame() is None  # closing one end is EOF for the other
        await far.aclose()
