"""A pod's network namespace reaches its VM through every front end: the
shim (`ctr run --with-ns network:PATH`, as CRI gives the sandbox container a
path) and `pykata run --netns`; what cannot be mirrored is refused before a
VM boots, and what a dead owner left is cleaned up. Namespaces, addresses
and servers are all the test's own (tests.functional.netns_tools)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import read_sandbox_state
from pykata.runtime.spec import default_spec
from tests.functional.conftest import Cli, shim_processes
from tests.functional.conftest import started_qemu_processes as qemu_processes
from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd
from tests.functional.netns_tools import (
    PEER_IP,
    POD_IP,
    TAP_SUFFIX,
    PodNetns,
    greeting_server,
    ip,
    network_leftovers,
    pod_and_peer,
    steady_client,
    tc,
)
from tests.functional.oci_tools import Oci, Result, make_bundle


@pytest.fixture
def netns() -> Iterator[PodNetns]:
    with pod_and_peer() as made:
        yield made


def _wait(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _ingress(netns: PodNetns) -> str:
    return tc("-n", netns.pod, "qdisc", "show", "dev", "eth0")


def test_ctr_with_a_network_namespace_reaches_a_server_beside_the_pod(
        containerd: PrivateContainerd, netns: PodNetns) -> None:
    with greeting_server(netns.peer) as server:
        result = containerd.run(
            "net-with-ns", "sh", "-c",
            f"ip -4 addr show eth0; ip route; nc {PEER_IP} 8080 </dev/null",
            extra=("--with-ns", f"network:{netns.path}"))
        assert result.returncode == 0, result.err
        assert f"inet {POD_IP}/24" in result.out, result.out
        assert f"hello {POD_IP}" in result.out, result.out
        assert server.wait(30) == 0
    assert "ingress" not in _ingress(netns)


def test_a_missing_namespace_is_refused_by_the_shim(containerd: PrivateContainerd) -> None:
    missing = "/run/netns/pykata-no-such-namespace"
    result = containerd.run("net-missing", "true", extra=("--with-ns", f"network:{missing}"))
    assert result.returncode != 0
    assert f"network namespace {missing} does not exist" in result.err, result.err
    assert not qemu_processes()
    containerd.remove("net-missing")


def test_an_interface_it_cannot_mirror_is_refused_by_the_shim(
        containerd: PrivateContainerd, netns: PodNetns) -> None:
    ip("-n", netns.pod, "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789")
    ip("-n", netns.pod, "addr", "add", "10.233.0.1/24", "dev", "vx0")
    result = containerd.run("net-vxlan", "true", extra=("--with-ns", f"network:{netns.path}"))
    assert result.returncode != 0
    assert "interface vx0" in result.err and "is a vxlan" in result.err, result.err
    assert not qemu_processes()
    assert "ingress" not in _ingress(netns)
    containerd.remove("net-vxlan")


def test_a_namespace_set_up_by_someone_else_is_refused_and_left_as_found(
        containerd: PrivateContainerd, netns: PodNetns) -> None:
    """An interface of pykata's tap name (not a tap) and an ingress qdisc
    pykata did not add, with its filter, on the pod's interface: the start
    is refused before anything is made, and both are still there after (the
    undo used to remove the qdisc it found)."""
    ip("-n", netns.pod, "link", "add", "tap0_pykata", "type", "veth", "peer", "name", "notap0")
    tc("-n", netns.pod, "qdisc", "add", "dev", "eth0", "ingress")
    tc("-n", netns.pod, "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all",
       "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", "lo")
    try:
        result = containerd.run("net-foreign", "true",
                                extra=("--with-ns", f"network:{netns.path}"))
        assert result.returncode != 0
        assert not qemu_processes()
        assert "qdisc ingress" in _ingress(netns), "the failed start removed a qdisc it found"
        assert "Egress Mirror to device lo" in tc("-n", netns.pod, "filter", "show", "dev",
                                                  "eth0", "ingress")
        assert "tap0_pykata" in ip("-n", netns.pod, "link", "show")
        assert f"{netns.path} is already mirrored into a VM" in result.err, result.err
        assert "interface tap0_pykata" in result.err, result.err
    finally:
        tc("-n", netns.pod, "qdisc", "del", "dev", "eth0", "ingress")
        ip("-n", netns.pod, "link", "del", "tap0_pykata")
        containerd.remove("net-foreign")


def test_internetworking_model_none_gives_loopback_only(
        containerd: PrivateContainerd, netns: PodNetns,
        shim_config: Callable[[str], None]) -> None:
    text = containerd.pykata_config.read_text()
    assert 'internetworking_model = "tcfilter"' in text
    shim_config(text.replace('internetworking_model = "tcfilter"',
                             'internetworking_model = "none"'))
    result = containerd.run("net-none", "ls", "/sys/class/net",
                            extra=("--with-ns", f"network:{netns.path}"))
    assert result.returncode == 0, result.err
    # The guest kernel's own tunnel device (sit0) aside, no NIC: only loopback.
    assert set(result.out.split()) - {"sit0"} == {"lo"}, result.out
    assert "ingress" not in _ingress(netns)


def test_a_killed_shims_redirects_are_removed(
        containerd: PrivateContainerd, netns: PodNetns) -> None:
    """SIGKILL the shim: QEMU (and with it the tap) dies; containerd's
    clean-up of the dead shim removes the redirect on the pod's interface."""
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns",
                             f"network:{netns.path}", IMAGE, "net-killed", "sleep", "600")
    assert started.returncode == 0, started.err
    assert "ingress" in _ingress(netns)
    (shim,) = shim_processes()
    os.kill(int(shim.split()[0]), signal.SIGKILL)
    _wait(lambda: containerd.task_status("net-killed") in ("STOPPED", ""), "the task to end")
    containerd.remove("net-killed")
    _wait(lambda: not network_leftovers(), "the redirects to go: " + "; ".join(
        network_leftovers()))


