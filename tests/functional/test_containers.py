"""Containers in one shared VM: isolation, exit codes, stdio, exec, signals."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from pykata.runtime.sandbox import Sandbox
from tests.functional.conftest import run_in_sandbox

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_container_sees_its_own_pid_1_and_no_host_process(
    shared_sandbox: Sandbox,
) -> None:
    """The container's command is PID 1 of its namespace; no host process is visible."""
    script = "echo self=$$; ls /proc | grep -E '^[0-9]+$' | wc -l; ps -o comm"
    run = await run_in_sandbox(shared_sandbox, ["sh", "-c", script], container_id="pidns")
    assert run.exit_code == 0, run.stderr
    lines = run.stdout.decode().split()
    assert lines[0] == "self=1"
    # sh, ls, grep, wc and ps at most: the host's hundreds of processes are absent.
    assert int(lines[1]) <= 6
    assert b"qemu" not in run.stdout and b"pytest" not in run.stdout


@pytest.mark.parametrize("code", [0, 1, 42])
async def test_exit_codes_come_back_exactly(shared_sandbox: Sandbox, code: int) -> None:
    """`exit N` in the container is reported as N."""
    run = await run_in_sandbox(shared_sandbox, ["sh", "-c", f"exit {code}"],
                               container_id=f"exit{code}")
    assert run.exit_code == code


async def test_killed_container_reports_128_plus_signal(shared_sandbox: Sandbox) -> None:
    """A container killed with SIGKILL from the host exits with 137."""
    run = await run_in_sandbox(shared_sandbox, ["sleep", "600"], container_id="killed",
                               kill_after=0.2)
    assert run.exit_code == 137


async def test_stdio_streams_are_separate_and_ordered(shared_sandbox: Sandbox) -> None:
    """Many interleaved writes keep their order within each stream."""
    script = "i=0; while [ $i -lt 500 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    run = await run_in_sandbox(shared_sandbox, ["sh", "-c", script], container_id="order")
    assert run.exit_code == 0
    assert run.stdout.decode().split() == [f"out{i}" for i in range(500)]
    assert run.stderr.decode().split() == [f"err{i}" for i in range(500)]


async def test_stdin_is_relayed_and_closed(shared_sandbox: Sandbox) -> None:
    """Input written to stdin reaches the container, then end-of-file."""
    run = await run_in_sandbox(shared_sandbox, ["sh", "-c", "wc -c; echo eof-seen"],
                               container_id="stdin", stdin=b"x" * 100_000)
    assert run.exit_code == 0
    assert run.stdout.decode().split() == ["100000", "eof-seen"]


async def test_exec_in_a_running_container_and_list_processes(shared_sandbox: Sandbox) -> None:
    """A second process exec'd into a running container shares its PID namespace."""
    from pykata.assets.busybox_image import ensure_image
    from pykata.runtime.container import Container, overlay_rootfs
    from pykata.runtime.spec import default_spec
    from pykata.runtime.stdio import StdioRelay

    container = Container(shared_sandbox, "execs")
    assert shared_sandbox.agent is not None
    try:
        container.share_rootfs(overlay_rootfs(ensure_image(), container.scratch()))
        await container.create(default_spec(["sleep", "600"]))
        await container.start()
        process = default_spec(["sh", "-c", "echo exec-pid=$$; exit 7"])["process"]
        await container.exec("e1", process)
        out: list[bytes] = []

        async def sink(data: bytes) -> None:
            out.append(data)

        relay = StdioRelay(shared_sandbox.agent, container.id, "e1")
        relay.start(sink, sink, None)
        assert await container.wait("e1") == 7
        await relay.drain(30)
        pid = int(b"".join(out).decode().strip().split("=")[1])
        assert pid > 1
        pids = await shared_sandbox.agent.list_processes(container.id)
        assert len(pids) >= 1
        await container.kill(9)
        assert await container.wait() == 137
    finally:
        await container.delete()


