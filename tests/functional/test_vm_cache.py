"""The VM cache on real VMs, through a real containerd: pods take warm VMs
(restored from a template) and run as pods that booted their own, owned by
their shim alone (warm VMs have no process of their own); the cache refills
after hand-outs; a killed cache leaves no VM running (`pykata cleanup` takes
its directories) and pods then boot their own; a cached pod's console is
read to its end after its directory moved; and a cached pod's VM ends with
its shim, with the cache running or not."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykata.factory import cache, wire
from pykata.host.cgroups import host_layout
from pykata.hypervisor.capped_log import read_tail, rolled
from pykata.runtime.keys import pod_key
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.sandbox import read_sandbox_state
from pykata.runtime.state import SandboxState
from tests.functional.cache_peer import (
    RunningCache,
    running_cache,
    wait,
    warm_qemus,
    warm_sandboxes,
)
from tests.functional.conftest import (
    Cli,
    qemu_processes,
    shim_processes,
    started_qemu_processes,
)
from tests.functional.containerd_peer import IMAGE, NAMESPACE, RUNTIME, PrivateContainerd
from tests.hostile.conftest import privileged_spec, run_spec

ConfigWriter = Callable[[str], None]


@pytest.fixture
def vm_cache(tmp_path: Path, guest_assets: object) -> Iterator[RunningCache]:
    """Two warm VMs restored from a template."""
    with running_cache(tmp_path, count=2, template=True) as running:
        yield running


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])


def _state(containerd: PrivateContainerd, cid: str) -> SandboxState:
    return read_sandbox_state(SandboxPaths.for_key(pod_key(str(containerd.socket), NAMESPACE,
                                                           cid)))


def _idle_pod(containerd: PrivateContainerd, cid: str) -> SandboxState:
    """Start an idle pod (`ctr run -d`); its sandbox's state."""
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    assert started.returncode == 0, started.err
    return _state(containerd, cid)


def test_pods_take_cached_vms_and_the_cache_refills(
        containerd: PrivateContainerd, shim_config: ConfigWriter, vm_cache: RunningCache,
        tmp_path: Path) -> None:
    shim_config(vm_cache.config_file.read_text())
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("host file\n")
    first = containerd.run(
        "cached-1", "sh", "-c", "cat /data/in; echo written > /data/out; read l; echo got=$l; "
        "echo err >&2; exit 7", input=b"stdin line\n",
        extra=("--mount", f"type=bind,src={data},dst=/data,options=rbind:rw"))
    assert first.returncode == 7, first.err
    assert first.out == "host file\ngot=stdin line\n" and "err" in first.err
    assert (data / "out").read_text() == "written\n"
    cid = "cached-2"
    state = _idle_pod(containerd, cid)
    try:
        assert state.boot == "cache" and state.vm_name.startswith("warm-")
        # One process owns the pod, its shim; QEMU is the cache's child, and
        # no warm VM has a Python process of its own.
        assert [line.split()[0] for line in shim_processes() if state.key in line] == [
            str(state.owner_pid)]
        assert _parent(state.qemu_pid) == vm_cache.proc.pid
        # ...yet its VM was moved into the pod's cgroup (ctr's /<namespace>/<id>).
        for hierarchy in host_layout().hierarchies:
            procs = (hierarchy.mount / NAMESPACE / cid / "cgroup.procs").read_text().split()
            assert {str(state.qemu_pid), str(state.owner_pid)} <= set(procs), hierarchy
        warm = [int(line.split()[0]) for line in started_qemu_processes()
                if "-name pykata-warm-" in line]
        assert warm and {_parent(pid) for pid in warm} == {vm_cache.proc.pid}
        assert not subprocess.run(["pgrep", "-f", "pykata[.]monitor"],
                                  capture_output=True).stdout
        execd = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c",
                               "hostname; exit 4")
        assert execd.returncode == 4, execd.err
        # Two handed out; the cache starts a replacement for each.
        wait(lambda: vm_cache.status() == {**vm_cache.status(), "ready": 2, "handed_out": 2},
              60, "the cache to refill")
    finally:
        containerd.remove(cid)


def test_a_killed_cache_leaves_no_vm_and_pods_boot_their_own(
        containerd: PrivateContainerd, shim_config: ConfigWriter, vm_cache: RunningCache,
        cli: Cli) -> None:
    shim_config(vm_cache.config_file.read_text())
    cid = "before-kill"
    state = _idle_pod(containerd, cid)
    try:
        assert state.boot == "cache"
        wait(lambda: len(warm_qemus()) == 2, 60, "the refill")
        vm_cache.proc.kill()
        vm_cache.proc.wait()
        # Its warm VMs end (their guests power off when the cache's end of
        # their agent channel closes); the pod it handed out stays.
        wait(lambda: not warm_qemus(), 60, "the warm VMs to end")
        pods = {line.split()[0] for line in started_qemu_processes()}
        assert pods == {str(state.qemu_pid)}, started_qemu_processes()
        execd = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "alive")
        assert execd.returncode == 0 and execd.out == "alive\n", execd.err
        # A new pod boots its own VM.
        own = containerd.run("after-kill", "echo", "own vm")
        assert own.returncode == 0 and own.out == "own vm\n", own.err
        cleaned = cli("--config", str(vm_cache.config_file), "cleanup")
        assert "removed the socket of a VM cache that is gone" in cleaned.out
        assert not Path(vm_cache.config.factory.vm_cache_endpoint).exists()
        assert not warm_sandboxes(), cleaned.out  # the dead cache's directories
    finally:
        containerd.remove(cid)


