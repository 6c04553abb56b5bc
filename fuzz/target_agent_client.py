"""Target ``agent_client``: the host's decoding of what the agent answers.

`pykata.runtime.agent_client.AgentClient` talks over an in-memory connection
to a fake agent that answers each call with bytes the input chooses: valid
Response envelopes with fuzzed status and payload, answers on the wrong
stream, unsolicited frames, raw bytes, lying and oversized lengths, silence,
early end-of-file. Several calls may be in flight on one connection.

THE CONTRACT checked here (`_check_outcome`, `_check_result`) is the one
agent_client.py promises its callers, the shim and `pykata run`:

- every method returns or raises `pykata.errors.AgentError`; `read_stream` may
  also raise `StreamEnd`; no other exception escapes;
- `wait_process` returns an int in 0..255;
- `list_processes` returns a list of at most 65536 ints, each in 1..4194304;
- `get_oom_event` returns a str;
- no call hangs once the agent's connection is gone.
"""

from __future__ import annotations

import asyncio
import json
import struct
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from fuzz._bytes import Cursor, Encoder
from fuzz._conn import MemoryConnection
from fuzz._harness import Harness, Target, Violation, bounded, settle, wait_until, where
from pykata.errors import AgentError
from pykata.protocols import agent_pb2, health_pb2, oci_pb2, status_pb2, ttrpc_pb2
from pykata.runtime.agent_client import AgentClient, StreamEnd
from pykata.ttrpc import Client

_HEADER = struct.Struct(">IIBB")
_MAX = 4 << 20
_RESPONSE = 2
_MAX_CALLS = 12
_MAX_PIDS = 65536
_PID_MAX = 4194304  # the kernel's PID_MAX_LIMIT
# 0xFF, not zeros: out of step, it reads as one oversized header, not as
# 400,000 empty frames.
_FILLER = b"\xff" * (_MAX + 0x1_0000)

# Reply part kinds (a part's first byte, modulo 9).
PART_OK_STREAM, PART_WRONG_STREAM, PART_RAW, PART_FRAME = 0, 1, 2, 3
PART_OVERSIZED, PART_LYING_LENGTH, PART_NOTHING, PART_ODD_TYPE = 4, 5, 6, 7
PART_PROCESS_LIST = 8
_PART_KINDS = 9
_CHUNKED_BYTES = 512
# What happens after a call's reply (bits of the call's last byte).
AFTER_EOF, AFTER_CHUNKED, AFTER_RECONNECT = 1, 2, 4


@dataclass(frozen=True)
class Call:
    name: str
    invoke: Callable[[AgentClient], Awaitable[Any]]
    response: type[Message]


def _calls() -> list[Call]:
    a = agent_pb2
    process = oci_pb2.Process(Args=["sh"], Cwd="/")
    sandbox = a.CreateSandboxRequest(hostname="pod", sandbox_id="sb1")
    create = a.CreateContainerRequest(container_id="c1", exec_id="c1",
                                      OCI=oci_pb2.Spec(Version="1.0.2", Process=process))
    return [
        Call("check", lambda c: c.check(5.0), health_pb2.HealthCheckResponse),
        Call("create_sandbox", lambda c: c.create_sandbox(sandbox), empty_pb2.Empty),
        Call("destroy_sandbox", lambda c: c.destroy_sandbox(), empty_pb2.Empty),
        Call("guest_details", lambda c: c.guest_details(), a.GuestDetailsResponse),
        Call("create_container", lambda c: c.create_container(create), empty_pb2.Empty),
        Call("start_container", lambda c: c.start_container("c1"), empty_pb2.Empty),
        Call("remove_container", lambda c: c.remove_container("c1"), empty_pb2.Empty),
        Call("exec_process", lambda c: c.exec_process("c1", "e1", process), empty_pb2.Empty),
        Call("signal_process", lambda c: c.signal_process("c1", "e1", 15), empty_pb2.Empty),
        Call("wait_process", lambda c: c.wait_process("c1", "e1"), a.WaitProcessResponse),
        Call("write_stdin", lambda c: c.write_stdin("c1", "e1", b"input"),
             a.WriteStreamResponse),
        Call("read_stream", lambda c: c.read_stream("stdout", "c1", "e1", 4096),
             a.ReadStreamResponse),
        Call("read_stream", lambda c: c.read_stream("stderr", "c1", "c1", 1),
             a.ReadStreamResponse),
        Call("close_stdin", lambda c: c.close_stdin("c1", "e1"), empty_pb2.Empty),
        Call("resize", lambda c: c.resize("c1", "e1", 24, 80), empty_pb2.Empty),
        Call("pause_container", lambda c: c.pause_container("c1"), empty_pb2.Empty),
        Call("resume_container", lambda c: c.resume_container("c1"), empty_pb2.Empty),
        Call("update_container",
             lambda c: c.update_container("c1", oci_pb2.LinuxResources()), empty_pb2.Empty),
        Call("stats_container", lambda c: c.stats_container("c1"), a.StatsContainerResponse),
        Call("list_processes", lambda c: c.list_processes("c1"), a.ListProcessesResponse),
        Call("get_oom_event", lambda c: c.get_oom_event(), a.OOMEvent),
    ]


