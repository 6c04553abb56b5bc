"""One scrape: every pod's owner asked for its Metrics at once, each within
its own deadline, so one stuck pod (a stopped owner, a busy guest) costs the
scrape at most that deadline and is skipped, never waited for."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pykata.channels import CONTROL_SERVICE
from pykata.metrics.discovery import FoundPod
from pykata.protocols import pod_pb2
from pykata.ttrpc import Client, TtrpcError

log = logging.getLogger(__name__)

DEFAULT_POD_TIMEOUT = 1.0


@dataclass
class Answer:
    pod: FoundPod
    metrics: pod_pb2.PodMetrics


@dataclass
class Scrape:
    answers: list[Answer] = field(default_factory=list)
    # The pods that did not answer in time, or failed: id -> why.
    skipped: dict[str, str] = field(default_factory=dict)


async def ask(pod: FoundPod, timeout: float, *, guest: bool = True) -> pod_pb2.PodMetrics:
    """The pod's Metrics from its owner (with the guest's figures if
    `guest`), within `timeout` seconds in all."""
    async with asyncio.timeout(timeout):
        client = await Client.connect_unix(pod.socket)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            # The owner is told a little less, so its answer (host figures
            # without the guest's, if the guest is slow) still arrives.
            return await client.call(CONTROL_SERVICE, "Metrics",
                                     pod_pb2.MetricsRequest(skip_guest=not guest),
                                     pod_pb2.PodMetrics,
                                     timeout=max(0.01, (deadline - loop.time()) * 0.9))
        finally:
            await client.aclose()


async def scrape(pods: list[FoundPod], timeout: float = DEFAULT_POD_TIMEOUT, *,
                 guest: bool = True) -> Scrape:
    result = Scrape()
    replies = await asyncio.gather(*(ask(pod, timeout, guest=guest) for pod in pods),
                                   return_exceptions=True)
    for pod, reply in zip(pods, replies, strict=True):
        if isinstance(reply, pod_pb2.PodMetrics):
            result.answers.append(Answer(pod, reply))
            continue
        if isinstance(reply, TimeoutError):
            why = f"no answer within {timeout}s"
        elif isinstance(reply, (OSError, TtrpcError)):
            why = str(reply) or type(reply).__name__
        else:
            # Not a pod's fault: a bug here must show, not count as a skip.
            raise reply
        log.info("pod %s skipped: %s", pod.id, why)
        result.skipped[pod.id] = why
    return result
