"""The pod core's lifecycle, over a fake VM and a fake agent (no QEMU): every
transition of pod, container and process, every refusal, for each front
end's policy. The real-VM suites run the same core for real."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.errors import (
    AgentError,
    AlreadyExistsError,
    InvalidStateError,
    NotFoundError,
    SpecError,
)
from pykata.runtime.container import bind_rootfs
from pykata.runtime.control import control_socket, serve_control
from pykata.runtime.control_client import PodClient
from pykata.runtime.error_codes import exit_status, runc_message
from pykata.runtime.lifecycle import VM_DIED_STATUS, ExitedError, Status
from pykata.runtime.pod import Pod
from pykata.runtime.state import SandboxState, read_state
from pykata.ttrpc import Code
from tests.unit.pod_fakes import CapturedIO, FakeSource, fake_pod, spec


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


async def _started(tmp_path: Path, **kwargs: object) -> tuple[Pod, FakeSource, list]:
    pod, source, events = fake_pod(tmp_path, **kwargs)  # type: ignore[arg-type]
    await pod.start()
    return pod, source, events


def _kinds(events: list) -> list[str]:
    return [e.kind for e in events]


def _saved(pod: Pod) -> SandboxState:
    return read_state(pod.sandbox.paths.state_file, SandboxState)


async def test_a_container_runs_its_output_arrives_before_its_exit(tmp_path: Path) -> None:
    """create → start → exit: the events in order, the output complete and the
    stdio closed before the exit is recorded, the statuses saved."""
    pod, source, events = await _started(tmp_path)
    assert pod.lifecycle.status is Status.RUNNING and source.agent.sandbox_created
    io = CapturedIO()
    container = await pod.create_container("web", spec("echo", "hello"), _rootfs(tmp_path),
                                           io=io)
    assert container.lifecycle.status is Status.CREATED
    assert _saved(pod).containers == {"web": {"": "created"}}
    await pod.start_process("web")
    proc = await pod.wait("web")
    assert (proc.exit_status, bytes(io.out), io.closed) == (0, b"hello\n", True)
    assert _kinds(events) == ["created", "started", "exited"]
    assert events[-1].exit_status == 0 and events[-1].exited_at > 0
    assert _saved(pod).containers == {"web": {"": "stopped"}}
    await pod.stop()
    assert not pod.sandbox.paths.run_dir.exists()


async def test_wrong_calls_are_refused_and_change_nothing(tmp_path: Path) -> None:
    """Each operation asks the lifecycle first: the refusals name the thing,
    its status and what to do, with the kind every front end maps."""
    pod, source, _ = await _started(tmp_path)
    with pytest.raises(InvalidStateError, match="starts once"):
        await pod.start()
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    with pytest.raises(AlreadyExistsError):
        await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    with pytest.raises(InvalidStateError, match="container web is created: cannot exec"):
        await pod.add_exec("web", "e1", {"args": ["true"], "cwd": "/"}, io=None)
    with pytest.raises(InvalidStateError, match="cannot pause"):
        await pod.pause("web")
    with pytest.raises(NotFoundError):
        await pod.start_process("nosuch")
    await pod.start_process("web")
    with pytest.raises(InvalidStateError, match="is running: cannot start"):
        await pod.start_process("web")
    with pytest.raises(InvalidStateError) as deleting:
        await pod.delete_container("web")
    assert "force" in str(deleting.value)
    with pytest.raises(InvalidStateError, match="cannot resume"):
        await pod.resume("web")
    await pod.add_exec("web", "e1", {"args": ["sleep"], "cwd": "/"}, io=None)
    with pytest.raises(AlreadyExistsError):
        await pod.add_exec("web", "e1", {"args": ["sleep"], "cwd": "/"}, io=None)
    with pytest.raises(InvalidStateError, match="created but was never started"):
        await pod.kill("web", "e1", 15)
    with pytest.raises(SpecError, match="invalid signal"):
        await pod.kill("web", "", 99)
    await pod.kill("web", "", 15)
    await pod.wait("web")
    with pytest.raises(ExitedError, match="has already exited"):
        await pod.kill("web", "", 15)
    assert "web" in source.agent.containers  # nothing refused touched the guest
    await pod.stop()
    with pytest.raises(InvalidStateError, match="pod pod1 is stopped"):
        await pod.create_container("db", spec("sleep"), _rootfs(tmp_path), io=None)


async def test_an_exec_runs_its_own_lifecycle(tmp_path: Path) -> None:
    pod, _source, events = await _started(tmp_path)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.start_process("web")
    io = CapturedIO()
    proc = await pod.add_exec("web", "e1", {"args": ["echo", "in", "exec"], "cwd": "/"}, io=io)
    assert proc.status is Status.CREATED
    await pod.start_process("web", "e1")
    await pod.wait("web", "e1")
    assert bytes(io.out) == b"in exec\n"
    with pytest.raises(InvalidStateError, match="process web/e1 is stopped: cannot start"):
        await pod.start_process("web", "e1")
    await pod.delete_process("web", "e1")
    with pytest.raises(NotFoundError):
        pod.process("web", "e1")
    assert _kinds(events)[-3:] == ["exec-added", "exec-started", "exited"]
    await pod.stop()


async def test_pause_and_resume_move_the_container(tmp_path: Path) -> None:
    pod, source, events = await _started(tmp_path)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.start_process("web")
    await pod.pause("web")
    assert pod.container("web").lifecycle.status is Status.PAUSED
    assert source.agent.paused == {"web"}
    assert _saved(pod).containers["web"][""] == "paused"
    await pod.add_exec("web", "e1", {"args": ["sleep"], "cwd": "/"}, io=None)  # allowed
    await pod.resume("web")
    assert _kinds(events)[-3:] == ["paused", "exec-added", "resumed"]
    await pod.stop()


async def test_a_created_container_can_be_killed_and_deleted(tmp_path: Path) -> None:
    """runc's rule: kill clears away a container that will never start; its
    init's exit is reported although it never ran."""
    pod, _, _ = await _started(tmp_path)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.kill("web", "", 9)
    proc = await pod.wait("web")
    assert proc.exit_status == 137
    init = await pod.delete_container("web")
    assert init.exit_status == 137
    assert pod.lifecycle.stopped  # containerd's policy: the last task took the pod


