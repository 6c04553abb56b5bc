"""What the pod's event log costs an agent call: the same calls with and
without its observer, interleaved, medians side by side.

An in-process ttRPC server answers Health.Check over a socketpair (no VM:
the figure is the host's own cost per call, which a VM's answer only
hides). Each round times --calls calls without the observer and with it,
in alternating order, so load from elsewhere falls on both.

    .venv/bin/python -m benchmarks.bench_event_log [--rounds 15] [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time
import timeit

from pykata.channels import HEALTH_SERVICE
from pykata.protocols import health_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.event_log import PodEventLog
from pykata.ttrpc import RequestContext, Server


async def _check(req: health_pb2.CheckRequest, ctx: RequestContext
                 ) -> health_pb2.HealthCheckResponse:
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def _timed(agent: AgentClient, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        await agent.check(10)
    return (time.perf_counter() - t0) / calls * 1e6


async def main(rounds: int, calls: int) -> None:
    host, guest = socket.socketpair()
    server = Server()
    server.register(HEALTH_SERVICE, "Check", health_pb2.CheckRequest, _check)
    reader, writer = await asyncio.open_connection(sock=guest)
    serving = asyncio.ensure_future(server.serve_connection(reader, writer))
    agent = await AgentClient.over_socket(host)
    log = PodEventLog()
    without, with_log = [], []
    await _timed(agent, calls)  # warm up
    for i in range(rounds):
        # Which goes first alternates: a burst of load elsewhere is not
        # always on the same side.
        for observed in ((False, True) if i % 2 else (True, False)):
            agent.observers[:] = [log.observe_call] if observed else []
            (with_log if observed else without).append(await _timed(agent, calls))
    await agent.close()
    serving.cancel()
    a, b = statistics.median(without), statistics.median(with_log)
    print(f"agent call (Health.Check, in-process server), median of {rounds} rounds "
          f"x {calls} calls:")
    print(f"  without the event log: {a:8.1f} us/call")
    print(f"  with the event log:    {b:8.1f} us/call   (+{b - a:.1f} us, "
          f"{(b - a) / a * 100:+.1f}%)")
    print(f"  entries kept: {len(log.since(0))} (ring-bounded), last seq {log.last_seq}")
    one = timeit.timeit(lambda: log.observe_call("Check", 0.001, None), number=100000) / 100000
    print(f"  the observer alone (timeit, 100000 calls): {one * 1e6:.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.calls))
