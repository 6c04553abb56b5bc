"""The ttRPC frame format: pure functions and constants, no I/O.

Every ttRPC message travels as one frame: a 10-byte header followed by the payload::

    u32 big-endian  payload length (header excluded)
    u32 big-endian  stream id      (client-initiated streams are odd: 1, 3, 5, ...)
    u8              message type   (1 request, 2 response, 3 data)
    u8              flags          (stream flags, used with data frames)

The layout, type numbers, flag bits and the 4 MiB payload limit are those of
containerd's ttRPC (channel.go), so pykata interoperates with containerd.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from pykata.ttrpc.errors import MessageTooLargeError, ProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE_SIZE = 4 << 20  # containerd ttRPC's messageLengthMax
MAX_STREAM_ID = 0xFFFF_FFFF


class MessageType(enum.IntEnum):
    """The message type byte of a frame header."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """The flags byte of a frame header; meaningful on streaming (data) frames."""

    NONE = 0
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


class FrameHeader(NamedTuple):
    """A decoded frame header.

    ``type`` and ``flags`` are kept as the raw byte values: a type this side does not
    know is still a well-formed frame (containerd ignores such frames for forward
    compatibility), so the reader must be able to skip it. `message_type` gives the
    `MessageType` when the value is a known one.
    """

    length: int
    stream_id: int
    type: int
    flags: int = 0

    @property
    def message_type(self) -> MessageType | None:
        """The `MessageType` of this frame, or None for a type pykata does not know."""
        try:
            return MessageType(self.type)
        except ValueError:
            return None


def encode_header(header: FrameHeader) -> bytes:
    """Encode a header to its 10 wire bytes; raise ProtocolError on out-of-range fields."""
    try:
        return HEADER.pack(header.length, header.stream_id, header.type, header.flags)
    except struct.error as exc:
        raise ProtocolError(f"cannot encode frame header {header}: {exc}") from exc


def decode_header(data: bytes) -> FrameHeader:
    """Decode exactly `HEADER_SIZE` bytes into a `FrameHeader`."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(data)}")
    length, stream_id, message_type, flags = HEADER.unpack(data)
    return FrameHeader(length=length, stream_id=stream_id, type=message_type, flags=flags)


def check_message_size(size: int, stream_id: int | None = None) -> None:
    """Raise `MessageTooLargeError` when ``size`` exceeds `MAX_MESSAGE_SIZE`."""
    if size > MAX_MESSAGE_SIZE:
        raise MessageTooLargeError(size, MAX_MESSAGE_SIZE, stream_id)


def encode_frame(
    stream_id: int,
    message_type: MessageType | int,
    payload: bytes = b"",
    flags: Flags | int = Flags.NONE,
) -> bytes:
    """Encode one whole frame (header and payload).

    Refuses an oversized payload with `MessageTooLargeError`, as containerd's sender
    does, so nothing of a message the peer would reject is ever written.
    """
    check_message_size(len(payload), stream_id)
    header = FrameHeader(len(payload), stream_id, int(message_type), int(flags))
    return encode_header(header) + payload


def is_client_stream_id(stream_id: int) -> bool:
    """True for a valid client-initiated stream id: odd (hence non-zero)."""
    return stream_id % 2 == 1


class Frame(NamedTuple):
    """One received frame: its header and its payload bytes."""

    header: FrameHeader
    payload: bytes
