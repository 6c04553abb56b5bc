"""What a person needs when something goes wrong, on real VMs: `pykata events`
from every front end, `pykata collect` with a secret in a container's
environment, and a boot that stalls naming its phase."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import assets
from pykata.cli.env_cmd import to_toml
from pykata.runtime.sandbox_index import list_sandboxes
from tests.functional.conftest import (
    Cli,
    pykata_cli,
    session_config_text,
    started_qemu_processes,
)
from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd
from tests.functional.oci_tools import Oci, Waiter, make_bundle

SECRET = "pw-9f3c2a71-do-not-leak"


def _events(sandbox_id: str, *extra: str) -> list[dict[str, object]]:
    result = pykata_cli("events", "--json", *extra, sandbox_id, timeout=60)
    assert result.returncode == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def _texts(entries: list[dict[str, object]]) -> list[str]:
    return [str(e["text"]) for e in entries]


def _wait(condition: object, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _collect(*extra: str) -> str:
    result = pykata_cli("collect", *extra, timeout=120)
    assert result.returncode == 0, result.err
    return result.out


def _assert_sections(report: str, pod: str) -> None:
    for title in ("pykata collect", "versions", "pykata check", "pykata env", "pods",
                  f"pod {pod}", f"pod {pod}: event log", f"pod {pod}: console",
                  "recent errors"):
        assert f"===== {title}" in report, title


@pytest.fixture
def run_pod(guest_assets: assets.AssetPaths) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A `pykata run` pod whose container sleeps, and its sandbox id."""
    before = {e.id for e in list_sandboxes()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "-e", f"MY_SECRET={SECRET}", "--",
         "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        (sandbox_id,) = [e.id for e in list_sandboxes()
                         if e.id not in before and e.state and e.state.front_end == "run"]
        yield proc, sandbox_id
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_run_pod_events_follow_and_collect(
        run_pod: tuple[subprocess.Popen[bytes], str]) -> None:
    """`pykata events` on a `pykata run` pod: its start (how it booted, the
    phases), its container's steps and agent calls; `--follow` prints the
    exit and stop and ends with the pod. `pykata collect` lists it; the
    secret given with -e is nowhere in the report."""
    proc, sandbox_id = run_pod
    entries = _events(sandbox_id)
    texts = _texts(entries)
    assert texts[0] == "starting (run)"
    started = next(i for i, t in enumerate(texts) if t.startswith("started: cold boot, VM pid "))
    assert any(t.startswith("CreateSandbox ") for t in texts[:started])
    assert f"{sandbox_id}: created" in texts and f"{sandbox_id}: started" in texts
    assert any(t.startswith("CreateContainer ") for t in texts)
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    report = _collect()
    _assert_sections(report, sandbox_id)
    assert f"{sandbox_id}: run, running, cold boot, assets current" in report
    assert SECRET not in report
    follower = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "events", "--follow", sandbox_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    followed = out.decode()
    assert re.search(rf"container\s+{re.escape(sandbox_id)}: exited \(status 137\)", followed), \
        followed
    assert "SignalProcess" in followed
    assert proc.wait(timeout=90) == 137
    gone = pykata_cli("events", sandbox_id)
    assert gone.returncode != 0 and "no pod" in gone.err


def test_oci_events_and_collect_with_a_secret_in_the_env(tmp_path: Path,
                                                         guest_assets: object) -> None:
    """A pykata-oci container whose env holds a secret and which prints it:
    `pykata events` reaches its monitor; `pykata collect --output x.tar.gz`
    makes a 0600 tarball whose report has the monitor's log, the env names,
    and not the secret."""
    oci = Oci(tmp_path / "root", log=tmp_path / "oci-log.json")
    bundle = make_bundle(tmp_path / "b", ["sh", "-c", "echo $MY_SECRET; sleep 600"],
                         process={"env": ["PATH=/bin:/usr/bin", f"MY_SECRET={SECRET}"]},
                         annotations={"io.example/token": SECRET + "-annotation"})
    waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                    str(tmp_path / "pid"), "c1")
    assert waiter.wait_created()["rc"] == 0, waiter.finish()
    try:
        assert oci("start", "c1").returncode == 0
        texts = _texts(_events("c1"))
        assert texts[0] == "starting (oci)" and "c1: started" in texts
        assert any(t.startswith("started: ") for t in texts)
        out = tmp_path / "report.tar.gz"
        assert pykata_cli("collect", "--oci-root", str(oci.root), "--output", str(out),
                          timeout=120).returncode == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        with tarfile.open(out) as tar:
            member = tar.extractfile("pykata-collect/report.txt")
            assert member is not None
            report = member.read().decode()
            member = tar.extractfile("pykata-collect/report.json")
            assert member is not None
            as_json = member.read().decode()
        _assert_sections(report, "c1")
        assert "===== pod c1: owner log (" in report and "monitor.log" in report
        assert "env: PATH=<redacted> MY_SECRET=<redacted>" in report
        assert '"io.example/token": "<redacted>"' in report
        assert SECRET not in report and SECRET not in as_json
    finally:
        oci("kill", "c1", "KILL")
        waiter.finish()
        oci("delete", "--force", "c1")


