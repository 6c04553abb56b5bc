"""The pod's event log over a fake VM and agent: lifecycle steps, agent calls
with their errors, the VM's death, and reading it through the control socket
(`Events`, its long poll) and `pykata events`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.cli import events_cmd
from pykata.errors import NotFoundError, PykataError
from pykata.runtime.container import bind_rootfs
from pykata.runtime.control import control_socket, serve_control
from pykata.runtime.control_client import PodClient
from tests.unit.pod_fakes import fake_pod, spec


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    yield root


def _rootfs(tmp_path: Path) -> object:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir(exist_ok=True)
    mounts = bind_rootfs(rootfs)
    return lambda _container: mounts


async def test_lifecycle_calls_and_vm_death_are_logged(tmp_path: Path) -> None:
    """start, the container's steps, its agent calls (a failed one marked an
    error), and the VM's unexpected exit, in order."""
    pod, source, _ = fake_pod(tmp_path)
    await pod.start()
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.start_process("web")
    with pytest.raises(PykataError):
        await pod.kill("web", "", 99)  # refused before the guest is asked: not an RPC
    assert pod.sandbox.agent is not None
    with pytest.raises(PykataError):
        await pod.sandbox.agent.start_container("nosuch")
    source.vms[0].die()
    await asyncio.wait_for(pod.wait("web"), 5)
    texts = [(e.kind, e.text, e.error) for e in pod.events.since(0)]
    kinds = [k for k, _, _ in texts]
    assert texts[0] == ("pod", "starting (run)", False)
    started = next(i for i, (k, t, _) in enumerate(texts) if t.startswith("started: cold boot"))
    # The guest's setup calls during the start are in the log too.
    assert any(t.startswith("CreateSandbox ") for _, t, _ in texts[:started])
    assert ("container", "web: created", False) in texts
    assert ("container", "web: started", False) in texts
    assert any(k == "rpc" and t.startswith("CreateContainer ") for k, t, _ in texts)
    assert any(k == "rpc" and t.startswith("StartContainer ") for k, t, _ in texts)
    assert any(k == "rpc" and e and t.startswith("StartContainer failed") for k, t, e in texts)
    assert ("vm", "the VM stopped unexpectedly (status 0)", True) in texts
    assert texts.index(("container", "web: started", False)) < kinds.index("vm")
    assert any("exited (status" in t for _, t, _ in texts)
    await pod.stop()
    assert pod.events.since(0)[-1].text == "stopped"


async def test_a_failed_start_is_logged(tmp_path: Path) -> None:
    from tests.unit.pod_fakes import FakeSource
    pod, _, _ = fake_pod(tmp_path, source=FakeSource(fail=PykataError("no QEMU here")))
    with pytest.raises(PykataError):
        await pod.start()
    starting, entry = pod.events.since(0)
    assert starting.text == "starting (run)"
    assert entry.error and entry.text == "start failed: no QEMU here"


async def test_events_over_the_control_socket_and_a_long_poll(tmp_path: Path) -> None:
    """Another process reads the log from a seq, and a follower's poll wakes
    at the next entry; an over-long wait is clamped, not refused."""
    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    path = control_socket(pod.sandbox.paths.run_dir)
    server = await serve_control(pod, path)
    try:
        async with await PodClient.connect(path, "pod1") as client:
            reply = await client.events()
            assert reply.entries and reply.entries[0].seq == 1
            assert reply.entries[0].text == "starting (run)"
            last = reply.last_seq
            assert reply.entries[-1].seq == last
            poll = asyncio.ensure_future(client.events(last, 1e9))
            await asyncio.sleep(0.1)
            assert not poll.done()
            await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
            got = await asyncio.wait_for(poll, 5)
            assert got.entries[0].seq == last + 1
            assert any(e.text == "web: created" for e in got.entries)
    finally:
        await server.aclose()
        await pod.stop()


async def test_pykata_events_prints_the_log_and_names_a_missing_pod(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    path = control_socket(pod.sandbox.paths.run_dir)
    server = await serve_control(pod, path)
    pod.sandbox.set_control_socket(path)
    try:
        assert await events_cmd.show("pod1", follow=False, as_json=False) == 0
        out = capsys.readouterr().out
        assert "pod" in out and "started: cold boot" in out
        assert await events_cmd.show("pod1", follow=False, as_json=True) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[0]["seq"] == 1 and lines[0]["text"] == "starting (run)"
        with pytest.raises(NotFoundError, match="no pod nosuch"):
            await events_cmd.show("nosuch", follow=False, as_json=False)
    finally:
        await server.aclose()
        await pod.stop()


async def test_follow_ends_when_the_owner_goes(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    path = control_socket(pod.sandbox.paths.run_dir)
    server = await serve_control(pod, path)
    pod.sandbox.set_control_socket(path)
    follower = asyncio.ensure_future(events_cmd.show("pod1", follow=True, as_json=False))
    await asyncio.sleep(0.2)
    pod.events.add("vm", "a late entry")
    await asyncio.sleep(0.2)
    await server.aclose()
    await pod.stop()
    assert await asyncio.wait_for(follower, 10) == 0
    assert "a late entry" in capsys.readouterr().out


async def test_a_guest_that_stops_answering_during_setup_names_the_phase(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateSandbox never answered: the error says which phase stalled and
    shows the VM's report, not a bare "timed out"; the event log has the
    call's failure; nothing of the sandbox is left."""
    from pykata.errors import AgentError
    from pykata.runtime import agent_client
    from tests.unit.pod_fakes import FakeAgent, FakeSource

    class StallingAgent(FakeAgent):
        async def CreateSandbox(self, req: object) -> object:
            await asyncio.sleep(30)
            raise AssertionError("not reached")

    monkeypatch.setitem(agent_client._TIMEOUTS, "CreateSandbox", 0.2)
    source = FakeSource()
    source.agent = StallingAgent()
    pod, _, _ = fake_pod(tmp_path, source=source)
    with pytest.raises(AgentError) as caught:
        await pod.start()
    message = str(caught.value)
    assert "stalled in sandbox create" in message and "did not answer in time" in message
    assert "the fake VM died" in message  # the VM's failure report (console lines)
    assert any(e.error and e.text.startswith("CreateSandbox failed after ")
               for e in pod.events.since(0))
    assert not pod.sandbox.paths.run_dir.exists()


async def test_events_requests_out_of_range_are_clamped(tmp_path: Path) -> None:
    """A client's wait of NaN, infinity or below zero answers at once; a
    seq beyond the last returns nothing; a read is bounded."""
    from pykata.protocols import pod_pb2
    from pykata.runtime.control import PodControl
    from pykata.runtime.event_log import MAX_READ, RING_SIZE

    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    control = PodControl(pod)
    try:
        for wait in (float("nan"), float("inf"), -1.0):
            reply = await asyncio.wait_for(
                control.Events(pod_pb2.EventsRequest(since_seq=10**9, wait_seconds=wait)), 2)
            assert list(reply.entries) == [] and reply.last_seq == pod.events.last_seq
        for i in range(3000):
            pod.events.add("pod", f"e{i}", error=True)
        reply = await control.Events(pod_pb2.EventsRequest())
        # The other entries' ring keeps its last RING_SIZE; the successful
        # calls' ring (CreateSandbox) is untouched by them.
        errors = [e for e in reply.entries if e.error]
        assert len(errors) == RING_SIZE and errors[-1].text == "e2999"
        calls = [e.text for e in reply.entries if not e.error]
        assert len(calls) == 1 and calls[0].startswith("CreateSandbox ")
        assert len(reply.entries) <= MAX_READ
    finally:
        await pod.stop()