def test_pykata_cleanup_removes_a_killed_runs_redirects(cli: Cli, netns: PodNetns) -> None:
    """`pykata run --netns` killed with SIGKILL leaves its redirect and state;
    `pykata cleanup` removes both."""
    env = {**os.environ, "PYKATA_RUN_ROOT": str(run_root())}
    argv = [sys.executable, "-m", "pykata.cli.main", "run", "--netns", str(netns.path),
            "--", "sleep", "600"]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: qemu_processes() and "ingress" in _ingress(netns)
              and any((run_root() / "sandboxes").glob("run-*/state.json")), "the VM", 120)
        time.sleep(1)
        proc.kill()
        proc.wait()
        _wait(lambda: not qemu_processes(), "QEMU to die with its owner")
        assert "ingress" in _ingress(netns)  # left behind, until cleanup
        result = cli("cleanup")
        assert result.returncode == 0, result.err
        assert "removing sandbox" in result.out, result.out
        assert "ingress" not in _ingress(netns)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cli("cleanup")  # whatever happened above: nothing left for the next test


def _taps(netns: PodNetns) -> list[str]:
    links = ip("-n", netns.pod, "-o", "link", "show").splitlines()
    return [n for n in (line.split(":")[1].strip().split("@")[0] for line in links)
            if n.endswith(TAP_SUFFIX)]


def _oci_run_in(netns: PodNetns, tmp_path: Path) -> Result:
    """`pykata-oci run` of a container whose spec names the pod namespace."""
    linux = default_spec(["true"])["linux"]
    linux["namespaces"].append({"type": "network", "path": str(netns.path)})
    bundle = make_bundle(tmp_path / "bundle", ["true"], linux=linux)
    oci = Oci(tmp_path / "oci-root")
    result = oci("run", "--bundle", str(bundle), "joins")
    assert not (oci.root / "joins").exists()
    return result


# A's container: a server the peer talks to, until the peer knocks on port 8081.
_SERVE_UNTIL_KNOCKED = "nc -ll -p 8080 -e echo pong & nc -l -p 8081 </dev/null; kill $!"


