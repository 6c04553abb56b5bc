"""Driving a real `pykata.ttrpc.Server` with the byte stream a hostile client sends.

The input is a script of records (see `Script`): well-formed requests whose
service, method, stream id, deadline, metadata and payload come from the input,
mixed with raw bytes, hand-made headers, lying lengths and oversized frames,
and pauses that let the server work before more bytes arrive. The stream is
fed to one in-memory connection.

What must hold, checked against a reference reading of the same stream (from
the frame format and the server's documented rules, not from its code):

- every frame that must be answered is answered, exactly once, before the peer
  closes (only long-polling methods may stay unanswered);
- nothing else is answered; each answer is a well-formed Response frame, and an
  OK answer decodes as the method's response type;
- `serve_connection` returns after the peer's end-of-file and raises nothing,
  and no request task lets an exception escape.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from fuzz._bytes import Cursor, Encoder
from fuzz._conn import MemoryConnection
from fuzz._harness import Violation, settle, wait_until
from pykata.protocols import ttrpc_pb2
from pykata.ttrpc import Server

_HEADER = struct.Struct(">IIBB")
_MAX = 4 << 20
_REQUEST, _RESPONSE = 1, 2
_MAX_RECORDS = 48
_MAX_CODE = 16
# An oversized payload, shared. 0xFF, not zeros: should the stream be out of
# step when it arrives, it reads as one more oversized header, where zeros
# would read as 400,000 empty frames, each answered.
_FILLER = b"\xff" * (_MAX + 0x1_0000)
_CHUNKED_BYTES = 1024

# Record tags (the low 3 bits of a record's first byte).
TAG_REQUEST = 0  # 0, 1 and 2 are all requests: the record that matters most
TAG_RAW = 3
TAG_FRAME = 4
TAG_OVERSIZED = 5
TAG_PAUSE = 6
TAG_LYING_LENGTH = 7

# Stream id choices of a request record.
SID_NEXT, SID_REUSE, SID_EVEN, SID_EXPLICIT = range(4)

# Option bits of a request record.
OPT_TIMEOUT, OPT_METADATA, OPT_RAW_ENVELOPE, OPT_TYPE, OPT_FLAGS = 1, 2, 4, 8, 16

# Delivery modes (the input's first byte, modulo 3).
DELIVER_SEGMENTS, DELIVER_RECORDS, DELIVER_CHUNKS = range(3)


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type[Message]
    response: type[Message]


def methods_of(service: ServiceDescriptor, names: Sequence[str] | None = None) -> list[Method]:
    """The service's methods as its .proto declares them (the wire contract)."""
    out = []
    for method in service.methods:
        if names is not None and method.name not in names:
            continue
        out.append(Method(
            service.full_name, method.name,
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
        ))
    return out


_PAUSE = None
Piece = bytes | None


def decode_script(data: bytes, methods: Sequence[Method]) -> tuple[int, list[Piece]]:
    """The input as (delivery mode byte, pieces); a piece of None is a pause."""
    c = Cursor(data)
    delivery = c.u8()
    pieces: list[Piece] = []
    last_sid = 0
    filler_used = False
    while not c.exhausted and len(pieces) < _MAX_RECORDS:
        tag = c.u8() & 7
        if tag <= 2:
            sid_mode, choice, opts = c.u8() & 3, c.u8(), c.u8()
            if choice < len(methods):
                service, name = methods[choice].service, methods[choice].name
            else:
                service, name = c.text(), c.text()
            if sid_mode == SID_NEXT:
                sid = last_sid + 2 if last_sid % 2 else last_sid + 1
            elif sid_mode == SID_REUSE:
                sid = last_sid
            elif sid_mode == SID_EVEN:
                sid = last_sid + 1 if last_sid % 2 else last_sid + 2
            else:
                sid = c.u32()
            sid &= 0xFFFF_FFFF
            last_sid = sid
            timeout = 0
            if opts & OPT_TIMEOUT:
                timeout = c.u64()
                if timeout >= 1 << 63:  # int64 on the wire: negative deadlines too
                    timeout -= 1 << 64
            metadata = []
            if opts & OPT_METADATA:
                for _ in range(c.u8() & 3):
                    metadata.append(ttrpc_pb2.KeyValue(key=c.text(), value=c.text()))
            payload = c.blob()
            kind = c.u8() if opts & OPT_TYPE else _REQUEST
            flags = c.u8() if opts & OPT_FLAGS else 0
            if opts & OPT_RAW_ENVELOPE:
                body = payload
            else:
                body = ttrpc_pb2.Request(
                    service=service, method=name, payload=payload, timeout_nano=timeout,
                    metadata=metadata,
                ).SerializeToString()
            pieces.append(_HEADER.pack(len(body), sid, kind, flags) + body)
        elif tag == TAG_RAW:
            pieces.append(c.blob())
        elif tag == TAG_FRAME:
            sid, kind, flags = c.u32(), c.u8(), c.u8()
            body = c.blob()
            pieces.append(_HEADER.pack(len(body), sid, kind, flags) + body)
        elif tag == TAG_OVERSIZED:
            sid, extra, whole = c.u32(), c.u16(), c.u8() & 1 and not filler_used
            size = _MAX + 1 + extra
            # Either the whole payload follows (to be skipped, the stream still
            # in sync) or it never does (the peer gives up inside it). One whole
            # payload per input: each costs milliseconds.
            filler_used = filler_used or bool(whole)
            pieces.append(_HEADER.pack(size, sid, c.u8(), 0) + (_FILLER[:size] if whole else b""))
        elif tag == TAG_PAUSE:
            pieces.append(_PAUSE)
        else:
            sid, kind, delta = c.u32(), c.u8(), c.u8()
            body = c.blob()
            length = max(0, len(body) + (delta - 256 if delta >= 128 else delta))
            pieces.append(_HEADER.pack(length, sid, kind, 0) + body)
    return delivery, pieces