async def test_bad_requests_do_not_hurt_the_agent(shared_sandbox: Sandbox) -> None:
    """Unknown containers and invalid ids get errors; the agent keeps answering."""
    from pykata.errors import AgentError
    from pykata.ttrpc import Code

    agent = shared_sandbox.agent
    assert agent is not None
    with pytest.raises(AgentError) as missing:
        await agent.start_container("no-such-container")
    assert missing.value.code == Code.NOT_FOUND
    with pytest.raises(AgentError) as bad_id:
        await agent.signal_process("../etc", "", 9)
    assert bad_id.value.code == Code.NOT_FOUND
    details = await agent.guest_details()
    # /init is PID 1 and ends the VM when the agent is gone; the agent is its child.
    assert not details.agent_details.init_daemon
    assert details.agent_details.version
    assert json.loads(json.dumps(list(details.agent_details.extra_features)))


async def test_a_refused_create_unshares_its_volumes(
    shared_sandbox: Sandbox, tmp_path: Path
) -> None:
    """crun refuses the container (a host file bound over a directory): the volume
    shared for it is unmounted again, and the host's file is left as it was."""
    from pykata.assets.busybox_image import ensure_image
    from pykata.errors import AgentError
    from pykata.host.mounts import mounts_under
    from pykata.runtime.container import Container, overlay_rootfs
    from pykata.runtime.spec import default_spec

    host_file = tmp_path / "file"
    host_file.write_text("keep\n")
    spec = default_spec(["true"])
    spec["mounts"].append({"destination": "/etc", "type": "bind", "source": str(host_file),
                           "options": ["rbind"]})
    container = Container(shared_sandbox, "refused-volume")
    try:
        container.share_rootfs(overlay_rootfs(ensure_image(), container.scratch()))
        # crun's error names the host's path, not the guest's.
        expected = re.escape(f"mount `{host_file} (volume)` to `etc`: Not a directory")
        with pytest.raises(AgentError, match=expected):
            await container.create(spec)
        [(key, volume)] = [(k, v) for k, v in shared_sandbox.share.volumes.items()
                           if container.id in v.users]
        assert key[0] == str(host_file)
        assert mounts_under(shared_sandbox.paths.shared_dir / volume.rel)
    finally:
        await container.delete()
    assert not mounts_under(shared_sandbox.paths.shared_dir / "containers")
    assert not mounts_under(shared_sandbox.paths.shared_dir / volume.rel)
    assert not (shared_sandbox.paths.shared_dir / volume.rel).exists()
    assert not (shared_sandbox.paths.shared_dir / "containers" / container.id).exists()
    assert host_file.read_text() == "keep\n"


async def test_read_only_volume_is_read_only_all_the_way_down(
    shared_sandbox: Sandbox, tmp_path: Path
) -> None:
    """A read-only recursive bind of a host directory that has a mount below it:
    the container can write neither to the directory nor to the mount below."""
    from pykata.host.mounts import Mount, mount_beneath, unmount

    below = tmp_path / "below"
    below.mkdir()
    mount_beneath(Mount("tmpfs", "tmpfs", ("size=1m",)), tmp_path, "below")
    try:
        run = await run_in_sandbox(
            shared_sandbox,
            ["sh", "-c", "touch /data/top; echo top=$?; touch /data/below/x; echo below=$?"],
            container_id="ro-volume",
            mounts=[{"destination": "/data", "type": "bind", "source": str(tmp_path),
                     "options": ["rbind", "ro"]}],
        )
        assert run.exit_code == 0, run.stderr
        assert run.stdout == b"top=1\nbelow=1\n"
        assert list(below.iterdir()) == []
    finally:
        unmount(below)
    assert not (tmp_path / "top").exists()


async def test_the_guest_reports_where_its_boot_went(shared_sandbox: Sandbox) -> None:
    """GetBootProfile: each step of the guest's boot, in order, on its clock."""
    assert shared_sandbox.agent is not None
    steps = await shared_sandbox.agent.boot_profile()
    # The last step, the agent's warm-up after its first answer, comes a
    # moment later under emulation.
    for _ in range(300):
        if "agent_warm" in steps:
            break
        await asyncio.sleep(0.1)
        steps = await shared_sandbox.agent.boot_profile()
    order = ["init_started", "python_started", "agent_started", "agent_imported",
             "agent_listening", "first_request", "agent_warm"]
    assert list(steps) == order, steps
    times = [steps[step] for step in order]
    assert times == sorted(times) and 0 < times[0] < 60, steps
