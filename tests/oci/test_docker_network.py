"""docker 20.10's default bridge reaches a container of the runtime under test.

A dockerd of this module's own (NetnsDockerPeer) runs in a network namespace
the test made, the pod namespace of netns_tools' pod-and-peer pair, with its
default bridge there: a container joins it through a veth in a namespace of
its own (pykata's monitor makes that namespace, docker's prestart hook puts
the veth in it, the VM mirrors it). The peer namespace holds the server; it
routes the bridge's subnet back through the pod namespace, which forwards
(no NAT, no iptables). No address of the test is ever on the machine's own
interfaces, and no traffic leaves these namespaces.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata.runtime.paths import run_root
from tests.functional.conftest import without_shared_sandboxes
from tests.functional.netns_tools import (
    NETNS_DIR,
    PEER_IP,
    POD_IP,
    PodNetns,
    greeting_server,
    ip,
    pod_and_peer,
)
from tests.oci import docker_peer as docker_mod
from tests.oci.conftest import ARTIFACTS, _require, _runtime_env
from tests.oci.docker_peer import RUNTIME_NAME
from tests.oci.netns_docker_peer import BRIDGE_IP, BRIDGE_SUBNET, NetnsDockerPeer
from tests.oci.network_checks import (
    digests_printed,
    file_digest,
    ipv4_of,
    machine_test_addresses,
    vm_leftovers,
)

RUN = ("run", "--runtime", RUNTIME_NAME)
PUBLISHED_PORT = 18080
# A name server on the peer's link that nobody answers for: only /etc/hosts
# is ever asked here, and a query would stay in the test's namespaces.
DNS = "10.231.0.53"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def bridge_netns(oci_root: None) -> Iterator[PodNetns]:
    """The daemon's namespace (forwarding on, as a docker host has it) and the
    server's, which routes the bridge's subnet back to the daemon's."""
    with pod_and_peer("dkbr") as made:
        ip("netns", "exec", made.pod, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ip("-n", made.peer, "route", "add", BRIDGE_SUBNET, "via", POD_IP)
        yield made
    assert not (NETNS_DIR / made.pod).exists() and not (NETNS_DIR / made.peer).exists()


@pytest.fixture(scope="module")
def bridged_docker(oci_runtime: Path, oci_image_archive: Path, stale_peers_reaped: list[Path],
                   bridge_netns: PodNetns) -> Iterator[NetnsDockerPeer]:
    _require(docker_mod.missing_tools(), "docker")
    peer = NetnsDockerPeer(oci_runtime, bridge_netns.pod, dns=PEER_IP,
                           runtime_env=_runtime_env())
    try:
        peer.start()
        peer.load_image(oci_image_archive)
        bridge = ip("-n", bridge_netns.pod, "-o", "-4", "addr", "show", "docker0")
        assert f"inet {BRIDGE_IP}/24" in bridge, bridge
        assert not machine_test_addresses()
        yield peer
    finally:
        peer.stop(keep_logs=ARTIFACTS / "bridged")
    left = peer.leftovers(settle=0)
    assert not left, f"the bridged docker left behind: {left}"


@pytest.fixture(autouse=True)
def test_leaves_nothing(bridged_docker: NetnsDockerPeer) -> Iterator[None]:
    yield
    containers = bridged_docker.container_ids()
    if containers:
        bridged_docker.docker("rm", "-f", *containers)  # so the next tests start clean
    left = [f"container {c}" for c in containers]
    left += vm_leftovers() + bridged_docker.leftovers()
    # pykata's mounts in the daemons' mount namespace (not visible from here)
    left += [f"mount {m}" for m in without_shared_sandboxes(
        bridged_docker.inner_mounts(run_root()))]
    assert not left, f"left behind: {left}"


def docker_mac(address: str) -> str:
    """The MAC docker 20.10 gives a bridge endpoint: 02:42 and the IPv4 address."""
    return "02:42:" + ":".join(f"{int(octet):02x}" for octet in address.split("."))


# -- a container on the bridge ------------------------------------------------------


@dataclass(frozen=True)
class BridgedRun:
    result: subprocess.CompletedProcess[bytes]
    server_code: int | None

    @property
    def output(self) -> str:
        return out(self.result)


@pytest.fixture(scope="module")
def bridged_run(bridged_docker: NetnsDockerPeer, bridge_netns: PodNetns) -> BridgedRun:
    """One container on the default bridge: its interfaces and routes as the
    guest has them, then `nc` to the server beyond the bridge."""
    script = ("ip -o -4 addr show eth0; cat /sys/class/net/eth0/address; ip route; "
              f"ip -o link show lo; nc {PEER_IP} 8080 </dev/null")
    with greeting_server(bridge_netns.peer) as server:
        result = bridged_docker.docker(*RUN, "--rm", bridged_docker.image, "sh", "-c", script)
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            code = None
    return BridgedRun(result, code)


def test_a_container_on_the_default_bridge_reaches_a_server_beyond_it(
        bridged_run: BridgedRun) -> None:
    assert bridged_run.result.returncode == 0, err(bridged_run.result)
    address = ipv4_of(bridged_run.output)
    # the server saw the container's own bridge address: routed, not masqueraded
    assert f"hello {address}" in bridged_run.output.splitlines(), bridged_run.output
    assert bridged_run.server_code == 0


def test_the_guest_nic_is_dockers_endpoint(bridged_run: BridgedRun) -> None:
    """Address, MAC and default route are the ones docker gave the veth."""
    output = bridged_run.output
    address = ipv4_of(output)
    assert address.startswith("10.234.0.") and address != BRIDGE_IP, output
    assert docker_mac(address) in output.splitlines(), output
    assert f"default via {BRIDGE_IP} dev eth0" in output, output


def test_the_loopback_interface_is_up(bridged_run: BridgedRun) -> None:
    """runc brings up lo in a container's new network namespace. A VM's
    containers share its namespace: the guest's lo has to be up for them."""
    lo = next(line for line in bridged_run.output.splitlines() if ": lo:" in line)
    assert "UP" in lo.split("<")[1].split(">")[0].split(","), lo


# -- what docker writes for a container ---------------------------------------------


def test_hostname_hosts_and_dns_settings_are_the_files_docker_wrote(
        bridged_docker: NetnsDockerPeer, bridge_netns: PodNetns) -> None:
    """--hostname, --add-host and --dns*: the container sees exactly the
    files docker wrote, and a name from /etc/hosts reaches the server."""
    files = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
    script = (f"hostname; sha256sum {' '.join(files)}; ip -o -4 addr show eth0; "
              "cat /etc/hosts /etc/resolv.conf; nc testpeer 8080 </dev/null")
    name = "pykata-net-files"
    try:
        with greeting_server(bridge_netns.peer) as server:
            result = bridged_docker.docker(
                *RUN, "--name", name, "--hostname", "pykata-box",
                "--add-host", f"testpeer:{PEER_IP}", "--dns", DNS,
                "--dns-search", "pykata.test", "--dns-option", "ndots:2",
                bridged_docker.image, "sh", "-c", script)
            assert result.returncode == 0, err(result)
            assert server.wait(30) == 0
        output = out(result)
        lines = output.splitlines()
        assert lines[0] == "pykata-box"
        assert f"{PEER_IP}\ttestpeer" in lines, output
        assert f"{ipv4_of(output)}\tpykata-box" in lines, output
        assert f"nameserver {DNS}" in lines and f"nameserver {PEER_IP}" not in lines, output
        assert "search pykata.test" in lines and "options ndots:2" in lines, output
        assert f"hello {ipv4_of(output)}" in lines, output
        inspected = bridged_docker.docker(
            "inspect", "-f", "{{.HostnamePath}} {{.HostsPath}} {{.ResolvConfPath}}", name)
        assert inspected.returncode == 0, err(inspected)
        written = dict(zip(files, out(inspected).split(), strict=True))
        inside = digests_printed(output)
        assert inside == {f: file_digest(Path(written[f])) for f in files}, output
    finally:
        bridged_docker.docker("rm", "-f", name)


def test_a_published_port_reaches_the_container(bridged_docker: NetnsDockerPeer,
                                                bridge_netns: PodNetns) -> None:
    """-p through docker-proxy, which listens in the daemon's namespace: a
    client in the peer namespace connects to the pod address."""
    started = bridged_docker.docker(
        *RUN, "-d", "-p", f"{PUBLISHED_PORT}:8080", bridged_docker.image,
        "nc", "-l", "-p", "8080", "-e", "echo", "hello-published")
    assert started.returncode == 0, err(started)
    container = out(started).strip()
    try:
        reply = _connect_from(bridge_netns.peer, POD_IP, PUBLISHED_PORT)
        assert reply == "hello-published\n"
        waited = bridged_docker.docker("wait", container, timeout=60)
        assert out(waited).strip() == "0", err(waited)
    finally:
        bridged_docker.docker("rm", "-f", container)
    # the proxy went with the container
    listening = ip("netns", "exec", bridge_netns.pod, "ss", "-Htln", f"sport = :{PUBLISHED_PORT}")
    assert not listening.strip(), listening


def _connect_from(netns: str, address: str, port: int, timeout: float = 60) -> str:
    """What a TCP client in netns reads from address:port; asked again until
    something answers (the container's listener comes up after the proxy's)."""
    code = ("import socket, sys\n"
            f"c = socket.create_connection(({address!r}, {port}), timeout=10)\n"
            "data = b''\n"
            "while chunk := c.recv(4096):\n"
            "    data += chunk\n"
            "sys.stdout.write(data.decode())\n")
    deadline = time.monotonic() + timeout
    while True:
        client = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=30)
        if client.stdout or time.monotonic() > deadline:
            return client.stdout
        time.sleep(0.5)
