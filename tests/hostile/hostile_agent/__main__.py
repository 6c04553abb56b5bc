"""A hostile agent, booted in a real VM in place of pykata's (its own initrd).

It speaks just enough of the agent API for a container to be created and run,
then misbehaves as `hostile=<mode>` on the kernel command line says:

    exit          WaitProcess reports exit status -1
    oom           GetOOMEvent answers at once, every time: an endless OOM flood
    frames        a flood of frames nobody asked for (unknown streams, data
                  frames, unknown types, an oversized frame) around every answer
    escape        StartContainer fails with ANSI escapes and control characters
    invalid       CreateContainer is answered with bytes that are no response
    ps            ListProcesses answers out-of-range pids
    console       StartContainer writes escapes to the console, then the agent dies
    metrics       GetMetrics answers forged series in names, 10000 interfaces,
                  out-of-range numbers
    metrics-stall GetMetrics never answers
    spans         GetTraceSpans floods: thousands of spans under the host's span
                  with absurd times, names and attributes, spans in other traces
                  and under spans the host never made
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pykata.agent.channel import open_serial
from pykata.protocols import agent_pb2, health_pb2, status_pb2, ttrpc_pb2
from pykata.ttrpc.framing import MessageType
from pykata.ttrpc.protocol import FrameStream

ESCAPES = "\x1b[2J\x1b[31m\x1b]0;owned by the guest\x07\rforged: all is well\x9b"
OK, NOT_FOUND, OUT_OF_RANGE, INTERNAL, UNIMPLEMENTED = 0, 5, 11, 13, 12
# How long a container "runs" before WaitProcess answers (the oom mode floods meanwhile).
RUN_SECONDS = {"oom": 3.0, "ps": 600.0, "metrics": 600.0, "metrics-stall": 600.0}
FORGED = 'eth0"} 1\npykata_forged{sandbox_id="other'


def hostile_metrics() -> agent_pb2.GuestMetrics:
    reply = agent_pb2.GuestMetrics(load1=float("nan"), load5=-1.0, load15=1e308,
                                   agent_resident_bytes=(1 << 64) - 1)
    reply.memory_bytes["MemTotal"] = (1 << 64) - 1
    reply.memory_bytes[FORGED] = 1
    reply.cpu_seconds[FORGED] = 1.0
    reply.cpu_seconds["idle"] = float("inf")
    reply.interfaces.add(name=FORGED, rx_bytes=1)
    reply.interfaces.add(name=ESCAPES, rx_bytes=1)
    for n in range(10_000):
        reply.interfaces.add(name=f"if{n}", rx_bytes=(1 << 64) - 1)
    reply.disks.add(name="../../etc/passwd", read_bytes=1)
    return reply


def mode() -> str:
    for word in Path("/proc/cmdline").read_text().split():
        if word.startswith("hostile="):
            return word.partition("=")[2]
    return ""


class HostileAgent:
    def __init__(self, frames: FrameStream, mode: str) -> None:
        self.frames = frames
        self.mode = mode
        self.container = ""
        self.exited = asyncio.Event()
        self.junk_stream = 1_000_001
        self.traceparents: list[str] = []

    async def answer(self, stream: int, message: object = None, code: int = OK,
                     text: str = "") -> None:
        if self.mode == "frames":
            await self.flood()
        payload = message.SerializeToString() if message is not None else b""  # type: ignore[attr-defined]
        envelope = ttrpc_pb2.Response(status=status_pb2.Status(code=code, message=text),
                                      payload=payload)
        await self.frames.write_frame(stream, MessageType.RESPONSE, envelope.SerializeToString())

    async def flood(self) -> None:
        for _ in range(300):
            self.junk_stream += 2
            await self.frames.write_frame(self.junk_stream, MessageType.RESPONSE, b"\x08\x01")
            await self.frames.write_frame(self.junk_stream, MessageType.DATA, b"junk")
            await self.frames.write_frame(self.junk_stream, 77, b"a type nobody knows")

    async def oversized(self) -> None:
        # A frame over the 4 MiB limit: the host must skip it and stay in sync.
        header = (5 << 20).to_bytes(4, "big") + (999_999).to_bytes(4, "big") + bytes([2, 0])
        self.frames._writer.write(header + b"\0" * (5 << 20))
        await self.frames._writer.drain()

    async def handle(self, stream: int, request: ttrpc_pb2.Request) -> None:
        method = request.method
        self.traceparents += [kv.value for kv in request.metadata if kv.key == "traceparent"]
        if method == "Check":
            await self.answer(stream, health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVING))
        elif method == "CreateSandbox":
            if self.mode == "frames":
                await self.oversized()
            await self.answer(stream)
        elif method == "CreateContainer":
            self.container = agent_pb2.CreateContainerRequest.FromString(
                request.payload).container_id
            if self.mode == "invalid":
                await self.frames.write_frame(stream, MessageType.RESPONSE, b"\xff\xfe\xfd")
            else:
                await self.answer(stream)
        elif method == "StartContainer":
            await self.start(stream)
        elif method == "WaitProcess":
            await self.exited.wait()
            status = -1 if self.mode == "exit" else 0
            await self.answer(stream, agent_pb2.WaitProcessResponse(status=status))
        elif method in ("ReadStdout", "ReadStderr"):
            await self.exited.wait()
            await self.answer(stream, code=OUT_OF_RANGE, text="end of stream")
        elif method == "WriteStdin":
            data = agent_pb2.WriteStreamRequest.FromString(request.payload).data
            await self.answer(stream, agent_pb2.WriteStreamResponse(len=len(data)))
        elif method == "SignalProcess":
            self.exited.set()
            await self.answer(stream)
        elif method == "GetOOMEvent":
            await self.oom(stream)
        elif method == "ListProcesses":
            listing = b"[-1, 99999999999, 7]" if self.mode == "ps" else b"[1]"
            await self.answer(stream, agent_pb2.ListProcessesResponse(process_list=listing))
        elif method == "GetMetrics":
            if self.mode == "metrics-stall":
                await asyncio.Event().wait()
            await self.answer(stream, hostile_metrics())
        elif method == "GetTraceSpans" and self.mode == "spans":
            await self.answer(stream, self.spans())
        elif method == "StatsContainer":
            await self.answer(stream, agent_pb2.StatsContainerResponse())
        elif method in ("RemoveContainer", "DestroySandbox", "CloseStdin", "TtyWinResize",
                        "PauseContainer", "ResumeContainer", "UpdateContainer"):
            await self.answer(stream)
        else:
            await self.answer(stream, code=UNIMPLEMENTED, text=f"{method}?")

    async def start(self, stream: int) -> None:
        if self.mode == "escape":
            await self.answer(stream, code=INTERNAL, text=ESCAPES)
            return
        if self.mode == "console":
            with open("/dev/console", "w") as console:
                console.write(f"\n{ESCAPES}\n")
            os._exit(1)  # /init ends the VM once the agent is gone
        await self.answer(stream)
        asyncio.get_running_loop().call_later(RUN_SECONDS.get(self.mode, 0.3), self.exited.set)

    def spans(self) -> agent_pb2.TraceSpans:
        out = agent_pb2.TraceSpans(dropped=2**32 - 1)
        for traceparent in self.traceparents[-3:]:
            _, trace_hex, span_hex, _ = traceparent.split("-")
            trace_id, parent = bytes.fromhex(trace_hex), bytes.fromhex(span_hex)
            for i in range(600):
                out.spans.add(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent,
                              name=f"flood{i}", start_unix_nano=0, end_unix_nano=2**64 - 1,
                              attributes=[agent_pb2.SpanAttribute(key=f"k{j}", value=ESCAPES)
                                          for j in range(12)])
            out.spans.add(trace_id=os.urandom(16), span_id=os.urandom(8),
                          parent_span_id=parent, name="another-trace")
            out.spans.add(trace_id=trace_id, span_id=os.urandom(8),
                          parent_span_id=os.urandom(8), name="made-up-parent")
            out.spans.add(trace_id=trace_id, span_id=parent, parent_span_id=parent,
                          name="the-host-span-itself")
        self.traceparents.clear()
        return out

    async def oom(self, stream: int) -> None:
        if self.mode != "oom":
            await asyncio.Event().wait()  # no OOM, ever
        await self.answer(stream, agent_pb2.OOMEvent(container_id=self.container))


async def serve() -> None:
    reader, writer = await open_serial()
    frames = FrameStream(reader, writer)
    agent = HostileAgent(frames, mode())
    tasks: set[asyncio.Task[None]] = set()
    while (frame := await frames.read_frame()) is not None:
        request = ttrpc_pb2.Request.FromString(frame.payload)
        task = asyncio.ensure_future(agent.handle(frame.header.stream_id, request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


asyncio.run(serve())
