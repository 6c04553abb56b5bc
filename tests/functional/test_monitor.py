"""`pykata monitor` scraped by a real Prometheus server, with real pods of
two front ends (`pykata run` and `pykata-oci`) booted in real VMs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import assets
from tests.functional.conftest import Cli
from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd
from tests.functional.monitor_tools import Monitor, Prometheus, wait_for
from tests.functional.oci_tools import Oci, Waiter, make_bundle

# Under Prometheus' scrape timeout (1 s, its interval here) with room to answer.
POD_TIMEOUT = 0.5


@pytest.fixture
def monitor(guest_assets: assets.AssetPaths) -> Iterator[Monitor]:
    # Each request its own scrape: the test sees a SIGSTOP's effect at once
    # (a scrape's figures are otherwise reused for a second).
    started = Monitor(POD_TIMEOUT, "--reuse-seconds", "0")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def prometheus(monitor: Monitor, tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{monitor.port}")
    try:
        yield server
    finally:
        server.stop()


def _run_pod() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "--", "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n", "pykata run did not start its container"
    return proc


def _by_front_end(monitor: Monitor) -> dict[str, dict[str, Any]]:
    return {entry["front_end"]: entry for entry in monitor.sandboxes()}


def _series(prometheus: Prometheus, promql: str) -> dict[str, float]:
    """sandbox_id -> value of `promql`'s samples."""
    return {s["metric"].get("sandbox_id", ""): float(s["value"][1])
            for s in prometheus.query(promql)}


FAMILIES = (
    "pykata_hypervisor_resident_memory_bytes", "pykata_hypervisor_proportional_memory_bytes",
    "pykata_hypervisor_cpu_seconds_total", "pykata_hypervisor_open_fds",
    "pykata_hypervisor_threads", "pykata_shim_resident_memory_bytes", "pykata_shim_threads",
    "pykata_shim_cpu_seconds_total", 'pykata_guest_memory_bytes{item="MemTotal"}',
    "pykata_guest_load1", 'pykata_guest_cpu_seconds_total{mode="idle"}',
    'pykata_guest_network_receive_bytes_total{interface="lo"}',
    "pykata_agent_resident_memory_bytes", "pykata_agent_open_fds",
    'pykata_pod_start_seconds{phase="agent_ready",source="cold"}',
    'pykata_shim_agent_rpc_duration_seconds_count{method="CreateContainer"}',
    'pykata_shim_agent_rpc_duration_seconds_count{method="StartContainer"}',
    'pykata_guest_up')
POSITIVE = ("memory_bytes", "_count", "start_seconds", "threads", "guest_up")


def _missing(prometheus: Prometheus, ids: set[str]) -> list[str]:
    """The families (of FAMILIES) Prometheus lacks, or has wrong, for `ids`."""
    missing = []
    for family in FAMILIES:
        values = _series(prometheus, family)
        if not ids <= set(values) or (any(p in family for p in POSITIVE) and not all(
                values[sid] > 0 for sid in ids)):
            missing.append(f"{family}: {values}")
    return missing


def _check_labels(prometheus: Prometheus, run_id: str, oci_id: str) -> None:
    info = {s["metric"]["sandbox_id"]: (s["metric"]["front_end"], s["metric"]["source"])
            for s in prometheus.query("pykata_pod_info")}
    assert info[run_id] == ("run", "cold") and info[oci_id] == ("oci", "cold"), info
    # pykata's default guest memory, not a number made up.
    memory = _series(prometheus, 'pykata_guest_memory_bytes{item="MemTotal"}')
    assert all(64 << 20 < memory[sid] <= 16 << 30 for sid in (run_id, oci_id)), memory
    containers = {(s["metric"]["sandbox_id"], s["metric"]["container_id"],
                   s["metric"]["status"]) for s in prometheus.query("pykata_container_info")}
    assert (oci_id, "c1", "running") in containers, containers
    assert (run_id, run_id, "running") in containers, containers


