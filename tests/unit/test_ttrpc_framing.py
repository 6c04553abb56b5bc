"""Tests for pykata.ttrpc.framing and pykata.ttrpc.errors: pure functions, no I/O."""

from __future__ import annotations

import struct

import pytest

from pykata.protocols import status_pb2
from pykata.ttrpc.errors import (
    Code,
    MessageTooLargeError,
    ProtocolError,
    StatusError,
    status_from_exception,
)
from pykata.ttrpc.framing import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Flags,
    FrameHeader,
    MessageType,
    decode_header,
    encode_frame,
    encode_header,
    is_client_stream_id,
)


def test_constants_match_the_wire_protocol() -> None:
    """The header is 10 bytes and the payload limit is 4 MiB."""
    assert HEADER_SIZE == 10
    assert MAX_MESSAGE_SIZE == 4 * 1024 * 1024
    assert [int(t) for t in MessageType] == [1, 2, 3]
    assert (Flags.REMOTE_CLOSED, Flags.REMOTE_OPEN, Flags.NO_DATA) == (1, 2, 4)


def test_encode_frame_matches_hand_packed_bytes() -> None:
    """encode_frame lays out big-endian length, stream id, type, flags, then payload."""
    frame = encode_frame(3, MessageType.REQUEST, b"abc")
    assert frame == struct.pack(">IIBB", 3, 3, 1, 0) + b"abc"
    assert frame == b"\x00\x00\x00\x03\x00\x00\x00\x03\x01\x00abc"


@pytest.mark.parametrize("message_type", list(MessageType))
@pytest.mark.parametrize("flags", [Flags.NONE, Flags.REMOTE_CLOSED | Flags.NO_DATA, 0xFF])
def test_round_trip_every_message_type(message_type: MessageType, flags: int) -> None:
    """A header decodes back to what was encoded, for every type and a range of flags."""
    payload = b"x" * 17
    frame = encode_frame(0xFFFF_FFFF, message_type, payload, flags)
    header = decode_header(frame[:HEADER_SIZE])
    assert header == FrameHeader(len(payload), 0xFFFF_FFFF, int(message_type), int(flags))
    assert header.message_type is message_type
    assert frame[HEADER_SIZE:] == payload


@pytest.mark.parametrize("size", [0, 1, 9, 11, 20])
def test_decode_header_rejects_wrong_lengths(size: int) -> None:
    """Anything but exactly 10 bytes is not a header."""
    with pytest.raises(ProtocolError, match="10 bytes"):
        decode_header(b"\x00" * size)


def test_unknown_message_type_still_decodes() -> None:
    """An unknown type byte is a well-formed header whose message_type is None."""
    header = decode_header(struct.pack(">IIBB", 5, 7, 0x7F, 0))
    assert header.type == 0x7F
    assert header.message_type is None
    assert header.length == 5


def test_encode_refuses_oversized_payload() -> None:
    """A payload above 4 MiB is refused, naming its size, the limit and the stream."""
    with pytest.raises(MessageTooLargeError) as info:
        encode_frame(5, MessageType.REQUEST, b"\x00" * (MAX_MESSAGE_SIZE + 1))
    assert (info.value.size, info.value.limit, info.value.stream_id) == (
        MAX_MESSAGE_SIZE + 1,
        MAX_MESSAGE_SIZE,
        5,
    )
    assert isinstance(info.value, ProtocolError)


def test_encode_accepts_payload_at_the_limit() -> None:
    """Exactly 4 MiB is still allowed."""
    frame = encode_frame(1, MessageType.RESPONSE, b"\x00" * MAX_MESSAGE_SIZE)
    assert decode_header(frame[:HEADER_SIZE]).length == MAX_MESSAGE_SIZE


@pytest.mark.parametrize(
    "header",
    [
        FrameHeader(0, 2**32, 1, 0),
        FrameHeader(0, 1, 256, 0),
        FrameHeader(0, 1, 1, 256),
        FrameHeader(-1, 1, 1, 0),
    ],
)
def test_encode_header_rejects_out_of_range_fields(header: FrameHeader) -> None:
    """Fields that do not fit their wire width raise ProtocolError, not struct.error."""
    with pytest.raises(ProtocolError):
        encode_header(header)


@pytest.mark.parametrize(("stream_id", "valid"), [(0, False), (1, True), (2, False), (7, True)])
def test_client_stream_ids_are_odd(stream_id: int, valid: bool) -> None:
    """Client-initiated stream ids must be odd; zero and even ids are not."""
    assert is_client_stream_id(stream_id) is valid


def test_code_values_follow_google_rpc() -> None:
    """Code carries google.rpc.Code's numbers."""
    assert len(Code) == 17
    assert int(Code.NOT_FOUND) == 5
    assert int(Code.RESOURCE_EXHAUSTED) == 8
    assert int(Code.UNIMPLEMENTED) == 12
    assert int(Code.UNAUTHENTICATED) == 16


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (StatusError(Code.NOT_FOUND, "no such box"), Code.NOT_FOUND, "no such box"),
        (TimeoutError(), Code.DEADLINE_EXCEEDED, "deadline exceeded"),
        (NotImplementedError("later"), Code.UNIMPLEMENTED, "later"),
        (RuntimeError("boom"), Code.UNKNOWN, "boom"),
        (KeyError(), Code.UNKNOWN, "KeyError"),
    ],
)
def test_status_from_exception(exc: BaseException, code: Code, message: str) -> None:
    """Each exception kind maps to its documented status code and message."""
    status = status_from_exception(exc)
    assert (status.code, status.message) == (code, message)


def test_status_from_exception_sends_no_traceback() -> None:
    """Only str(exc) crosses the wire, even for an exception with a traceback."""
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        status = status_from_exception(exc)
    assert status.message == "bad value"
    assert "Traceback" not in status.message


def test_status_error_round_trips_through_status() -> None:
    """StatusError survives to_status/from_status with its code and message."""
    error = StatusError.from_status(StatusError(Code.ABORTED, "raced").to_status())
    assert (error.code, error.message) == (Code.ABORTED, "raced")
    assert str(error) == "ABORTED: raced"


def test_status_error_from_unrecognised_code() -> None:
    """A code outside google.rpc.Code becomes UNKNOWN and keeps the number visible."""
    error = StatusError.from_status(status_pb2.Status(code=99, message="odd"))
    assert error.code is Code.UNKNOWN
    assert "99" in error.message
    assert "odd" in error.message
