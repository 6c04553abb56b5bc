"""What a pod's owner tells `pykata monitor` (the control socket's Metrics):
its agent calls' times, the start phases, the VM source, and the guest's
figures it asks the agent for.

The owner is the one process that sees every agent call of its pod, so the
call histogram is kept here, fed by `AgentClient.observers`.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pykata.errors import PykataError
from pykata.protocols import pod_pb2

if TYPE_CHECKING:
    from pykata.runtime.pod import Pod

# Upper bounds in seconds: a local call is milliseconds, a boot step under
# emulation tens of seconds.
RPC_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0, 30.0, 60.0, float("inf"))
# Method names come from the host's own code; the bound only guards a bug.
MAX_METHODS = 64
# The owner keeps this share of the monitor's deadline for the guest: the
# rest answers with the host's figures alone when the guest is slow.
GUEST_SHARE = 0.7


@dataclass
class _Method:
    counts: list[int] = field(default_factory=lambda: [0] * len(RPC_BOUNDS))
    total: float = 0.0
    errors: int = 0


class RpcTimes:
    """A histogram of the agent calls' seconds per method: an observer
    (`AgentClient.observers`)."""

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}

    def observe(self, method: str, seconds: float, error: BaseException | None) -> None:
        entry = self._methods.get(method)
        if entry is None:
            if len(self._methods) >= MAX_METHODS:
                return
            entry = self._methods[method] = _Method()
        entry.counts[bisect.bisect_left(RPC_BOUNDS, seconds)] += 1
        entry.total += seconds
        entry.errors += error is not None

    def messages(self) -> list[pod_pb2.RpcTimes]:
        out = []
        for method, entry in sorted(self._methods.items()):
            cumulative, running = [], 0
            for count in entry.counts:
                running += count
                cumulative.append(running)
            out.append(pod_pb2.RpcTimes(method=method, buckets=cumulative,
                                        sum_seconds=entry.total, errors=entry.errors))
        return out


async def pod_metrics(pod: Pod, deadline: float | None, *, guest: bool = True
                      ) -> pod_pb2.PodMetrics:
    """The pod's metrics; the guest's part (unless not `guest`) within
    `deadline` seconds (the caller's), else `guest_error` says why it is
    missing."""
    sandbox = pod.sandbox
    reply = pod_pb2.PodMetrics(
        id=pod.id, front_end=sandbox.front_end, owner_pid=os.getpid(), vm_pid=pod.vm_pid,
        boot=sandbox.boot, rpc_bounds=RPC_BOUNDS, rpcs=sandbox.rpc_times.messages(),
        start_seconds=dataclasses.asdict(sandbox.times),
        containers={c.id: c.lifecycle.status.value for c in pod.containers.values()})
    agent = sandbox.agent
    if not guest:
        reply.guest_error = "not asked for"
        return reply
    if agent is None or pod.lifecycle.stopped:
        reply.guest_error = "the pod has stopped"
        return reply
    try:
        figures = await agent.guest_metrics(
            timeout=max(deadline, 0.0) * GUEST_SHARE if deadline is not None else None)
    except PykataError as exc:
        reply.guest_error = exc.message
    else:
        reply.has_guest = True
        reply.guest.CopyFrom(figures)
    return reply
