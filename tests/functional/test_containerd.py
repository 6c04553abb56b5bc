"""pykata under a real containerd 1.6, driven with `ctr` as a user would.

Each test leaves nothing behind: the autouse `no_leftovers` check looks for
QEMU and shim processes, mounts and /run/pykata state after every test.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
from pathlib import Path

from tests.functional.conftest import qemu_processes, run_on_terminal, shim_processes
from tests.functional.containerd_peer import IMAGE, NAMESPACE, RUNTIME, PrivateContainerd


def test_ctr_run_prints_the_guest_kernel(containerd: PrivateContainerd) -> None:
    """`ctr run --rm --runtime io.containerd.pykata.v2 ... uname -r` runs in pykata's VM."""
    result = containerd.run("kernel", "uname", "-r")
    assert result.returncode == 0, result.err
    assert result.out.strip().endswith("-pykata")
    assert result.out.strip() != platform.release()


def test_exit_codes_0_and_3(containerd: PrivateContainerd) -> None:
    """ctr exits with the task's exit code."""
    assert containerd.run("exit0", "true").returncode == 0
    result = containerd.run("exit3", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.out == "out\n"
    assert result.err.startswith("err\n")


def test_kill_with_sigkill_gives_137(containerd: PrivateContainerd) -> None:
    """`ctr task kill -s KILL` ends a running `ctr run`, which exits 137."""
    proc = subprocess.Popen(
        containerd.ctr_argv("run", "--rm", "--runtime", RUNTIME, IMAGE, "killme",
                            "sh", "-c", "echo up; sleep 600"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        kill = containerd.ctr("task", "kill", "-s", "KILL", "killme")
        assert kill.returncode == 0, kill.err
        assert proc.wait(timeout=60) == 137
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            containerd.remove("killme")


def test_long_running_task_exec_ps_pause_metrics_kill_delete(
    containerd: PrivateContainerd,
) -> None:
    """A detached task: exec a second process, list processes, pause and resume,
    read metrics, update its resources, then kill and delete it; containerd
    receives every task event on the way, and the shim's log reaches it."""
    cid = "longrun"
    with containerd.events() as events:
        started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
        assert started.returncode == 0, started.err
        try:
            _exercise_long_running_task(containerd, cid)
        finally:
            containerd.remove(cid)
        for topic in ("/tasks/create", "/tasks/start", "/tasks/exec-added",
                      "/tasks/exec-started", "/tasks/paused", "/tasks/resumed", "/tasks/exit",
                      "/tasks/delete"):
            events.wait_for(topic, cid)
    log = containerd.log.read_text()
    assert f'msg="task {cid} created"' in log and f"container={cid}" in log


def _exercise_long_running_task(containerd: PrivateContainerd, cid: str) -> None:
    assert containerd.task_status(cid) == "RUNNING"
    exec_ = containerd.ctr("task", "exec", "--exec-id", "e1", cid,
                           "sh", "-c", "echo from-exec; ps -o pid,comm; exit 5")
    assert exec_.returncode == 5
    assert exec_.out.startswith("from-exec\n")
    assert "sleep" in exec_.out  # the exec shares the task's PID namespace

    ps = containerd.ctr("task", "ps", cid)
    assert ps.returncode == 0, ps.err
    pids = [line.split()[0] for line in ps.out.splitlines()[1:]]
    assert pids and all(p.isdigit() for p in pids)

    assert containerd.ctr("task", "pause", cid).returncode == 0
    assert containerd.task_status(cid) == "PAUSED"
    assert containerd.ctr("task", "resume", cid).returncode == 0
    assert containerd.task_status(cid) == "RUNNING"

    metrics = containerd.ctr("task", "metrics", cid)
    assert metrics.returncode == 0, metrics.err
    values = dict(line.split()[:2] for line in metrics.out.splitlines()
                  if line.startswith(("memory.usage ", "cpu.usage_usec ", "pids.current ")))
    assert int(values["memory.usage"]) > 0
    assert int(values["cpu.usage_usec"]) > 0
    assert int(values["pids.current"]) >= 1

    checkpoint = containerd.ctr("task", "checkpoint", cid)
    assert checkpoint.returncode != 0
    assert "checkpoint is not supported by pykata" in checkpoint.err

    update_memory_limit(containerd, cid, 123 * 1024 * 1024)
    after = containerd.ctr("task", "metrics", cid).out
    assert f"memory.usage_limit    {123 * 1024 * 1024}" in after, after

    assert containerd.ctr("task", "kill", "-s", "KILL", cid).returncode == 0
    deadline = time.monotonic() + 30
    while containerd.task_status(cid) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert containerd.task_status(cid) == "STOPPED"
    deleted = containerd.ctr("task", "delete", cid)
    assert deleted.returncode == 0, deleted.err
    assert containerd.task_status(cid) == ""


def test_stdin_one_mebibyte_byte_exact(containerd: PrivateContainerd) -> None:
    """1 MiB piped through `ctr run ... cat` comes back unchanged."""
    data = os.urandom(1 << 20)
    result = containerd.run("stdin", "cat", input=data)
    assert result.returncode == 0, result.err
    assert result.stdout == data


def test_ctr_run_with_a_terminal(containerd: PrivateContainerd) -> None:
    """`ctr run -t` under a real terminal: a /dev/pts terminal with the host's size."""
    text, code = run_on_terminal(
        containerd.ctr_argv("run", "-t", "--rm", "--runtime", RUNTIME, IMAGE, "tty",
                            "sh", "-c", "tty; stty size; echo done"), 29, 101, until=b"done")
    assert "/dev/pts/" in text, text
    assert "29 101" in text, text
    assert code == 0, text


def update_memory_limit(containerd: PrivateContainerd, cid: str, limit: int) -> None:
    """Update a task's memory limit through the shim's task API, as containerd's
    UpdateTask does (ctr 1.6 has no command for it)."""
    import asyncio
    import json

    from google.protobuf import any_pb2, empty_pb2

    from pykata.protocols import shim_pb2
    from pykata.ttrpc import Client

    address = (containerd.state / "io.containerd.runtime.v2.task" / NAMESPACE / cid /
               "address").read_text().removeprefix("unix://")
    resources = any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps({"memory": {"limit": limit}}).encode())

    async def call() -> None:
        async with await Client.connect_unix(address) as client:
            await client.call("containerd.task.v2.Task", "Update",
                              shim_pb2.UpdateTaskRequest(id=cid, resources=resources),
                              empty_pb2.Empty, timeout=30)

    asyncio.run(call())


def _pod_container(containerd: PrivateContainerd, pod: str, cid: str, kind: str,
                   *cmd: str, share_pid: bool = False) -> None:
    extra = ["--annotation", f"io.kubernetes.cri.container-type={kind}",
             "--annotation", f"io.kubernetes.cri.sandbox-id={pod}"]
    if share_pid:
        # CRI names the sandbox's PID namespace on the host; pykata maps it
        # to the sandbox container's namespace in the guest.
        extra += ["--with-ns", "pid:/proc/1/ns/pid"]
    result = containerd.ctr("run", "-d", "--runtime", RUNTIME, *extra, IMAGE, cid, *cmd)
    assert result.returncode == 0, result.err


def _exec(containerd: PrivateContainerd, cid: str, exec_id: str, script: str) -> str:
    result = containerd.ctr("task", "exec", "--exec-id", exec_id, cid, "sh", "-c", script)
    assert result.returncode == 0, result.err
    return result.out


def _qemu_pids() -> set[str]:
    """This session's QEMUs (other pykata VMs on the machine are not the test's)."""
    return {line.split()[0] for line in qemu_processes()}


def test_pod_containers_share_one_vm_and_pid_namespace_only_when_asked(
    containerd: PrivateContainerd,
) -> None:
    """Containers of a pod run in one VM behind one shim; a container sees the
    sandbox's processes only when its spec names the pod's PID namespace."""
    pod = "pod1"
    names = [pod, "pod1-shared", "pod1-private"]
    try:
        _pod_container(containerd, pod, pod, "sandbox", "sleep", "600")
        vms = _qemu_pids()
        _pod_container(containerd, pod, names[1], "container", "sleep", "500", share_pid=True)
        _pod_container(containerd, pod, names[2], "container", "sleep", "400")
        assert _qemu_pids() == vms and len(vms) == 1  # no second VM for the pod
        boot_ids = {_exec(containerd, c, "b", "cat /proc/sys/kernel/random/boot_id")
                    for c in names}
        assert len(boot_ids) == 1  # one guest kernel
        shared = _exec(containerd, names[1], "ps1", "ps -o args")
        private = _exec(containerd, names[2], "ps2", "ps -o args")
        assert "sleep 600" in shared and "sleep 500" in shared
        assert "sleep 600" not in private and "sleep 400" in private
    finally:
        for cid in reversed(names):
            containerd.remove(cid)
    assert not _qemu_pids()  # the VM went with the pod's last container


def test_task_exit_reaches_containerd_when_qemu_is_killed(
    containerd: PrivateContainerd,
) -> None:
    """Killing a running task's QEMU: containerd gets a TaskExit, the task can be
    deleted, and nothing is left behind."""
    cid = "fault"
    with containerd.events() as events:
        started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
        assert started.returncode == 0, started.err
        try:
            events.wait_for("/tasks/start", cid)
            (qemu,) = _qemu_pids()
            os.kill(int(qemu), signal.SIGKILL)
            exit_line = events.wait_for("/tasks/exit", cid)
            assert "137" in exit_line
            assert containerd.task_status(cid) == "STOPPED"
            deleted = containerd.ctr("task", "delete", cid)
            assert deleted.returncode == 0, deleted.err
        finally:
            containerd.remove(cid)


def test_oom_kill_is_reported(containerd: PrivateContainerd) -> None:
    """A task that outgrows its memory limit is killed in the guest; containerd
    receives a TaskOOM for it, and ctr exits 137."""
    with containerd.events() as events:
        result = containerd.run(
            "oom", "sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived",
            extra=("--memory-limit", str(32 * 1024 * 1024)))
        assert result.returncode == 137
        assert "survived" not in result.out
        events.wait_for("/tasks/oom", "oom")


def test_dead_shim_is_cleaned_up_by_delete(containerd: PrivateContainerd) -> None:
    """SIGKILL to a running task's shim: its VM dies with it, containerd runs
    `delete`, and the task, its mounts and its state are gone."""
    cid = "deadshim"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        with containerd.events() as events:
            shim = [line.split()[0] for line in shim_processes()]
            assert len(shim) == 1
            os.kill(int(shim[0]), signal.SIGKILL)
            exit_line = events.wait_for("/tasks/exit", cid)
            assert '"exit_status":137' in exit_line
        deadline = time.monotonic() + 30
        while containerd.task_status(cid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert containerd.task_status(cid) == ""
        assert not _qemu_pids()
    finally:
        containerd.remove(cid)


def test_bind_mounts_from_the_host_reach_the_container(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    """`ctr run --mount type=bind,...`: a writable host directory and a read-only
    one are shared into the VM and bound where the spec says."""
    data, config = tmp_path / "data", tmp_path / "config"
    data.mkdir()
    config.mkdir()
    (config / "setting").write_text("42\n")
    result = containerd.run(
        "volumes", "sh", "-c",
        "cat /etc/app/setting; echo from-guest > /data/out; "
        "touch /etc/app/new; echo touch=$?",
        extra=("--mount", f"type=bind,src={data},dst=/data,options=rbind:rw",
               "--mount", f"type=bind,src={config},dst=/etc/app,options=rbind:ro"),
    )
    assert result.returncode == 0, result.err
    assert result.out == "42\ntouch=1\n"
    assert (data / "out").read_text() == "from-guest\n"
    assert sorted(p.name for p in config.iterdir()) == ["setting"]


def test_the_shim_owns_its_pod_and_serves_its_control_socket(
    containerd: PrivateContainerd,
) -> None:
    """A containerd pod is one pykata process, its shim, and one QEMU (the
    shim's child): any pykata process reaches the pod at <sandbox
    dir>/control.sock, with the pod's State and the agent's own calls for
    the pod's containers."""
    import asyncio

    from pykata.runtime.control_client import PodClient
    from pykata.runtime.keys import pod_key
    from pykata.runtime.paths import SandboxPaths
    from pykata.runtime.sandbox import read_sandbox_state
    from pykata.runtime.state import process_start_time

    cid = "reachme"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        paths = SandboxPaths.for_key(pod_key(str(containerd.socket), NAMESPACE, cid))
        state = read_sandbox_state(paths)
        assert state.front_end == "shim" and state.control_socket.endswith("/control.sock")
        shims = [line.split()[0] for line in shim_processes()]
        assert shims == [str(state.owner_pid)]
        assert process_start_time(state.owner_pid) == state.owner_start
        stat = Path(f"/proc/{state.qemu_pid}/stat").read_text()
        assert int(stat[stat.rfind(")") + 2:].split()[1]) == state.owner_pid  # QEMU's parent

        async def probe() -> tuple[list[int], object]:
            async with await PodClient.connect(state.control_socket, cid) as client:
                return await client.agent.list_processes(cid), await client.state()

        pids, pod = asyncio.run(probe())
        assert pids and pod.status == "running"  # type: ignore[attr-defined]
        assert pod.vm_pid == state.qemu_pid and pod.owner_pid == state.owner_pid  # type: ignore[attr-defined]
        assert [(c.id, c.status) for c in pod.containers] == [(cid, "running")]  # type: ignore[attr-defined]
    finally:
        containerd.remove(cid)