class Expected:
    """What the server must and may answer, from a reference reading of the stream."""

    def __init__(self) -> None:
        self.must: collections.Counter[int] = collections.Counter()
        self.may: collections.Counter[int] = collections.Counter()
        self.method_of: dict[int, tuple[str, str]] = {}


def expected_answers(stream: bytes, may_block: Callable[[str, str], bool]) -> Expected:
    """The server's rules, as its documentation and containerd's ttRPC state them:
    an even stream id is answered (INVALID_ARGUMENT) whatever the frame; a request
    on a stream id not above the last accepted one is answered; any other request
    is answered unless its method long-polls; an oversized frame is answered on
    its stream once its payload was skipped; other frames are dropped; a frame
    cut short by the end of the stream ends the connection."""
    out = Expected()
    pos, end, last_sid = 0, len(stream), 0
    while end - pos >= _HEADER.size:
        length, sid, kind, _flags = _HEADER.unpack_from(stream, pos)
        pos += _HEADER.size
        if end - pos < length:
            break
        payload = stream[pos : pos + length] if length <= _MAX else b""
        pos += length
        if length > _MAX or sid % 2 == 0:
            out.must[sid] += 1
        elif kind == _REQUEST:
            if sid <= last_sid:
                out.must[sid] += 1
                continue
            last_sid = sid
            try:
                request = ttrpc_pb2.Request.FromString(payload)
            except DecodeError:
                out.must[sid] += 1
                continue
            out.method_of[sid] = (request.service, request.method)
            if may_block(request.service, request.method):
                out.may[sid] += 1
            else:
                out.must[sid] += 1
    return out