CALLS = _calls()


# --- THE CONTRACT ----------------------------------------------------------------


def _check_outcome(call: Call, task: asyncio.Future[Any]) -> None:
    """CONTRACT: a call returns, or raises AgentError (or StreamEnd from read_stream)."""
    exc = task.exception()
    if exc is None:
        _check_result(call, task.result())
        return
    if isinstance(exc, AgentError):
        return
    if call.name == "read_stream" and isinstance(exc, StreamEnd):
        return
    raise Violation(
        f"contract-{call.name}-raises-{type(exc).__name__}",
        f"{call.name} raised {type(exc).__name__} (not AgentError) at {where(exc)}: {exc}\n"
        + "".join(traceback.format_exception(exc))[-3000:],
    )


def _check_result(call: Call, result: Any) -> None:
    """CONTRACT: the values the methods promise."""
    name = call.name
    if name == "wait_process":
        if type(result) is not int or not 0 <= result <= 255:
            raise Violation("contract-wait_process-range",
                            f"wait_process returned {result!r}, not an int in 0..255")
    elif name == "list_processes":
        if not isinstance(result, list) or len(result) > _MAX_PIDS:
            size = len(result) if isinstance(result, list) else type(result).__name__
            raise Violation("contract-list_processes-size",
                            f"list_processes returned {size} entries, not a list of "
                            f"at most {_MAX_PIDS}")
        bad = [p for p in result if type(p) is not int or not 1 <= p <= _PID_MAX]
        if bad:
            raise Violation("contract-list_processes-pids",
                            f"list_processes returned {bad[:5]!r}: not pids in 1..{_PID_MAX}")
    elif name == "get_oom_event":
        if type(result) is not str:
            raise Violation("contract-get_oom_event-type",
                            f"get_oom_event returned {type(result).__name__}, not str")
    # Beyond the contract, what the signatures say.
    elif name == "read_stream" and not isinstance(result, bytes):
        raise Violation("result-type", f"read_stream returned {type(result).__name__}")
    elif name == "write_stdin" and type(result) is not int:
        raise Violation("result-type", f"write_stdin returned {type(result).__name__}")
    elif name in ("guest_details", "stats_container") and not isinstance(result,
                                                                         call.response):
        raise Violation("result-type", f"{name} returned {type(result).__name__}")


# --- the fake agent ----------------------------------------------------------------


def _status(c: Cursor) -> status_pb2.Status:
    code = c.u8()
    if code > 16:
        code = struct.unpack(">i", struct.pack(">I", c.u32()))[0]
    return status_pb2.Status(code=code, message=c.text())


def _reply(c: Cursor, sid: int) -> list[bytes]:
    """One part of the fake agent's reply to the call on stream `sid`."""
    kind = c.u8() % _PART_KINDS
    if kind == PART_PROCESS_LIST:
        # A process list too long for an input to spell out: [pid, pid + step, ...].
        # Short lists mostly; a count byte of 0xFF asks for one around the
        # 65536 limit, which costs milliseconds to build and check.
        first = struct.unpack(">i", struct.pack(">I", c.u32()))[0]
        step, count = c.u8(), c.u8()
        if count == 0xFF:
            count = _MAX_PIDS - 128 + c.u8()
        listing = json.dumps(list(range(first, first + count * step, step)) if step
                             else [first] * count)
        body = ttrpc_pb2.Response(payload=agent_pb2.ListProcessesResponse(
            process_list=listing.encode()).SerializeToString()).SerializeToString()
        return [_HEADER.pack(len(body), sid, _RESPONSE, 0) + body]
    if kind in (PART_OK_STREAM, PART_WRONG_STREAM, PART_ODD_TYPE, PART_LYING_LENGTH):
        delta = c.u8() if kind == PART_WRONG_STREAM else 0
        frame_type = c.u8() if kind == PART_ODD_TYPE else _RESPONSE
        lie = c.u8() if kind == PART_LYING_LENGTH else 0
        status = _status(c)
        body = ttrpc_pb2.Response(status=status, payload=c.blob()).SerializeToString()
        stream = (sid + (delta - 256 if delta >= 128 else delta)) & 0xFFFF_FFFF
        length = max(0, len(body) + (lie - 256 if lie >= 128 else lie))
        return [_HEADER.pack(length, stream, frame_type, 0) + body]
    if kind == PART_RAW:
        return [c.blob()]
    if kind == PART_FRAME:
        stream = c.u32() if c.u8() & 1 else sid
        frame_type, flags = c.u8(), c.u8()
        body = c.blob()
        return [_HEADER.pack(len(body), stream, frame_type, flags) + body]
    if kind == PART_OVERSIZED:
        size = _MAX + 1 + c.u16()
        head = _HEADER.pack(size, sid, _RESPONSE, 0)
        if not c.u8() & 1:
            return [head]
        # Fed in one piece: the reader then skips it in one go, where many
        # small pieces would cost an event-loop round each.
        return [head, _FILLER[:size]]
    return []