async def test_the_vm_dying_ends_every_started_process(tmp_path: Path) -> None:
    pod, source, events = await _started(tmp_path, ends_with_init=True)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.start_process("web")
    started = await pod.add_exec("web", "e1", {"args": ["sleep"], "cwd": "/"}, io=None)
    await pod.start_process("web", "e1")
    never = await pod.add_exec("web", "e2", {"args": ["sleep"], "cwd": "/"}, io=None)
    source.vms[0].die()
    await asyncio.wait_for(pod.ended.wait(), 5)
    await started.exited.wait()
    assert pod.container("web").init.exit_status == VM_DIED_STATUS
    assert started.exit_status == VM_DIED_STATUS
    assert never.status is Status.CREATED  # it never ran: nothing to report
    assert [e.kind for e in events].count("exited") == 2
    await pod.stop()


async def test_each_front_ends_policy(tmp_path: Path) -> None:
    """An OCI container's pod ends with its init and outlives its delete until
    stopped; containerd's pod lives until its last container is deleted."""
    oci, _, _ = await _started(tmp_path / "oci", ends_with_init=True)
    await oci.create_container("c", spec("exit", "3"), _rootfs(tmp_path), io=None)
    await oci.start_process("c")
    await asyncio.wait_for(oci.ended.wait(), 5)
    assert oci.container("c").init.exit_status == 3
    await oci.delete_container("c")
    assert oci.lifecycle.status is Status.RUNNING
    await oci.stop()
    assert oci.lifecycle.stopped and oci.sandbox.vm is not None and not oci.sandbox.vm.running

    shim, _, events = await _started(tmp_path / "shim")
    for cid in ("a", "b"):
        await shim.create_container(cid, spec("exit", "0"), _rootfs(tmp_path), io=None)
        await shim.start_process(cid)
        await shim.wait(cid)
    await shim.delete_container("a")
    assert not shim.ended.is_set()
    await shim.delete_container("b")
    assert shim.ended.is_set() and shim.lifecycle.stopped
    assert _kinds(events)[-1] == "stopped"


async def test_a_process_that_cannot_run_fails_create_and_leaves_nothing(
        tmp_path: Path) -> None:
    pod, _source, _ = await _started(tmp_path)
    io = CapturedIO()
    with pytest.raises(AgentError) as info:
        await pod.create_container("web", spec("missing"), _rootfs(tmp_path), io=io)
    assert exit_status(info.value) == 127
    assert "executable file not found" in runc_message(info.value)
    assert "web" not in pod.containers and io.closed
    assert not pod.sandbox.share.container("web").created  # type: ignore[attr-defined]
    await pod.stop()


async def test_a_failed_boot_leaves_the_pod_stopped_and_no_state(tmp_path: Path) -> None:
    from pykata.errors import HypervisorError

    pod, _, _ = fake_pod(tmp_path, source=FakeSource(fail=HypervisorError("no QEMU")))
    with pytest.raises(HypervisorError):
        await pod.start()
    assert pod.lifecycle.stopped and pod.ended.is_set()
    assert not pod.sandbox.paths.run_dir.exists()


async def test_shutdown_kills_then_ends_as_the_policy_says(tmp_path: Path) -> None:
    pod, source, _ = await _started(tmp_path, ends_with_init=True)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.start_process("web")
    await pod.shutdown()
    assert pod.ended.is_set() and not pod.lifecycle.stopped
    assert 9 in source.agent.process("web").signals
    assert pod.container("web").init.exit_status == 137
    await pod.stop()

    shim, _, _ = await _started(tmp_path / "shim")
    await shim.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await shim.start_process("web")
    await shim.shutdown()
    assert shim.lifecycle.stopped