def _responses(written: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    while len(written) - pos >= _HEADER.size:
        length, sid, kind, flags = _HEADER.unpack_from(written, pos)
        pos += _HEADER.size
        frames.append((sid, kind, flags, written[pos : pos + length]))
        pos += length
    if pos != len(written):
        raise Violation("partial-frame", f"the server wrote a partial frame: {written[pos:]!r}")
    return frames


def _answered(written: bytearray, expected: Expected) -> bool:
    counts = collections.Counter(sid for sid, *_ in _responses(bytes(written)))
    return all(counts[sid] >= n for sid, n in expected.must.items())


def _check_answers(written: bytes, expected: Expected, methods: dict[tuple[str, str], Method]
                   ) -> None:
    counts: collections.Counter[int] = collections.Counter()
    for sid, kind, flags, payload in _responses(written):
        counts[sid] += 1
        if kind != _RESPONSE or flags != 0:
            raise Violation("bad-answer-frame", f"stream {sid}: type {kind}, flags {flags}")
        try:
            response = ttrpc_pb2.Response.FromString(payload)
        except DecodeError as exc:
            raise Violation("bad-answer", f"stream {sid}: undecodable Response: {exc}") from exc
        code = response.status.code
        if not 0 <= code <= _MAX_CODE:
            raise Violation("bad-status", f"stream {sid}: status code {code}")
        if code == 0:
            method = methods.get(expected.method_of.get(sid, ("", "")))
            if method is None:
                raise Violation("ok-without-method", f"stream {sid} answered OK")
            try:
                method.response.FromString(response.payload)
            except DecodeError as exc:
                raise Violation("bad-answer-payload",
                                f"{method.name} on stream {sid}: not a "
                                f"{method.response.__name__}: {exc}") from exc
        elif response.payload:
            raise Violation("error-with-payload", f"stream {sid}: {code} with a payload")
    for sid, n in counts.items():
        if n > expected.must[sid] + expected.may[sid]:
            raise Violation("unexpected-answer",
                            f"stream {sid} answered {n} time(s), expected "
                            f"{expected.must[sid]} (+{expected.may[sid]} optional)")
    for sid, n in expected.must.items():
        if counts[sid] < n:
            raise Violation("unanswered", f"stream {sid}: {counts[sid]} of {n} answers")


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def drive(server: Server, data: bytes, methods: Sequence[Method],
                may_block: Callable[[str, str], bool]) -> None:
    """Serve one connection carrying the script `data`; check what was answered."""
    delivery, pieces = decode_script(data, methods)
    mode = delivery % 3
    conn = MemoryConnection()
    serving = asyncio.ensure_future(server.serve_connection(conn.reader, conn.writer))
    segment: list[bytes] = []

    async def deliver(chunk: bytes) -> None:
        # Small pieces for the first bytes only: each costs an event-loop
        # round, and a whole oversized payload in 1-byte pieces would take
        # minutes. The rest goes at once (the server skips it in one go).
        if mode == DELIVER_CHUNKS:
            head, chunk = chunk[:_CHUNKED_BYTES], chunk[_CHUNKED_BYTES:]
            for piece in _chunks(head, delivery // 3 % 13 + 1):
                conn.send(piece)
                await asyncio.sleep(0)
        conn.send(chunk)
        await settle()

    for piece in pieces:
        if piece is None:
            await deliver(b"".join(segment))
            segment.clear()
        elif mode == DELIVER_RECORDS:
            await deliver(piece)
        else:
            segment.append(piece)
    await deliver(b"".join(segment))

    stream = b"".join(p for p in pieces if p is not None)
    expected = expected_answers(stream, may_block)
    await wait_until(lambda: _answered(conn.written, expected),
                     "answers to every request that must be answered")
    conn.send_eof()
    await wait_until(serving.done, "serve_connection to return after the peer's end-of-file")
    if serving.exception() is not None:
        exc = serving.exception()
        raise Violation("raised-out-of-server",
                        f"serve_connection raised {type(exc).__name__}: {exc}") from exc
    by_name = {(m.service, m.name): m for m in methods}
    _check_answers(bytes(conn.written), expected, by_name)


# --- seeds ---------------------------------------------------------------------


def request_record(enc: Encoder, methods: Sequence[Method], name: str, message: Message, *,
                   sid_mode: int = SID_NEXT, sid: int = 0, timeout: int | None = None,
                   metadata: Sequence[tuple[str, str]] = ()) -> Encoder:
    """Append a request record for the method called `name` to a seed."""
    index = next(i for i, m in enumerate(methods) if m.name == name)
    opts = (OPT_TIMEOUT if timeout is not None else 0) | (OPT_METADATA if metadata else 0)
    enc.u8(TAG_REQUEST).u8(sid_mode).u8(index).u8(opts)
    if sid_mode == SID_EXPLICIT:
        enc.u32(sid)
    if timeout is not None:
        enc.u64(timeout)
    if metadata:
        enc.u8(len(metadata))
        for key, value in metadata:
            enc.text(key).text(value)
    return enc.blob(message.SerializeToString())


def hostile_records(enc: Encoder) -> Encoder:
    """Records no honest client sends: bad stream ids, stray frames, lies."""
    enc.u8(TAG_REQUEST).u8(SID_EVEN).u8(0xFF).u8(0).text("no.Such").text("Method").blob(b"")
    enc.u8(TAG_REQUEST).u8(SID_REUSE).u8(0).u8(OPT_RAW_ENVELOPE).blob(b"\xff\xff")
    enc.u8(TAG_FRAME).u32(99).u8(3).u8(1).blob(b"data")
    enc.u8(TAG_FRAME).u32(101).u8(2).u8(0).blob(b"")
    enc.u8(TAG_FRAME).u32(103).u8(9).u8(0).blob(b"?")
    enc.u8(TAG_RAW).blob(b"\x00\x00")
    return enc
