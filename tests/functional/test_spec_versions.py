"""Bundles of runtime-spec 1.2.0 and 1.3.0, as newer engines write them
(tests/data/runtime-spec-*-config.json), through every front end: `pykata-oci`,
`pykata run --bundle` and containerd's shim. The guest's crun 1.8.1 refuses
both versions by themselves; what each newer field does is seen from inside
the container, and what pykata refuses leaves nothing behind.

Each container boots a VM (3-5 s under TCG): the checks are packed into few
containers.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pykata import assets
from pykata.assets.busybox_image import ensure_image
from tests.functional.conftest import Cli, unexpected_leftovers
from tests.functional.containerd_peer import RUNTIME, PrivateContainerd
from tests.functional.oci_tools import Oci, Waiter

DATA = Path(__file__).resolve().parents[1] / "data"
LOOP = "while :; do sleep 0.2; done"
# What the container's init reports of itself: I/O priority, nice and policy,
# machine (personality), domain name, umask, its cgroup's files, and the
# status of a command making a system call its seccomp filter kills.
OBSERVE = ("ionice; cut -d' ' -f19,41 /proc/self/stat; uname -m; "
           "cat /proc/sys/kernel/domainname; umask; "
           "cat /sys/fs/cgroup/cpu.idle /sys/fs/cgroup/cpu.max.burst "
           "/sys/fs/cgroup/memory.high; "
           "{ hostname x; echo $?; link / /l; echo $?; } 2>/dev/null")
# ...as the 1.3.0 data spec sets them: IDLE class, nice 5 and SCHED_BATCH (3),
# LINUX32, pykata.test, umask 23 (octal 0027), idle 1, burst 20000, memory.high,
# and SIGSYS (128 + 31) from SCMP_ACT_KILL_PROCESS (sethostname) and
# SCMP_ACT_KILL_THREAD (link).
APPLIED = ["idle", "5 3", "i686", "pykata.test", "0027", "1", "20000", "201326592",
           "159", "159"]


@pytest.fixture
def oci(tmp_path: Path, guest_assets: assets.AssetPaths) -> Oci:
    return Oci(tmp_path / "root", log=tmp_path / "oci-log.json")


def bundle(where: Path, version: str, script: str, **changes: Any) -> Path:
    """A bundle of the data spec of `version` running `sh -c script`, with a
    private copy of the busybox image."""
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "rootfs").exists():
        shutil.copytree(ensure_image(), where / "rootfs", symlinks=True)
    spec = json.loads((DATA / f"runtime-spec-{version}-config.json").read_text())
    spec["process"]["args"] = ["sh", "-c", script]
    spec.update(changes)
    (where / "config.json").write_text(json.dumps(spec))
    return where


def _edit(path: Path, change: Any) -> None:
    spec = json.loads((path / "config.json").read_text())
    change(spec)
    (path / "config.json").write_text(json.dumps(spec))


def _last_error(log: Path) -> str:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    errors = [entry["msg"] for entry in lines if entry["level"] == "error"]
    assert errors, lines
    return str(errors[-1])


def test_pykata_oci_runs_a_1_2_0_bundle(oci: Oci, tmp_path: Path) -> None:
    """A 1.2.0 spec without newer fields runs as a 1.0.2 one did: `run`
    gives the container's output and status."""
    b = bundle(tmp_path / "b", "1.2.0", "hostname; umask; exit 3")
    result = oci("run", "--bundle", str(b), "v12")
    assert result.returncode == 3, (result, oci.log.read_text() if oci.log else "")
    assert result.out.split() == ["spec-1-2", "0022"], result
    assert oci("list", "-q").out == ""