def test_a_cached_pod_that_floods_its_console_keeps_answering(
        containerd: PrivateContainerd, shim_config: ConfigWriter, vm_cache: RunningCache,
        tmp_path: Path) -> None:
    """Root in a cached pod's guest writes 3 MiB to the serial console, six
    times what the console log rolls over at: the host reads it all from the
    pod's renamed directory (a console left unread stalls the guest's serial
    port and the writer with it), keeps the log bounded, and the pod answers."""
    shim_config(vm_cache.config_file.read_text())
    cid = "console-flood"
    line = "0123456789abcdef" * 4
    flood = (f"mknod /dev/ttyS0 c 4 64 && yes {line} | head -c {3 << 20} > /dev/ttyS0 && "
             "echo the-flood-ended > /dev/ttyS0; sleep 600")
    started = run_spec(containerd, tmp_path, cid, privileged_spec(["sh", "-c", flood]),
                       detach=True)
    assert started.returncode == 0, started.err
    try:
        state = _state(containerd, cid)
        assert state.boot == "cache" and not state.key.startswith("warm-")
        console = Path(state.console_log)
        assert console.parent == SandboxPaths.for_key(state.key).run_dir
        wait(lambda: b"the-flood-ended" in read_tail(console, 4096), 180,
              f"the end of the flood in {console}")
        kept = console.stat().st_size + rolled(console).stat().st_size
        assert kept <= vm_cache.config.runtime.console_log_size * 1024, kept
        execd = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "alive")
        assert execd.returncode == 0 and execd.out == "alive\n", execd.err
    finally:
        containerd.remove(cid)


@pytest.mark.parametrize("cache_alive", [True, False], ids=["cache-running", "cache-killed"])
def test_a_cached_pods_vm_ends_with_its_shim(
        containerd: PrivateContainerd, shim_config: ConfigWriter,
        vm_cache: RunningCache, cache_alive: bool) -> None:
    """A VM handed out is not its shim's child (QEMU cannot die with the
    shim's death): killed, the shim takes it along all the same, through
    the cache's watch of the shim while the cache runs, and through the guest,
    which powers off when its agent channel closes, when it does not."""
    shim_config(vm_cache.config_file.read_text())
    cid = f"shim-killed-{cache_alive}".lower()
    state = _idle_pod(containerd, cid)
    try:
        assert state.boot == "cache"
        if not cache_alive:
            vm_cache.proc.kill()
            vm_cache.proc.wait()
        shims = [line.split()[0] for line in shim_processes() if state.key in line]
        assert shims == [str(state.owner_pid)]
        os.kill(state.owner_pid, signal.SIGKILL)
        qemu = str(state.qemu_pid)
        wait(lambda: qemu not in {line.split()[0] for line in qemu_processes()}, 60,
              "the cached pod's VM to end with its shim")
    finally:
        containerd.remove(cid)


def test_a_request_from_a_gone_shim_takes_no_vm(vm_cache: RunningCache) -> None:
    """A shim killed while its request waits (here: a process that connected
    and exited before the request was sent): the cache gives it no VM, the
    pool keeps both, and no warm VM runs outside the pool."""
    before = warm_sandboxes()
    shapes = vm_cache.status()["shapes"]
    assert len(before) == 2 and isinstance(shapes, list)
    endpoint = cache.endpoint(vm_cache.config)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    connect = ("import socket, sys\n"
               "s = socket.socket(fileno=int(sys.argv[1]))\n"
               "s.connect(sys.argv[2])\n"
               "s.detach()\n")
    with conn:
        subprocess.run([sys.executable, "-c", connect, str(conn.fileno()), str(endpoint)],
                       pass_fds=(conn.fileno(),), check=True, timeout=30)
        wire.send(conn, {"op": "vm", "shape": shapes[0],
                         "config": cache.config_digest(vm_cache.config)})

        async def answer() -> dict[str, object]:
            try:
                message, fds = await wire.recv(conn, timeout=30)
            except EOFError:
                return {}
            wire.close_fds(fds)
            return message
        got = asyncio.run(answer())
    status = vm_cache.status()
    assert status["ready"] == 2 and status["handed_out"] == 0, status
    assert "gone" in str(got.get("error")), got
    time.sleep(2)  # what a replacement would need to show up
    assert warm_sandboxes() == before
    assert len(started_qemu_processes()) == 2, started_qemu_processes()


def test_another_user_gets_no_vm(vm_cache: RunningCache) -> None:
    """The cache's socket is root's (0600 in a private directory); even given
    a way to it, another user's request is refused by its credentials and no
    VM leaves the cache."""
    endpoint = Path(vm_cache.config.factory.vm_cache_endpoint)
    assert endpoint.stat().st_mode & 0o777 == 0o600
    import shutil
    import tempfile

    # A directory any user can enter, on the endpoint's filesystem.
    reachable = Path(tempfile.mkdtemp(prefix="pykata-open-", dir="/tmp"))
    os.chmod(reachable, 0o755)
    os.link(endpoint, reachable / "cache.sock")
    os.chmod(reachable / "cache.sock", 0o666)
    code = ("import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.send(json.dumps({'op': 'vm', 'id': 'x', 'key': 'x', 'shape': '', "
            "'config': '', 'options': {}}).encode())\n"
            "    print('answered' if s.recv(65536) else 'refused')\n"
            "except (ConnectionResetError, BrokenPipeError):\n"
            "    print('refused')\n")
    try:
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                 "--clear-groups", sys.executable, "-c", code,
                                 str(reachable / "cache.sock")],
                                capture_output=True, text=True, timeout=30)
    finally:
        shutil.rmtree(reachable)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"  # closed without an answer
    assert vm_cache.status()["ready"] == 2 and vm_cache.status()["handed_out"] == 0
