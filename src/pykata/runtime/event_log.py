"""A pod's event log: what happened to it, bounded, for `pykata events`.

The pod's owner keeps it in memory: lifecycle steps (the pod's and its
containers'), every agent call with its duration and error (told by
`AgentClient.observers`), the VM's exit. Other pykata processes read it
through the control socket (`Events`), so it is the same whichever front
end owns the pod.

Bounded twice: entries are cut to `TEXT_LIMIT` characters, and the log
keeps three rings: successful agent calls, failed agent calls, and
everything else (lifecycle steps, VM exits). A container that writes a lot
makes thousands of successful ReadStdout calls, and a guest can make its
agent fail a call the owner repeats (GetOOMEvent) as often as it likes; in a
shared ring either would push out the line that says why the pod broke.
A failure that repeats the one before it (same call, same error) replaces
it with one entry that counts them.

Text is escaped as guest text (`untrusted.guest_line`): an agent's error
message is the guest's words, and a reader prints entries on a terminal.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from pykata.untrusted import guest_line

# Entries kept per ring, and characters per entry.
RING_SIZE = 512
TEXT_LIMIT = 512
# The most entries one read returns (a client asks again from the last seq).
MAX_READ = 1024

# How long a follower answered is expected back with its next poll.
FOLLOWER_RETURN = 2.0

# Kinds of entry.
POD = "pod"  # the pod's own steps: start, stop
CONTAINER = "container"  # a container's or process's step
RPC = "rpc"  # an agent call
VM = "vm"  # the VM: its exit


class EventEntry(NamedTuple):
    # A tuple: made for every agent call, so cheap to make (a frozen
    # dataclass costs several times more).
    # Increasing from 1 for the pod's life: a reader asks for what came after.
    seq: int
    time: float  # seconds since the epoch
    kind: str
    text: str
    error: bool = False

    def line(self) -> str:
        """The entry as `pykata events` prints it."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + f"{self.time % 1:.3f}"[1:]
        mark = " ERROR" if self.error else ""
        return f"{stamp} {self.seq:>6} {self.kind:<9}{mark} {self.text}"


class PodEventLog:
    def __init__(self, ring_size: int = RING_SIZE, text_limit: int = TEXT_LIMIT) -> None:
        self._calls: deque[EventEntry] = deque(maxlen=ring_size)
        self._failures: deque[EventEntry] = deque(maxlen=ring_size)
        self._events: deque[EventEntry] = deque(maxlen=ring_size)
        # The last failure's call and error, and how many times in a row.
        self._repeat: tuple[str, str] | None = None
        self._repeats = 0
        self._seq = itertools.count(1)
        self._text_limit = text_limit
        self._last = 0
        # The seq each waiting long poll asked after, and when each answer
        # to a long poll went out whose reader has not polled again yet.
        self._polls: list[int] = []
        self._answered: deque[float] = deque(maxlen=64)
        # Woken (and replaced) at each new entry: what long-polling readers wait on.
        # (An Event binds to a loop only when first waited on.)
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._last

    def add(self, kind: str, text: str, *, error: bool = False) -> EventEntry:
        entry = EventEntry(next(self._seq), time.time(), kind,
                           guest_line(text, self._text_limit), error)
        self._last = entry.seq
        ring = (self._events if kind != RPC else self._failures if error else self._calls)
        ring.append(entry)
        if self._polls:  # nobody waits most of the time: no Event to replace
            self._changed.set()
            self._changed = asyncio.Event()
        return entry

    def observe_call(self, method: str, seconds: float, error: BaseException | None) -> None:
        """An `AgentClient` observer: one entry per agent call."""
        if isinstance(error, asyncio.CancelledError):
            # The owner gave up waiting (a long poll at teardown): not the guest's fault.
            self.add(RPC, f"{method} cancelled after {seconds:.3f}s")
        elif error is not None:
            text = f"{method} failed after {seconds:.3f}s: {error}"
            key = (method, str(error))
            if key == self._repeat and self._failures and \
                    self._failures[-1].seq == self._last:
                # The same failure again, nothing in between: one entry,
                # counted, takes the last one's place.
                self._failures.pop()
                self._repeats += 1
                text += f" (repeated {self._repeats} times)"
            else:
                self._repeat, self._repeats = key, 1
            self.add(RPC, text, error=True)
        else:
            self.add(RPC, f"{method} {seconds:.3f}s")

    def pod_started(self, sandbox: Any) -> None:
        """The pod's sandbox is up: how its VM started and what each phase took."""
        times = sandbox.times
        self.add(POD, f"started: {sandbox.boot or 'unknown'} boot, VM pid "
                      f"{(sandbox.vm.pid or 0) if sandbox.vm is not None else 0}; "
                      f"VM launch {times.vm_launch:.3f}s, agent ready {times.agent_ready:.3f}s, "
                      f"sandbox create {times.sandbox_create:.3f}s")

    def since(self, seq: int, limit: int = MAX_READ) -> list[EventEntry]:
        """The entries kept with a seq above `seq`, oldest first, at most `limit`."""
        merged = sorted(_after(self._calls, seq) + _after(self._failures, seq)
                        + _after(self._events, seq), key=lambda e: e.seq)
        return merged[:max(0, limit)]

    def errors(self) -> list[EventEntry]:
        return sorted([e for e in self._events if e.error] + list(self._failures),
                      key=lambda e: e.seq)

    async def wait(self, seq: int, timeout: float) -> list[EventEntry]:
        """Entries after `seq`; when there are none, wait up to `timeout`
        seconds for one (a `--follow` reader's long poll)."""
        if timeout <= 0:
            return self.since(seq)
        loop = asyncio.get_running_loop()
        if self._answered:
            self._answered.popleft()  # a follower is back
        found = self.since(seq)
        if not found:
            changed = self._changed
            self._polls.append(seq)
            try:
                await asyncio.wait_for(changed.wait(), timeout)
            except TimeoutError:
                return []
            finally:
                self._polls.remove(seq)
            found = self.since(seq)
        self._answered.append(loop.time())
        return found

    async def settle(self, timeout: float) -> None:
        """Let the long polls woken by the last entries return (up to
        `timeout` s), and their replies go out: the owner calls this before
        it closes the control socket, so a follower sees how the pod ended."""
        # Waited for: polls with something new to return, and followers
        # just answered that have not polled again (the last entry may have
        # come in between). An idle follower must not slow every pod's end.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def pending() -> bool:
            now = loop.time()
            return (any(seq < self._last for seq in self._polls)
                    or any(now - t < FOLLOWER_RETURN for t in self._answered))

        woken = False
        while pending() and loop.time() < deadline:
            woken = True
            await asyncio.sleep(0.01)
        if woken:
            # The handlers that returned write their replies on the next turns.
            await asyncio.sleep(0.05)


def _after(ring: Iterable[EventEntry], seq: int) -> list[EventEntry]:
    return [e for e in ring if e.seq > seq]


class _PodEventLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def container_id(self) -> str: ...
    @property
    def exec_id(self) -> str: ...
    @property
    def exit_status(self) -> int: ...


def describe_pod_event(event: _PodEventLike) -> tuple[str, str]:
    """The kind and text of the entry for one of the pod's own events."""
    if not event.container_id:
        return POD, event.kind
    who = event.container_id + (f" exec {event.exec_id}" if event.exec_id else "")
    text = f"{who}: {event.kind}"
    if event.kind in ("exited", "deleted"):
        text += f" (status {event.exit_status})"
    return CONTAINER, text