def test_pykata_oci_applies_the_1_3_0_fields(oci: Oci, tmp_path: Path) -> None:
    """create/start/exec/update/delete of a 1.3.0 bundle: every field the
    guest applies is seen from inside, the init's by the init itself, an
    exec's own ioPriority and scheduler by the exec; an exec asking for what
    it cannot get, and an update below the memory in use
    (checkBeforeUpdate), are refused and change nothing."""
    b = bundle(tmp_path / "b", "1.3.0", f"({OBSERVE}) > /init.txt 2>&1; {LOOP}")
    waiter = Waiter(oci, "create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"),
                    "v13")
    assert waiter.wait_created()["rc"] == 0, _last_error(tmp_path / "oci-log.json")
    try:
        assert oci("start", "v13").returncode == 0
        deadline = time.monotonic() + 60
        while not (b / "rootfs" / "init.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        assert (b / "rootfs" / "init.txt").read_text().split("\n")[:len(APPLIED)] == APPLIED
        _exec_checks(oci, tmp_path)
        _update_checks(oci, tmp_path)
        assert oci("kill", "v13", "KILL").returncode == 0
        assert waiter.finish()["status"] == 128 + signal.SIGKILL
    finally:
        oci("delete", "--force", "v13")
    assert oci("list", "-q").out == ""


def _exec(oci: Oci, tmp_path: Path, script: str, **fields: Any) -> Any:
    process = {"args": ["sh", "-c", script], "cwd": "/", "env": ["PATH=/bin:/usr/bin"],
               "user": {"uid": 0, "gid": 0}, **fields}
    path = tmp_path / "process.json"
    path.write_text(json.dumps(process))
    return oci("exec", "--process", str(path), "v13")


def _exec_checks(oci: Oci, tmp_path: Path) -> None:
    stat = "ionice; cut -d' ' -f19,41 /proc/self/stat"
    own = _exec(oci, tmp_path, stat, ioPriority={"class": "IOPRIO_CLASS_BE", "priority": 2},
                scheduler={"policy": "SCHED_IDLE"})
    assert own.out.split("\n")[:2] == ["best-effort: prio 2", "0 5"], own
    # The agent set them on itself only while it spawned that exec's crun.
    plain = _exec(oci, tmp_path, stat)
    assert plain.out.split("\n")[:2] == ["none: prio 0", "0 0"], plain
    refused = _exec(oci, tmp_path, "true", scheduler={
        "policy": "SCHED_OTHER", "flags": ["SCHED_FLAG_RESET_ON_FORK"]})
    assert refused.returncode == 1
    assert "SCHED_FLAG_RESET_ON_FORK" in _last_error(tmp_path / "oci-log.json")


def _update_checks(oci: Oci, tmp_path: Path) -> None:
    assert _exec(oci, tmp_path, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=40").returncode \
        == 0
    resources = tmp_path / "resources.json"
    resources.write_text(json.dumps({"memory": {"limit": 16 << 20}}))
    assert oci("update", "--resources", str(resources), "v13").returncode == 1
    message = _last_error(tmp_path / "oci-log.json")
    assert "checkBeforeUpdate" in message and "below" in message, message
    resources.write_text(json.dumps({"memory": {"limit": 128 << 20},
                                     "cpu": {"quota": 50000, "period": 100000, "burst": 7000}}))
    assert oci("update", "--resources", str(resources), "v13").returncode == 0
    files = _exec(oci, tmp_path, "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max.burst")
    assert files.out.split() == [str(128 << 20), "7000"], files


REFUSED = [
    ("2.0.0", lambda s: s.update(ociVersion="2.0.0"), "ociVersion 2.0.0"),
    ("netdev", lambda s: s["linux"].update(netDevices={"eth1": {}}), "linux.netDevices"),
    ("timens", lambda s: s["linux"].update(timeOffsets={"boottime": {"secs": 60}}),
     "linux.timeOffsets"),
    ("affinity", lambda s: s["process"].update(execCPUAffinity={"final": "0"}),
     "process.execCPUAffinity"),
    ("idmap", lambda s: s["mounts"].append({"destination": "/v", "type": "bind",
                                            "source": "/tmp", "options": ["rbind", "idmap"]}),
     "mounts[8].options: idmap"),
    ("numa", lambda s: s["linux"].update(memoryPolicy={"mode": "MPOL_BIND", "nodes": "0"}),
     "linux.memoryPolicy"),
    ("notify", lambda s: s["linux"]["seccomp"].update(
        listenerPath="/run/agent.sock",
        syscalls=[{"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}]),
     "linux.seccomp.listenerPath"),
    ("vm", lambda s: s.update(vm={"hwConfig": {"vcpus": 2}}), ": vm: not supported"),
]


def test_refused_fields_fail_create_and_leave_nothing(
        oci: Oci, cli: Cli, tmp_path: Path) -> None:
    """Each refusal names the field, before any VM boots: no QEMU, mount or
    state directory remains, for pykata-oci and for `pykata run --bundle`."""
    for name, change, field in REFUSED:
        b = bundle(tmp_path / name, "1.3.0", "true")
        _edit(b, change)
        assert oci("create", "--bundle", str(b), f"x-{name}").returncode == 1
        assert field in _last_error(tmp_path / "oci-log.json"), name
        root = tmp_path / "root"
        assert not root.exists() or not list(root.iterdir())
        assert not unexpected_leftovers()
    run = cli("run", "--bundle", str(tmp_path / "netdev"))
    assert run.returncode == 1 and "linux.netDevices" in run.err, run
    assert not unexpected_leftovers()


def test_pykata_run_applies_a_1_3_0_bundle(cli: Cli, tmp_path: Path) -> None:
    """`pykata run --bundle` of the 1.3.0 data spec: the same fields, seen by
    the container's process, and its exit status; a mount destination
    relative to "/" (runtime-spec 1.2.0) is mounted there."""
    b = bundle(tmp_path / "b", "1.3.0",
               f"{OBSERVE}; grep -c ' /rel tmpfs ' /proc/mounts; exit 4")
    _edit(b, lambda s: s["mounts"].append(
        {"destination": "rel", "type": "tmpfs", "source": "tmpfs"}))
    result = cli("run", "--bundle", str(b))
    assert result.returncode == 4, result
    lines = result.out.split("\n")
    assert lines[:len(APPLIED)] == APPLIED and lines[len(APPLIED)] == "1", result


def test_a_failing_poststart_hook_fails_start_of_a_1_3_0_bundle(
        oci: Oci, tmp_path: Path) -> None:
    """runtime-spec 1.3.0: a failing poststart hook fails `start` and stops
    the container (before 1.3.0 it was a warning, see test_oci_cli)."""
    hooks = {"poststart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no-way >&2; exit 7"]}]}
    b = bundle(tmp_path / "b", "1.3.0", LOOP, hooks=hooks)
    waiter = Waiter(oci, "create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"),
                    "p13")
    assert waiter.wait_created()["rc"] == 0
    try:
        assert oci("start", "p13").returncode == 1
        message = _last_error(tmp_path / "oci-log.json")
        assert "poststart" in message and "no-way" in message, message
        assert waiter.finish()["status"] == 128 + signal.SIGKILL
        assert oci.state("p13")["status"] == "stopped"
    finally:
        oci("delete", "--force", "p13")
    assert oci("list", "-q").out == ""


def _bundle_config(containerd: PrivateContainerd, cid: str) -> dict[str, Any]:
    """The config.json containerd wrote into the task's bundle."""
    found = list(containerd.state.glob(f"io.containerd.runtime.v2.task/*/{cid}/config.json"))
    assert found, f"no bundle for {cid} under {containerd.state}"
    config: dict[str, Any] = json.loads(found[0].read_text())
    return config


def test_containerd_runs_1_2_0_and_1_3_0_specs(
        containerd: PrivateContainerd, tmp_path: Path) -> None:
    """`ctr run --config` hands the shim the spec file's version and fields
    (those containerd 1.6's own spec types know: the bundle is read to see
    which reached pykata); each of those is applied, and a refused field
    fails the task by name with nothing left."""
    b12 = bundle(tmp_path / "b12", "1.2.0", "hostname; exit 5")
    _edit(b12, lambda s: s["root"].update(path=str(b12 / "rootfs")))
    run12 = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--config",
                           str(b12 / "config.json"), "v12")
    assert (run12.returncode, run12.out.strip()) == (5, "spec-1-2"), run12.err

    b13 = bundle(tmp_path / "b13", "1.3.0", f"({OBSERVE}) > /out.txt 2>&1; {LOOP}")
    _edit(b13, lambda s: s["root"].update(path=str(b13 / "rootfs")))
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, "--config",
                             str(b13 / "config.json"), "v13")
    assert started.returncode == 0, started.err
    try:
        seen = _bundle_config(containerd, "v13")
        assert seen["ociVersion"] == "1.3.0" and seen["domainname"] == "pykata.test"
        deadline = time.monotonic() + 60
        while not (b13 / "rootfs" / "out.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        lines = (b13 / "rootfs" / "out.txt").read_text().split("\n")[:len(APPLIED)]
        # containerd 1.6 drops what its spec types lack (ioPriority, scheduler).
        expected = list(APPLIED)
        if "ioPriority" not in seen["process"]:
            expected[0] = "none: prio 0"
        if "scheduler" not in seen["process"]:
            expected[1] = "0 0"
        assert lines == expected, (lines, seen["process"])
    finally:
        containerd.remove("v13")

    bad = bundle(tmp_path / "bad", "1.3.0", "true")
    _edit(bad, lambda s: (s["root"].update(path=str(bad / "rootfs")),
                          s["linux"]["namespaces"].append({"type": "time"})))
    refused = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--config",
                             str(bad / "config.json"), "vbad")
    assert refused.returncode != 0, refused.out
    assert "linux.namespaces: time" in refused.err, refused.err
    containerd.ctr("container", "rm", "vbad")
    # Refused before a VM booted: no QEMU, shim, mount or state remains (the
    # shims of the tasks before it may still be on their way out).
    deadline = time.monotonic() + 10
    while unexpected_leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not unexpected_leftovers()