def _request_sids(written: bytes) -> list[int]:
    sids, pos = [], 0
    while len(written) - pos >= _HEADER.size:
        length, sid, _kind, _flags = _HEADER.unpack_from(written, pos)
        sids.append(sid)
        pos += _HEADER.size + length
    return sids


class _Link:
    """One connection: the client under test and the fake agent's end of it."""

    def __init__(self) -> None:
        self.conn = MemoryConnection()
        self.client = AgentClient(Client(self.conn.reader, self.conn.writer))
        self.last_sid = -1


class AgentClientTarget(Target):
    max_len = 4096

    def __init__(self) -> None:
        missing = sorted({c.name for c in CALLS if not hasattr(AgentClient, c.name)})
        if missing:
            raise RuntimeError(f"AgentClient has no {missing}: update fuzz/target_agent_client")
        self.filler_used = False
        #: How each call of the last input ended (its name, and its result or
        #: exception), once the contract held: what tests look at.
        self.outcomes: list[tuple[str, object]] = []

    async def one_input(self, data: bytes) -> None:
        c = Cursor(data)
        links = [_Link()]
        calls: list[tuple[Call, asyncio.Future[Any]]] = []
        self.filler_used = False
        self.outcomes = []
        try:
            while not c.exhausted and len(calls) < _MAX_CALLS:
                await self._one_call(c, links, calls)
            for link in links:
                link.conn.send_eof()
            await wait_until(lambda: all(task.done() for _call, task in calls),
                             "every call to end once the agent's connection is gone: "
                             + ", ".join(call.name for call, task in calls if not task.done()))
            for call, task in calls:
                _check_outcome(call, task)
            self.outcomes = [(call.name, task.exception() or task.result())
                             for call, task in calls]
        finally:
            for link in links:
                await bounded(link.client.close(), "AgentClient.close")
            for _call, task in calls:
                task.cancel()
            await settle()

    async def _one_call(self, c: Cursor, links: list[_Link],
                        calls: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        call = CALLS[c.u8() % len(CALLS)]
        link = links[-1]
        task = asyncio.ensure_future(call.invoke(link.client))
        calls.append((call, task))
        await settle()  # the call writes its request
        sids = _request_sids(link.conn.take_written())
        sid = sids[-1] if sids else link.last_sid + 2
        link.last_sid = sid
        pieces: list[bytes] = []
        for _ in range(c.u8() & 3):
            part = _reply(c, sid)
            if len(part) > 1:  # a whole oversized payload: one per input, they are slow
                if self.filler_used:
                    part = part[:1]
                self.filler_used = True
            pieces += part
        after = c.u8()
        if after & AFTER_CHUNKED:
            # The first bytes in small pieces, the rest at once: an event-loop
            # round per piece, so a big reply in 1-byte pieces would cost seconds.
            size = c.u8() % 13 + 1
            data = b"".join(pieces)
            head = [data[i : i + size] for i in range(0, min(len(data), _CHUNKED_BYTES), size)]
            pieces = [*head, data[_CHUNKED_BYTES:]] if len(data) > _CHUNKED_BYTES else head
        for piece in pieces:
            link.conn.send(piece)
            if len(pieces) > 1:
                await asyncio.sleep(0)
        await settle()
        if after & AFTER_EOF:
            link.conn.send_eof()
            await settle()
        if after & AFTER_RECONNECT:
            await bounded(link.client.close(), "AgentClient.close")
            links.append(_Link())

    # --- seeds -----------------------------------------------------------------

    def seeds(self) -> list[bytes]:
        a = agent_pb2
        answers: dict[str, Message] = {
            "check": health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING),
            "guest_details": a.GuestDetailsResponse(agent_details=a.AgentDetails(
                version="0.1.0", init_daemon=True, storage_handlers=["9p"])),
            "wait_process": a.WaitProcessResponse(status=137),
            "write_stdin": a.WriteStreamResponse(len=5),
            "read_stream": a.ReadStreamResponse(data=b"hello\n"),
            "stats_container": a.StatsContainerResponse(cgroup_stats=a.CgroupStats(
                memory_stats=a.MemoryStats(cache=4096, stats={"anon": 1 << 20}))),
            "list_processes": a.ListProcessesResponse(process_list=b"[1, 7, 42]"),
            "get_oom_event": a.OOMEvent(container_id="c1"),
        }
        seeds = []
        for index, call in enumerate(CALLS):
            answer = answers.get(call.name)
            payload = answer.SerializeToString() if answer is not None else b""
            seeds.append(record(index, ok_part(payload)))
            seeds.append(record(index, ok_part(code=5, message="no such container"),
                                after=AFTER_EOF))
        # Calls in flight together, answered out of order, then a reconnect.
        seeds.append(b"".join([
            record("wait_process"), record("read_stream"), record("list_processes"),
            record("get_oom_event", wrong_stream_part(-4, b"\x08\x00"),
                   frame_part(3, b"data"), after=AFTER_RECONNECT),
            record("check", ok_part(b"\x08\x01")),
        ]))
        seeds.append(record("read_stream", ok_part(code=11, message="EOF"), after=AFTER_CHUNKED,
                            chunk=3))
        seeds.append(record("wait_process", oversized_part(whole=False), after=AFTER_EOF))
        seeds.append(record("list_processes", lying_part(-2, b"\x0a\x03[1]")))
        seeds.append(record("list_processes", process_list_part(1, 200)))
        return seeds


