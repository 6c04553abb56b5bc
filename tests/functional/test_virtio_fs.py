"""virtio-fs (shared_fs = "virtio-fs"): a virtiofsd per sandbox, started
before QEMU and ended with it, confined, in the pod's cgroup; a start that
fails and an owner that is killed leave no virtiofsd, QEMU, mount or state
(the autouse no_leftovers check counts virtiofsd processes too)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.host.cgroups import host_layout
from pykata.hypervisor.qemu import QemuVM
from pykata.runtime.pod_cgroup import CgroupPlacement
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from tests.functional.conftest import (
    Cli,
    qemu_processes,
    run_in_sandbox,
    save_console,
    virtiofsd_processes,
)

# virtiofsd's serving process keeps exactly these: CHOWN, DAC_OVERRIDE,
# FOWNER, SETGID, SETUID (hypervisor/virtiofsd.py).
SERVING_CAPABILITIES = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 6) | (1 << 7)


@pytest.fixture
def vfs_config(pykata_config: config.Config) -> config.Config:
    return dataclasses.replace(
        pykata_config, qemu=dataclasses.replace(pykata_config.qemu, shared_fs="virtio-fs"))


@pytest.fixture
def vfs_config_file(tmp_path: Path, guest_assets: object) -> str:
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor.qemu]\nshared_fs = "virtio-fs"\n')
    return str(path)


@pytest.fixture
def top() -> Iterator[str]:
    """A cgroup name of the test's own at the top of every hierarchy; pykata
    must remove what it makes there."""
    name = f"pykata-cgtest-{secrets.token_hex(4)}"
    yield name
    left = [h.mount / name for h in host_layout().hierarchies if (h.mount / name).exists()]
    for path in left:
        for child in sorted((p for p in path.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
            child.rmdir()
        path.rmdir()
    assert not left, f"cgroups left behind: {left}"


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_pod_on_virtio_fs_and_its_confined_virtiofsd(
        vfs_config: config.Config, top: str) -> None:
    """The container's root is virtiofs, and what 9p cannot do works there (a
    file unlinked while open, reopened through /proc/self/fd). virtiofsd runs
    in the pod's host cgroup beside QEMU, in mount and network namespaces of
    its own, with no new privileges, two seccomp filters (pykata's setid
    filter and its own) and only the five capabilities it serves with; its
    socket path is gone once QEMU is connected. Stopping the sandbox ends it."""
    sandbox = Sandbox("vfs-pod", vfs_config, SandboxOptions(
        vcpus=1, memory_mib=512, cgroup=CgroupPlacement(f"/{top}/vfs-pod")))
    await sandbox.start()
    try:
        vm = sandbox.vm
        assert isinstance(vm, QemuVM) and vm.virtiofsd_pid and vm.pid
        daemon = vm.virtiofsd_pid
        serving = _children(daemon)
        assert len(serving) == 1, serving
        state = json.loads(sandbox.paths.state_file.read_text())
        assert state["virtiofsd_pid"] == daemon
        assert not (sandbox.paths.run_dir / "virtiofsd.sock").exists()
        status = _status(serving[0])
        assert int(status["CapEff"], 16) == SERVING_CAPABILITIES, status["CapEff"]
        assert int(status["CapPrm"], 16) == SERVING_CAPABILITIES
        assert int(status["CapBnd"], 16) & ~SERVING_CAPABILITIES == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert int(status["Seccomp_filters"]) >= 2
        for ns in ("mnt", "net"):
            assert os.readlink(f"/proc/{serving[0]}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        for hierarchy in host_layout().hierarchies:
            procs = (hierarchy.mount / top / "vfs-pod" / "cgroup.procs").read_text().split()
            assert str(daemon) in procs and str(vm.pid) in procs, (hierarchy.mount, procs)
        run = await run_in_sandbox(sandbox, ["sh", "-c", (
            "grep ' / ' /proc/mounts; exec 3<>/f; rm /f; echo kept >&3; "
            "cat /proc/self/fd/3")], container_id="vfs-c1")
        assert run.exit_code == 0, run.stderr
        assert b" / virtiofs " in run.stdout and b"kept\n" in run.stdout, run.stdout
    except BaseException:
        save_console(sandbox, "virtio-fs-pod")
        raise
    finally:
        await sandbox.stop()
    # (The session's shared VM has a virtiofsd of its own.)
    assert not _alive(daemon) and not [
        line for line in virtiofsd_processes() if f"{sandbox.paths.run_dir}/" in line]


def test_a_killed_owner_takes_its_virtiofsd_along(cli: Cli, vfs_config_file: str) -> None:
    """`pykata run` killed with SIGKILL: its QEMU and its virtiofsd (both of
    its processes) die with it, and `pykata cleanup` removes what is left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "--config", vfs_config_file, "run", "--",
         "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    # virtiofsd and its serving process (the session's shared VM has its own)
    assert len([line for line in virtiofsd_processes() if "/sandboxes/run-" in line]) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    def left() -> list[str]:
        return [line for line in qemu_processes() if "-name pykata-run-" in line] + [
            line for line in virtiofsd_processes() if "/sandboxes/run-" in line]

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()
    result = cli("cleanup")
    assert result.returncode == 0, result.err
    assert "removing sandbox run-" in result.out


def test_a_virtiofsd_that_fails_leaves_nothing(cli: Cli, tmp_path: Path,
                                               guest_assets: object) -> None:
    """A virtiofsd that exits at once (virtio_fs_daemon = /bin/false): the
    start fails with QEMU's words about its vhost-user device, and no QEMU,
    virtiofsd, mount or state is left (no_leftovers)."""
    path = tmp_path / "configuration.toml"
    path.write_text('[hypervisor.qemu]\nshared_fs = "virtio-fs"\n'
                    'virtio_fs_daemon = "/bin/false"\n')
    result = cli("--config", str(path), "run", "--", "true")
    assert result.returncode != 0
    assert "vhost-user-fs" in result.err, result.err
