"""podman 4.3 gives a container of the runtime under test a network namespace
the test made (`--network ns:PATH`): netns_tools' pod namespace, joined by a
veth to a peer namespace with a server. podman's own networks are not used
(its default one would put a bridge on the machine). The VM mirrors the pod
namespace; the files podman writes for the container (/etc/hosts,
/etc/resolv.conf, /etc/hostname) are the ones the container reads.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.netns_tools import (
    NETNS_DIR,
    PEER_IP,
    POD_IP,
    PodNetns,
    greeting_server,
    ip,
    pod_and_peer,
)
from tests.oci.network_checks import digests_printed, file_digest, ipv4_of, vm_leftovers
from tests.oci.podman_peer import PodmanPeer

# A name server on the peer's link that nobody answers for: only /etc/hosts
# is ever asked here, and a query would stay in the test's namespaces.
DNS = "10.231.0.53"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def netns(oci_root: None) -> Iterator[PodNetns]:
    with pod_and_peer("pmnet") as made:
        yield made
    assert not (NETNS_DIR / made.pod).exists() and not (NETNS_DIR / made.peer).exists()


@pytest.fixture(scope="module", autouse=True)
def module_leaves_nothing(podman_peer: PodmanPeer) -> Iterator[None]:
    yield
    left = podman_peer.leftovers()
    assert not left, f"left behind by {__name__}: {left}"


@pytest.fixture(autouse=True)
def test_leaves_nothing(podman_peer: PodmanPeer) -> Iterator[None]:
    yield
    containers = podman_peer.container_ids()
    if containers:
        podman_peer.podman("rm", "-f", "-t", "0", *containers)  # so the next tests start clean
    left = [f"container {c}" for c in containers] + vm_leftovers()
    assert not left, f"left behind: {left}"


def run_argv(netns: PodNetns, *args: str) -> tuple[str, ...]:
    return ("run", "--network", f"ns:{netns.path}", *args)


# -- a container in the test's pod namespace ---------------------------------------


@dataclass(frozen=True)
class PodRun:
    result: subprocess.CompletedProcess[bytes]
    server_code: int | None

    @property
    def output(self) -> str:
        return out(self.result)


@pytest.fixture(scope="module")
def pod_run(podman_peer: PodmanPeer, netns: PodNetns) -> PodRun:
    """One container in the pod namespace: its interfaces and routes as the
    guest has them, then `nc` to the server in the peer namespace."""
    script = ("ip -o -4 addr show eth0; ip -o link show eth0; ip route; ip -o link show lo; "
              f"nc {PEER_IP} 8080 </dev/null")
    with greeting_server(netns.peer) as server:
        result = podman_peer.podman(*run_argv(netns, "--rm", "--dns", PEER_IP),
                                    podman_peer.image, "sh", "-c", script)
        try:
            code = server.wait(30)
        except subprocess.TimeoutExpired:
            code = None
    return PodRun(result, code)


def test_a_container_in_the_pod_namespace_reaches_the_peer(pod_run: PodRun) -> None:
    assert pod_run.result.returncode == 0, err(pod_run.result)
    assert f"hello {POD_IP}" in pod_run.output.splitlines(), pod_run.output
    assert pod_run.server_code == 0


def test_the_guest_nic_is_the_pod_interface(pod_run: PodRun, netns: PodNetns) -> None:
    """Address, MTU, MAC and route of the pod namespace's eth0."""
    output = pod_run.output
    assert ipv4_of(output) == POD_IP
    pod_link = ip("-n", netns.pod, "-o", "link", "show", "eth0")
    mac = pod_link.split("link/ether ")[1].split()[0]
    # a veth, as runc's container sees it, is "eth0@...:"
    guest_link = next(line for line in output.splitlines()
                      if re.match(r"\d+: eth0[@:]", line))
    assert " mtu 1400 " in guest_link and f"link/ether {mac} " in guest_link, guest_link
    assert f"10.231.0.0/24 dev eth0 scope link  src {POD_IP}" in output, output


def test_the_loopback_interface_is_up(pod_run: PodRun) -> None:
    """The pod namespace's lo is up, so runc's container has it up. A VM's
    containers share its namespace: the guest's lo has to be up for them."""
    lo = next(line for line in pod_run.output.splitlines() if ": lo:" in line)
    assert "UP" in lo.split("<")[1].split(">")[0].split(","), lo


# -- what podman writes for a container ---------------------------------------------


def test_hostname_hosts_and_dns_settings_are_the_files_podman_wrote(
        podman_peer: PodmanPeer, netns: PodNetns) -> None:
    """--hostname, --add-host and --dns*: the container sees exactly the
    files podman wrote, and a name from /etc/hosts reaches the server."""
    files = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
    script = (f"hostname; sha256sum {' '.join(files)}; "
              "cat /etc/hosts /etc/resolv.conf; nc testpeer 8080 </dev/null")
    name = "pykata-net-files"
    try:
        with greeting_server(netns.peer) as server:
            result = podman_peer.podman(
                *run_argv(netns, "--name", name, "--hostname", "pykata-box",
                          "--add-host", f"testpeer:{PEER_IP}", "--dns", DNS,
                          "--dns-search", "pykata.test", "--dns-option", "ndots:2"),
                podman_peer.image, "sh", "-c", script)
            assert result.returncode == 0, err(result)
            assert server.wait(30) == 0
        output = out(result)
        lines = output.splitlines()
        assert lines[0] == "pykata-box"
        assert f"{PEER_IP}\ttestpeer" in lines, output
        assert f"nameserver {DNS}" in lines, output
        assert "search pykata.test" in lines and "options ndots:2" in lines, output
        assert f"hello {POD_IP}" in lines, output
        inspected = podman_peer.podman(
            "inspect", "-f", "{{.HostnamePath}} {{.HostsPath}} {{.ResolvConfPath}}", name)
        assert inspected.returncode == 0, err(inspected)
        written = dict(zip(files, out(inspected).split(), strict=True))
        inside = digests_printed(output)
        assert inside == {f: file_digest(Path(written[f])) for f in files}, output
    finally:
        podman_peer.podman("rm", "-f", "-t", "0", name)