# --- building inputs (seeds, tests) ----------------------------------------------------


def record(call: str | int, *parts: bytes, after: int = 0, chunk: int = 0) -> bytes:
    """One call of an input: `call` (a name or an index in CALLS) answered with `parts`."""
    index = call if isinstance(call, int) else next(
        i for i, c in enumerate(CALLS) if c.name == call)
    if len(parts) > 3:
        raise ValueError("a call is answered with at most 3 parts")
    enc = Encoder().u8(index).u8(len(parts))
    for part in parts:
        enc.raw(part)
    enc.u8(after)
    if after & AFTER_CHUNKED:
        enc.u8(chunk)
    return enc.getvalue()


def _status_fields(enc: Encoder, code: int, message: str) -> Encoder:
    if 0 <= code <= 16:
        return enc.u8(code).text(message)
    return enc.u8(0xFF).u32(code).text(message)


def ok_part(payload: bytes = b"", *, code: int = 0, message: str = "") -> bytes:
    """A Response on the call's own stream: `payload`, or a status `code`."""
    enc = Encoder().u8(PART_OK_STREAM)
    return _status_fields(enc, code, message).blob(payload).getvalue()


def wrong_stream_part(delta: int, payload: bytes = b"", *, code: int = 0) -> bytes:
    """A Response on the call's stream id + `delta` (-128..127)."""
    enc = Encoder().u8(PART_WRONG_STREAM).u8(delta)
    return _status_fields(enc, code, "").blob(payload).getvalue()


def lying_part(delta: int, payload: bytes = b"") -> bytes:
    """A Response whose header's length is off by `delta` (-128..127)."""
    enc = Encoder().u8(PART_LYING_LENGTH).u8(delta)
    return _status_fields(enc, 0, "").blob(payload).getvalue()


def frame_part(frame_type: int, payload: bytes, *, stream: int | None = None) -> bytes:
    """A raw frame of `frame_type` on the call's stream (or on `stream`)."""
    enc = Encoder().u8(PART_FRAME)
    enc = enc.u8(0) if stream is None else enc.u8(1).u32(stream)
    return enc.u8(frame_type).u8(0).blob(payload).getvalue()


def process_list_part(first: int, count: int, step: int = 1) -> bytes:
    """A ListProcessesResponse of `count` pids (< 255, or within 128 of 65536):
    first, first + step, ..."""
    enc = Encoder().u8(PART_PROCESS_LIST).u32(first).u8(step)
    if count < 0xFF:
        return enc.u8(count).getvalue()
    if not 0 <= count - (_MAX_PIDS - 128) <= 0xFF:
        raise ValueError(f"{count} pids cannot be asked for")
    return enc.u8(0xFF).u8(count - (_MAX_PIDS - 128)).getvalue()


def raw_part(data: bytes) -> bytes:
    return Encoder().u8(PART_RAW).blob(data).getvalue()


def oversized_part(*, whole: bool, extra: int = 0) -> bytes:
    """A header announcing more than 4 MiB, with (or without) all those bytes."""
    return Encoder().u8(PART_OVERSIZED).u16(extra).u8(int(whole)).getvalue()


def make_target(harness: Harness) -> Target:
    return AgentClientTarget()
