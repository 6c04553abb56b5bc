"""Task events to containerd: the events service's Forward, over TTRPC_ADDRESS.

Events go out one at a time in the order they were raised (a TaskExit must
never overtake the TaskStart before it), each retried a few times if
containerd is briefly unreachable, and never block the task service.

OOM events come from the guest, which may raise them without end: at most one
per container waits in the queue (more are coalesced into it) and at most
`_LOSSY_LIMIT` in all. Lifecycle events (create, start, exit, delete, ...)
follow what containerd asked for, so they are bounded by its requests, and
are never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from pykata.protocols import events_service_pb2
from pykata.ttrpc import Client, TtrpcError

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
_ATTEMPTS = 5
# Topics a guest can raise at will: coalesced and bounded, never the others.
_LOSSY_TOPICS = {"/tasks/oom"}
_LOSSY_LIMIT = 256

TOPICS = {
    "TaskCreate": "/tasks/create",
    "TaskStart": "/tasks/start",
    "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete",
    "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed",
    "TaskOOM": "/tasks/oom",
    "TaskCheckpointed": "/tasks/checkpointed",
}


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def pack(message: Message) -> any_pb2.Any:
    # containerd's typeurl names protobuf types (events, metrics) by their full
    # name, without the type.googleapis.com/ prefix that Any.Pack would add.
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name,
                       value=message.SerializeToString())


class EventPublisher:
    def __init__(self, address: str, namespace: str) -> None:
        self._address = address.removeprefix("unix://")
        self._namespace = namespace
        self._queue: asyncio.Queue[tuple[events_service_pb2.Envelope, str | None]] = (
            asyncio.Queue())
        self._lossy_queued: set[str] = set()
        self.dropped = 0
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        topic = TOPICS[event.DESCRIPTOR.name]
        envelope = events_service_pb2.Envelope(
            timestamp=now(), namespace=self._namespace, topic=topic, event=pack(event),
        )
        if not self._address:
            log.debug("no TTRPC_ADDRESS: not publishing %s", topic)
            return
        lossy: str | None = None
        if topic in _LOSSY_TOPICS:
            lossy = f"{topic} {getattr(event, 'container_id', '')}"
            if lossy in self._lossy_queued or len(self._lossy_queued) >= _LOSSY_LIMIT:
                self.dropped += 1
                return
            self._lossy_queued.add(lossy)
        self._queue.put_nowait((envelope, lossy))
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            envelope, lossy = await self._queue.get()
            if lossy is not None:
                self._lossy_queued.discard(lossy)
            await self._forward(envelope)
            self._queue.task_done()

    async def _forward(self, envelope: events_service_pb2.Envelope) -> None:
        request = events_service_pb2.ForwardRequest(envelope=envelope)
        for attempt in range(_ATTEMPTS):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect_unix(self._address)
                await self._client.call(
                    EVENTS_SERVICE, "Forward", request, empty_pb2.Empty, timeout=10,
                    metadata={NAMESPACE_KEY: self._namespace},
                )
                log.debug("published %s", envelope.topic)
                return
            except (OSError, TtrpcError) as exc:
                log.warning("publishing %s (attempt %d): %s", envelope.topic, attempt + 1, exc)
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await asyncio.sleep(0.1 * 2**attempt)
        log.error("gave up publishing %s to %s", envelope.topic, self._address)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout`) until every queued event was sent."""
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
        if self._client is not None:
            await self._client.aclose()