async def test_oom_reports_are_coalesced_per_container(tmp_path: Path) -> None:
    pod, source, events = await _started(tmp_path)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    for _ in range(20):
        source.agent.oom.put_nowait("web")
    source.agent.oom.put_nowait("not-a-container-of-this-pod")
    await asyncio.sleep(0.5)
    assert _kinds(events).count("oom") == 1
    await pod.stop()


async def test_close_input_lets_what_was_sent_through(tmp_path: Path) -> None:
    pod, _, _ = await _started(tmp_path)
    io = CapturedIO(stdin=[b"one ", b"two"])
    await pod.create_container("web", spec("cat"), _rootfs(tmp_path), io=io)
    await pod.start_process("web")
    await pod.close_input("web")
    proc = await asyncio.wait_for(pod.wait("web"), 5)
    assert (proc.exit_status, bytes(io.out)) == (0, b"one two")
    await pod.stop()


async def test_the_control_socket_serves_the_same_rules(tmp_path: Path) -> None:
    """Another pykata process reaches the pod through its control socket: the
    same lifecycle answers, errors come back as the same kinds, and agent
    calls reach only this pod's containers."""
    pod, source, _ = await _started(tmp_path)
    path = control_socket(pod.sandbox.paths.run_dir)
    server = await serve_control(pod, path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    async with await PodClient.connect(path, "pod1") as client:
        await client.start("web")
        with pytest.raises(InvalidStateError, match="is running: cannot start"):
            await client.start("web")
        with pytest.raises(NotFoundError):
            await client.kill("nosuch", 15)
        await client.exec("web", "e1", json.dumps({"args": ["sleep"], "cwd": "/"}).encode(),
                          4242)
        state = await client.state()
        assert (state.status, state.containers[0].status) == ("running", "running")
        assert state.containers[0].execs[0].host_pid == 4242
        assert await client.guest_pids("web") == [
            p.pid for p in source.agent.containers["web"].values()]
        with pytest.raises(AgentError) as foreign:
            await client.agent.list_processes("someone-elses")
        assert foreign.value.code == Code.NOT_FOUND
        await client.kill("web", 15)
        await pod.wait("web")
        with pytest.raises(NotFoundError, match="already exited"):
            await client.kill("web", 15)
    await server.aclose()
    await pod.stop()


async def test_a_stop_cancelled_half_way_still_ends_the_vm(tmp_path: Path) -> None:
    """A caller cancelled during the teardown (containerd's connection closed,
    a deadline) must not leave the pod stopped on paper with its VM running:
    the teardown goes on, and the next stop waits for it."""
    pod, source, _ = await _started(tmp_path)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    real_stop = pod.sandbox.stop
    entered = asyncio.Event()

    async def slow_stop() -> None:
        entered.set()
        await asyncio.sleep(0.3)
        await real_stop()

    pod.sandbox.stop = slow_stop  # type: ignore[method-assign]
    first = asyncio.ensure_future(pod.stop())
    await entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not pod.lifecycle.stopped  # not on paper before the VM is gone
    await pod.stop()
    assert pod.lifecycle.stopped and source.vms[0].stopped_by_host
    assert not pod.sandbox.paths.run_dir.exists()


async def test_an_exec_of_the_command_line_is_forgotten_once_it_ends(tmp_path: Path) -> None:
    """`pykata-oci exec` adds and starts a process nobody deletes: the pod
    forgets it once its exit is recorded, or at once if it cannot start."""
    pod, _, _ = await _started(tmp_path, ends_with_init=True)
    await pod.create_container("web", spec("sleep"), _rootfs(tmp_path), io=None)
    await pod.start_process("web")
    for i in range(5):
        proc = await pod.exec("web", f"probe-{i}", {"args": ["echo", "ok"], "cwd": "/"},
                              io=None, host_pid=4242)
        await proc.exited.wait()
    with pytest.raises(AgentError):
        await pod.exec("web", "broken", {"args": ["missing"], "cwd": "/"}, io=None)
    for _ in range(100):
        if not pod.container("web").execs:
            break
        await asyncio.sleep(0.01)
    assert pod.container("web").execs == {}
    await pod.stop()


async def test_an_exit_is_told_even_when_the_state_cannot_be_saved(tmp_path: Path) -> None:
    """/run full: the exit still reaches its waiters (containerd's Wait)."""
    pod, _, events = await _started(tmp_path)
    await pod.create_container("web", spec("exit", "4"), _rootfs(tmp_path), io=None)

    def full(status: str, containers: object) -> None:
        raise OSError(28, "No space left on device")

    pod.sandbox.record_pod = full  # type: ignore[method-assign, assignment]
    await pod.start_process("web")
    proc = await asyncio.wait_for(pod.wait("web"), 5)
    assert proc.exit_status == 4 and "exited" in _kinds(events)
    await pod.stop()