def test_containerd_events_and_collect(containerd: PrivateContainerd) -> None:
    """A containerd task (the shim owns the pod) with a secret in its env:
    events, the bundle's spec in the report with its env redacted."""
    cid = "collect1"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, "--env", f"MY_SECRET={SECRET}",
                             IMAGE, cid, "sh", "-c", "echo $MY_SECRET; sleep 600")
    assert started.returncode == 0, started.err
    try:
        texts = _texts(_events(cid))
        assert texts[0] == "starting (shim)" and f"{cid}: started" in texts
        assert any(t.startswith("started: ") for t in texts)
        report = _collect()
        _assert_sections(report, cid)
        assert "front end: shim" in report and "MY_SECRET=<redacted>" in report
        assert "containerd's log" in report
        assert SECRET not in report
    finally:
        containerd.remove(cid)


def test_a_stalled_boot_names_its_phase_and_shows_the_console(
        cli: Cli, tmp_path: Path) -> None:
    """A kernel command line whose init never starts the agent: the dial
    times out and says the boot stalled before pykata's init, with the
    console's last lines; nothing of the VM is left."""
    data = tomllib.loads(session_config_text())
    # The kernel runs a sleeping shell as init (`--` hands the rest to it:
    # QEMU appends its device words, which become the shell's $0);
    # loglevel=7 makes the kernel's lines reach the console.
    data["hypervisor"]["qemu"]["kernel_params"] = \
        'loglevel=7 rdinit=/bin/busybox -- sh -c "sleep 600"'
    # rdinit is the initrd's init (from the root image the kernel runs init=).
    data["hypervisor"]["qemu"]["guest_root"] = "initrd"
    data["agent"]["dial_timeout"] = 20
    config_file = tmp_path / "configuration.toml"
    config_file.write_text(to_toml(data))
    started = time.monotonic()
    result = cli("--config", str(config_file), "run", "--", "true", timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - started < 240
    err = result.err
    assert "did not answer within 20 s (dial_timeout), stalled in kernel boot: the guest " \
           "kernel never started pykata's init" in err, err
    assert "last console lines" in err and "Run /bin/busybox as init process" in err, err
    assert not started_qemu_processes()


def test_a_pod_on_replaced_guest_assets_is_reported_stale(
        tmp_path: Path, guest_assets: assets.AssetPaths) -> None:
    """A pod booted from configured kernel and initrd files; the initrd is
    then replaced (as a rebuild would): `pykata check` warns about the pod
    with the fix, and `collect` calls it stale. Before, it is current."""
    import shutil

    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd.img"
    shutil.copyfile(guest_assets.kernel, kernel)
    shutil.copyfile(guest_assets.initrd, initrd)
    data = tomllib.loads(session_config_text())
    data["hypervisor"]["qemu"]["kernel"] = str(kernel)
    data["hypervisor"]["qemu"]["initrd"] = str(initrd)
    config_file = tmp_path / "configuration.toml"
    config_file.write_text(to_toml(data))
    before = {e.id for e in list_sandboxes()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "--config", str(config_file), "run", "--",
         "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        (sandbox_id,) = [e.id for e in list_sandboxes() if e.id not in before]
        check = pykata_cli("--config", str(config_file), "check", timeout=60)
        assert f"pod {sandbox_id}" not in check.out, check.out
        report = pykata_cli("--config", str(config_file), "collect", timeout=120).out
        assert f"{sandbox_id}: run, running, cold boot, assets current" in report
        rebuilt = tmp_path / "initrd.new"
        shutil.copyfile(guest_assets.initrd, rebuilt)
        rebuilt.replace(initrd)
        check = pykata_cli("--config", str(config_file), "check", timeout=60)
        assert re.search(rf"WARN pod {re.escape(sandbox_id)}\s+stale\s+\(boots an older "
                         rf"guest root {re.escape(str(initrd))} .*restart the pod", check.out), \
            check.out
        report = pykata_cli("--config", str(config_file), "collect", timeout=120).out
        assert f"{sandbox_id}: run, running, cold boot, assets stale" in report
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
