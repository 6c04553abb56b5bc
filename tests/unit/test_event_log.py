"""The pod's event log: bounded rings, escaped text, long polls."""

from __future__ import annotations

import asyncio

from pykata.errors import AgentError
from pykata.runtime.event_log import RPC, PodEventLog, describe_pod_event
from pykata.runtime.pod import PodEvent


def test_entries_come_in_order_after_a_seq() -> None:
    """Each entry gets the next seq; `since` returns what came after, oldest first."""
    log = PodEventLog()
    log.add("pod", "started")
    log.observe_call("CreateContainer", 0.25, None)
    log.add("container", "c1: created")
    assert [e.seq for e in log.since(0)] == [1, 2, 3]
    assert [e.text for e in log.since(1)] == ["CreateContainer 0.250s", "c1: created"]
    assert log.last_seq == 3
    assert log.since(3) == []


def test_many_successful_calls_do_not_push_out_lifecycle_and_errors() -> None:
    """A chatty container's thousands of reads fill their own ring only."""
    log = PodEventLog(ring_size=8)
    log.add("pod", "started")
    log.observe_call("StartContainer", 1.0, AgentError("no such file"))
    for _ in range(1000):
        log.observe_call("ReadStdout", 0.001, None)
    kept = log.since(0)
    assert len(kept) == 10
    assert kept[0].text == "started"
    assert kept[1].error and "StartContainer failed after 1.000s: no such file" in kept[1].text
    assert all(e.kind == RPC and e.text.startswith("ReadStdout") for e in kept[2:])
    assert kept[-1].seq == 1002
    assert [e.text for e in log.errors()] == [kept[1].text]


def test_guest_text_is_escaped_and_bounded() -> None:
    """An agent's error (the guest's words) cannot put escapes on a terminal or grow the log."""
    log = PodEventLog(text_limit=100)
    hostile = "\x1b]0;owned\x07" + "A" * 10000 + "\nforged line"
    log.observe_call("ExecProcess", 0.1, AgentError(hostile))
    (entry,) = log.since(0)
    assert "\x1b" not in entry.text and "\x07" not in entry.text and "\n" not in entry.text
    assert len(entry.text) < 120
    assert entry.text.endswith("\\nforged line")


def test_a_cancelled_call_is_not_an_error() -> None:
    log = PodEventLog()
    log.observe_call("GetOOMEvent", 3.0, asyncio.CancelledError())
    (entry,) = log.since(0)
    assert not entry.error and "cancelled" in entry.text


def test_limit_caps_one_read() -> None:
    log = PodEventLog()
    for i in range(10):
        log.add("pod", f"e{i}")
    assert [e.seq for e in log.since(0, limit=3)] == [1, 2, 3]


def test_wait_returns_at_once_when_there_is_something() -> None:
    async def run() -> None:
        log = PodEventLog()
        log.add("pod", "started")
        assert [e.text for e in await log.wait(0, 30)] == ["started"]
    asyncio.run(asyncio.wait_for(run(), 5))


def test_wait_wakes_at_a_new_entry_and_times_out_without_one() -> None:
    async def run() -> None:
        log = PodEventLog()
        log.add("pod", "started")
        waiter = asyncio.ensure_future(log.wait(1, 30))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        log.add("vm", "the VM stopped unexpectedly", error=True)
        got = await asyncio.wait_for(waiter, 5)
        assert [e.seq for e in got] == [2]
        assert await log.wait(2, 0.05) == []
    asyncio.run(run())


def test_pod_events_are_described() -> None:
    assert describe_pod_event(PodEvent("stopped")) == ("pod", "stopped")
    assert describe_pod_event(PodEvent("exited", "c1", "e1", exit_status=137)) == (
        "container", "c1 exec e1: exited (status 137)")
    assert describe_pod_event(PodEvent("started", "c1")) == ("container", "c1: started")


def test_an_entry_prints_on_one_line() -> None:
    log = PodEventLog()
    entry = log.add("rpc", "Check failed", error=True)
    line = entry.line()
    assert "\n" not in line and " rpc " in line and "ERROR Check failed" in line


def test_settle_waits_for_woken_polls_only() -> None:
    """The owner's close lets a woken follower's poll return, and does not
    wait for an idle one."""
    async def run() -> None:
        log = PodEventLog()
        log.add("pod", "started")
        idle = asyncio.ensure_future(log.wait(1, 30))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await log.settle(5)
        assert loop.time() - t0 < 1 and not idle.done()
        log.add("container", "c1: exited (status 0)")
        # Woken, answered: settle waits for the follower's next poll.
        settle = asyncio.ensure_future(log.settle(5))
        await asyncio.sleep(0.2)
        assert idle.done() and [e.seq for e in idle.result()] == [2]
        assert not settle.done()
        again = asyncio.ensure_future(log.wait(2, 30))
        await asyncio.wait_for(settle, 1)
        assert not again.done()
        again.cancel()
    asyncio.run(asyncio.wait_for(run(), 10))


def test_failing_calls_do_not_push_out_lifecycle_entries() -> None:
    """A guest failing a call the owner repeats (GetOOMEvent) fills the
    failures' ring only: the pod's steps and the VM's exit stay."""
    log = PodEventLog(ring_size=8)
    log.add("pod", "started")
    log.add("vm", "exited unexpectedly")
    for i in range(1000):
        log.observe_call("GetOOMEvent", 0.001, AgentError(f"no event {i}"))
    kept = log.since(0)
    assert [e.text for e in kept[:2]] == ["started", "exited unexpectedly"]
    assert len(kept) == 10 and kept[-1].text.endswith("no event 999")
    assert len(log.errors()) == 8


def test_a_repeated_failure_is_one_counted_entry() -> None:
    """The same call failing the same way, again and again: one entry that
    counts them, the latest seq (a follower sees the count grow); a
    different error starts a new entry."""
    log = PodEventLog(ring_size=8)
    log.add("pod", "started")
    for _ in range(500):
        log.observe_call("GetOOMEvent", 0.002, AgentError("guest says no"))
    log.observe_call("GetOOMEvent", 0.002, AgentError("something else"))
    log.observe_call("GetOOMEvent", 0.002, AgentError("something else"))
    kept = log.since(0)
    assert [e.text for e in kept] == [
        "started",
        "GetOOMEvent failed after 0.002s: guest says no (repeated 500 times)",
        "GetOOMEvent failed after 0.002s: something else (repeated 2 times)"]
    assert kept[-1].seq == log.last_seq == 503
    assert log.since(kept[1].seq)[0].text.endswith("(repeated 2 times)")