def test_a_second_vm_on_a_mirrored_namespace_is_refused_and_the_first_keeps_talking(
        cli: Cli, netns: PodNetns, tmp_path: Path) -> None:
    """Sandbox A mirrors a namespace and serves a peer that keeps talking to
    it; B asks for the same namespace (`pykata run` by its path, then through
    a process in it as `docker run --network container:A` would, then a
    pykata-oci container whose spec names it, as a second member of a podman
    pod) and is refused, naming A. A's traffic never stops, B leaves nothing,
    and A's own teardown then leaves nothing either."""
    env = {**os.environ, "PYKATA_RUN_ROOT": str(run_root())}
    a = subprocess.Popen([sys.executable, "-m", "pykata.cli.main", "run", "--netns",
                          str(netns.path), "--", "sh", "-c", _SERVE_UNTIL_KNOCKED],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    member = subprocess.Popen(["ip", "netns", "exec", netns.pod, "sleep", "600"])
    try:
        with steady_client(netns.peer, POD_IP, 8080, "pong\n") as client:
            client.wait_for_ok(180)
            # The session's shared VM lives under the same run root: A is the
            # sandbox that mirrors the namespace.
            (a_id, a_key) = next((state.id, state.key) for state in (
                read_sandbox_state(SandboxPaths(d.name, run_root()))
                for d in (run_root() / "sandboxes").iterdir()) if state.netns)
            before = {p.name for p in (run_root() / "sandboxes").iterdir()}
            refusals = [cli("run", "--netns", path, "--", "true")
                        for path in (str(netns.path), f"/proc/{member.pid}/ns/net")]
            oci_refusal = _oci_run_in(netns, tmp_path)
            client.wait_for(len(client.results) + 10, 60)
        assert client.failures == [], f"A lost its network: {client.results}"
        for b in refusals:
            assert b.returncode == 1, b.err
            assert f"already mirrored into the VM of sandbox {a_id}" in b.err, b.err
            assert "a VM's network cannot be joined by another VM" in b.err, b.err
        assert oci_refusal.returncode != 0
        assert f"already mirrored into the VM of sandbox {a_id}" in oci_refusal.err, \
            oci_refusal.err
        # B made nothing: no VM, no state, no tap, no qdisc; A's are as they were.
        assert len(qemu_processes()) == 1
        assert {p.name for p in (run_root() / "sandboxes").iterdir()} == before
        assert a_key in before
        assert _taps(netns) == ["tap0_pykata"]
        assert _ingress(netns).count("qdisc ingress") == 1
        subprocess.run(["ip", "netns", "exec", netns.peer, "busybox", "nc", "-w", "10",
                        POD_IP, "8081"], stdin=subprocess.DEVNULL, check=True)
        assert a.wait(60) == 0, a.stderr.read() if a.stderr else b""
        assert not network_leftovers()
        assert {p.name for p in (run_root() / "sandboxes").iterdir()} == before - {a_key}
    finally:
        member.kill()
        member.wait()
        if a.poll() is None:
            a.kill()
            a.wait()
        cli("cleanup")


def test_the_guest_gets_the_pods_permanent_neighbours_and_its_gateways(
        cli: Cli, netns: PodNetns) -> None:
    """A permanent entry of the pod namespace, and the gateway's MAC the
    namespace has learnt, become permanent neighbours in the guest."""
    ip("-n", netns.pod, "route", "add", "default", "via", PEER_IP)
    ip("-n", netns.pod, "neigh", "add", "10.231.0.9", "lladdr", "02:00:00:00:00:09",
       "dev", "eth0", "nud", "permanent")
    learnt = subprocess.run(["ip", "netns", "exec", netns.pod, "busybox", "ping", "-c1",
                             "-W5", PEER_IP], capture_output=True, text=True)
    assert learnt.returncode == 0, learnt.stdout + learnt.stderr
    peer_mac = ip("-n", netns.peer, "-o", "link", "show", "eth0p").split("link/ether ")[1][:17]
    result = cli("run", "--netns", str(netns.path), "--", "ip", "neigh", "show")
    assert result.returncode == 0, result.err
    entries = {line.split()[0]: line.split() for line in result.out.lower().splitlines()}
    for address, mac in (("10.231.0.9", "02:00:00:00:00:09"), (PEER_IP, peer_mac)):
        entry = entries.get(address, [])
        assert entry[1:5] == ["dev", "eth0", "lladdr", mac], result.out
        assert entry[-1] == "permanent", result.out


def test_the_guests_loopback_is_up(cli: Cli) -> None:
    """A pod's containers share the VM's loopback: it is up, with 127.0.0.1."""
    result = cli("run", "--", "sh", "-c", "ip addr show lo; ping -c1 -W5 127.0.0.1")
    assert result.returncode == 0, result.err + result.out
    assert "inet 127.0.0.1/8" in result.out and "1 packets received" in result.out, result.out