def test_prometheus_sees_pods_of_two_front_ends_and_a_killed_one_goes(
        monitor: Monitor, prometheus: Prometheus, tmp_path: Path, cli: Cli) -> None:
    """Two pods (`pykata run`, `pykata-oci`): Prometheus' API returns their
    series with sandbox_id, front end and VM source; an owner stopped with
    SIGSTOP is skipped and counted while the scrape still answers within the
    per-pod deadline; a pod killed (owner and VM) vanishes from the next
    scrapes while the target stays up."""
    oci = Oci(tmp_path / "root", log=tmp_path / "oci-log.json")
    run = _run_pod()
    waiter = None
    try:
        bundle = make_bundle(tmp_path / "b", ["sh", "-c", "sleep 600"])
        waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                        str(tmp_path / "pid"), "c1")
        created = waiter.wait_created()
        assert created["rc"] == 0, waiter.finish()
        assert oci("start", "c1").returncode == 0
        pods = wait_for("both pods in /sandboxes", lambda: (
            found if {"run", "oci"} <= set(found := _by_front_end(monitor)) else None), 60)
        run_id, oci_id = pods["run"]["id"], pods["oci"]["id"]
        assert pods["oci"]["owner_pid"] == created["pid"]  # the container's pid owns it
        deadline = time.monotonic() + 60
        while (missing := _missing(prometheus, {run_id, oci_id})) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert not missing, "Prometheus lacks:\n" + "\n".join(missing)
        _check_labels(prometheus, run_id, oci_id)
        assert _series(prometheus, 'up{job="pykata"}') == {"": 1.0}

        # A stuck owner: skipped and counted, never waited for.
        failures = _counter(monitor.metrics(), "pykata_monitor_scrape_failures_total")
        os.kill(created["pid"], signal.SIGSTOP)
        try:
            started = time.monotonic()
            text = monitor.metrics()
            seconds = time.monotonic() - started
        finally:
            os.kill(created["pid"], signal.SIGCONT)
        assert seconds < POD_TIMEOUT + 2.0, seconds
        assert f'sandbox_id="{run_id}"' in text and f'sandbox_id="{oci_id}"' not in text
        assert _counter(text, "pykata_monitor_scrape_failures_total") >= failures + 1
        assert _counter(text, "pykata_running_pods") == 2

        # A pod killed meanwhile: its series go, the scrape goes on.
        run.kill()
        run.wait()
        wait_for("the killed pod's series are gone", lambda: run_id not in _series(
            prometheus, "pykata_pod_info"), 30)
        assert oci_id in _series(prometheus, "pykata_guest_up")
        assert run_id not in _series(prometheus, "pykata_hypervisor_resident_memory_bytes")
        assert _series(prometheus, 'up{job="pykata"}') == {"": 1.0}
        # A scrape that began before the kill counts it among the running.
        wait_for("one running pod", lambda: _series(
            prometheus, "pykata_running_pods") == {"": 1.0}, 10)
        assert [e["id"] for e in monitor.sandboxes()] == [oci_id]
    finally:
        run.kill()
        run.wait()
        if waiter is not None:
            oci("kill", "c1", "KILL")
            waiter.finish()
            oci("delete", "--force", "c1")
        # The killed run's mounts and directory (its owner could not).
        cli("cleanup")


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not in the scrape"
    return float(match.group(1))


def test_a_containerd_pod_is_scraped_through_its_shim(
        monitor: Monitor, containerd: PrivateContainerd) -> None:
    """A pod of containerd's (its owner is the shim) is found and asked like
    the others: its shim's and QEMU's figures, its guest's, and the shim's
    agent calls, under the container's id."""
    cid = "monitored"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    assert started.returncode == 0, started.err
    try:
        pods = wait_for("the shim's pod in /sandboxes", lambda: [
            e for e in monitor.sandboxes() if e["front_end"] == "shim"], 60)
        sid = pods[0]["id"]
        text = wait_for("the guest's figures", lambda: (
            t if f'pykata_guest_up{{sandbox_id="{sid}"}} 1.0' in (t := monitor.metrics())
            else None), 30)
        assert f'pykata_pod_info{{front_end="shim",sandbox_id="{sid}",source="cold"}}' in text
        assert (f'pykata_container_info{{container_id="{cid}",sandbox_id="{sid}",'
                'status="running"}') in text
        for family in ("pykata_hypervisor_resident_memory_bytes",
                       "pykata_shim_resident_memory_bytes", "pykata_agent_open_fds"):
            assert f'{family}{{sandbox_id="{sid}"}}' in text, family
        assert (f'pykata_shim_agent_rpc_duration_seconds_count{{method="CreateContainer",'
                f'sandbox_id="{sid}"}}') in text
    finally:
        containerd.remove(cid)
