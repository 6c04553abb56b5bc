"""The tcfilter model on real namespaces: a pod namespace with a veth whose
peer sits in a second test-made namespace. Traffic stays inside the two."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.network import tcfilter
from tests.functional.conftest import Cli
from tests.functional.netns_tools import PEER_IP, POD_IP, greeting_server, pod_and_peer
from tests.functional.netns_tools import ip as _ip

VNET_HDR = 10  # sizeof(struct virtio_net_hdr): every tap read and write starts with one


@pytest.fixture
def pod_netns() -> Iterator[Path]:
    with pod_and_peer() as made:
        yield made.path


def _arp_request(src_mac: bytes) -> bytes:
    """An ARP who-has PEER_IP tell POD_IP, from the pod's MAC."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, src_mac,
                      socket.inet_aton(POD_IP), b"\0" * 6, socket.inet_aton(PEER_IP))
    return b"\xff" * 6 + src_mac + b"\x08\x06" + arp


def _is_arp_reply(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"


def _read_until_arp_reply(fd: int, seconds: float) -> list[bytes]:
    frames: list[bytes] = []
    while not any(_is_arp_reply(f) for f in frames):
        ready, _, _ = select.select([fd], [], [], seconds)
        if not ready:
            break
        frames.append(os.read(fd, 65536)[VNET_HDR:])
    return frames


def _answers_through_its_tap(endpoint: tcfilter.Endpoint) -> bool:
    """Whether an ARP request written to the endpoint's tap reaches the peer
    and the peer's reply comes back through the tap (both redirects work)."""
    mac = bytes.fromhex(endpoint.mac.replace(":", ""))
    os.write(endpoint.tap_fd, b"\0" * VNET_HDR + _arp_request(mac))
    return any(_is_arp_reply(f) and f[:6] == mac
               for f in _read_until_arp_reply(endpoint.tap_fd, 5))


def _qdiscs(ns: str, dev: str = "eth0") -> str:
    return subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev],
                          capture_output=True, text=True).stdout


def _links(ns: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0]
            for line in _ip("-n", ns, "-o", "link", "show").splitlines()]


def test_a_pods_interface_is_joined_to_a_tap_both_ways(pod_netns: Path) -> None:
    (endpoint,) = tcfilter.scan(pod_netns)
    assert endpoint.name == "eth0" and endpoint.mtu == 1400
    assert POD_IP in [a.address for a in endpoint.addresses]  # (and its IPv6 link-local)
    tcfilter.attach(pod_netns, [endpoint])
    try:
        ns = pod_netns.name
        tap = _ip("-n", ns, "-d", "link", "show", endpoint.tap_name)
        assert "mtu 1400" in tap and "tun type tap" in tap
        assert "mirred" in subprocess.run(["tc", "-n", ns, "filter", "show", "dev", "eth0",
                                           "ingress"], capture_output=True, text=True).stdout
        # Tap -> interface -> peer, and the peer's answer: interface -> tap.
        mac = bytes.fromhex(endpoint.mac.replace(":", ""))
        os.write(endpoint.tap_fd, b"\0" * VNET_HDR + _arp_request(mac))
        frames = _read_until_arp_reply(endpoint.tap_fd, 5)
        replies = [f for f in frames if _is_arp_reply(f)]
        assert replies, f"no ARP reply came back through the tap: {frames!r}"
        assert replies[0][:6] == mac  # addressed to the pod's MAC, which the guest gets
    finally:
        tcfilter.detach(pod_netns, [endpoint])
    links = _ip("-n", pod_netns.name, "link", "show")
    assert "tap0_pykata" not in links  # closing the descriptor removed the tap
    qdiscs = subprocess.run(["tc", "-n", pod_netns.name, "qdisc", "show", "dev", "eth0"],
                            capture_output=True, text=True).stdout
    assert "ingress" not in qdiscs


def test_namespaces_it_cannot_mirror_are_refused(pod_netns: Path) -> None:
    with pytest.raises(tcfilter.NetworkError, match="does not exist"):
        tcfilter.scan(Path("/run/netns/pykata-no-such-namespace"))
    _ip("-n", pod_netns.name, "link", "add", "br0", "type", "bridge")
    _ip("-n", pod_netns.name, "addr", "add", "10.232.0.1/24", "dev", "br0")
    with pytest.raises(tcfilter.NetworkError, match=r"br0 .* is a bridge"):
        tcfilter.scan(pod_netns)


def test_the_vm_gets_a_nic_with_the_pods_mac_and_leaves_nothing(
        pod_netns: Path, cli: Cli) -> None:
    (endpoint,) = tcfilter.scan(pod_netns)
    result = cli("run", "--netns", str(pod_netns), "--",
                 "sh", "-c", "cat /sys/class/net/*/address; cat /sys/class/net/*/mtu")
    assert result.returncode == 0, result.err
    assert endpoint.mac in result.out.split(), result.out
    assert "1400" in result.out.split()
    ns = pod_netns.name
    assert "tap0_pykata" not in _ip("-n", ns, "link", "show")
    qdiscs = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", "eth0"],
                            capture_output=True, text=True).stdout
    assert "ingress" not in qdiscs


def test_a_missing_namespace_is_refused_before_a_vm_boots(cli: Cli) -> None:
    result = cli("run", "--netns", "/run/netns/pykata-no-such-namespace", "--", "true")
    assert result.returncode == 1 and "does not exist" in result.err, result.err


def test_a_container_reaches_a_server_beside_the_pod(pod_netns: Path, cli: Cli) -> None:
    """The guest takes the pod's address and routes: a container in the VM
    talks TCP to a server in the peer namespace (the test made both)."""
    peer = pod_netns.name.replace("pykata-pod-", "pykata-peer-")
    with greeting_server(peer) as server:
        result = cli("run", "--netns", str(pod_netns), "--", "sh", "-c",
                     f"ip -4 addr show eth0; ip route; nc {PEER_IP} 8080 </dev/null")
        assert result.returncode == 0, result.err
        assert f"inet {POD_IP}/24" in result.out, result.out
        assert f"hello {POD_IP}" in result.out, result.out  # the peer saw the pod's address
        assert server.wait(30) == 0


def test_a_namespace_already_mirrored_is_refused_and_the_first_vm_keeps_its_network(
        pod_netns: Path) -> None:
    """A second attach on a namespace another one holds (as a second VM on a
    podman pod's namespace would) fails without touching the first's taps
    and redirects, by the namespace's path or through a process in it."""
    ns = pod_netns.name
    first = tcfilter.scan(pod_netns)
    tcfilter.attach(pod_netns, first)
    member = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
    try:
        assert _answers_through_its_tap(first[0])
        for path in (pod_netns, Path(f"/proc/{member.pid}/ns/net")):
            second = tcfilter.scan(path)
            with pytest.raises(tcfilter.NetworkError) as refused:
                tcfilter.attach(path, second)
            # The first one's redirects are intact, and it still talks to the peer.
            assert "ingress" in _qdiscs(ns), f"{refused.value} removed the first's redirect"
            assert "ingress" in _qdiscs(ns, first[0].tap_name)
            assert _answers_through_its_tap(first[0])
            assert "already mirrored into a VM" in str(refused.value)
            assert "tap0_pykata" in str(refused.value)
            assert second[0].tap_fd == -1 and not second[0].own_qdiscs
            assert [n for n in _links(ns) if n.endswith("_pykata")] == ["tap0_pykata"]
    finally:
        member.kill()
        member.wait()
        tcfilter.detach(pod_netns, first)
    assert "tap0_pykata" not in _links(ns) and "ingress" not in _qdiscs(ns)


def test_an_interface_with_a_qdisc_it_did_not_add_is_refused_and_left_as_found(
        pod_netns: Path) -> None:
    """Someone else's ingress qdisc (and filter) on the pod's interface:
    refused before a tap is made, and the qdisc is still there after."""
    ns = pod_netns.name
    subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "ingress"], check=True)
    subprocess.run(["tc", "-n", ns, "filter", "add", "dev", "eth0", "parent", "ffff:",
                    "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred",
                    "egress", "mirror", "dev", "lo"],
                   check=True)
    endpoints = tcfilter.scan(pod_netns)
    try:
        with pytest.raises(Exception) as refused:  # its kind is checked below
            tcfilter.attach(pod_netns, endpoints)
        assert "ingress" in _qdiscs(ns), f"{refused.value!r} removed a qdisc it did not add"
        assert isinstance(refused.value, tcfilter.NetworkError), refused.value
        filters = subprocess.run(["tc", "-n", ns, "filter", "show", "dev", "eth0", "ingress"],
                                 capture_output=True, text=True).stdout
        assert "Egress Mirror to device lo" in filters
        assert "interface eth0 has an ingress qdisc" in str(refused.value)
        assert "pykata cleanup" in str(refused.value)
        assert not [n for n in _links(ns) if n.endswith("_pykata")]
    finally:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "ingress"])


def test_a_tap_name_in_use_is_blamed_on_the_vm_that_holds_it(pod_netns: Path) -> None:
    """Two opens of one tap name (the race the up-front checks leave): the
    second is told another VM holds the name, not that /dev/net/tun lacks."""
    def open_twice(_: object) -> None:
        fd = tcfilter._open_tap(pod_netns, "tap0_pykata")
        try:
            with pytest.raises(tcfilter.NetworkError) as taken:
                tcfilter._open_tap(pod_netns, "tap0_pykata")
            assert "tap name tap0_pykata is taken" in str(taken.value)
            assert "another VM mirrors this namespace" in str(taken.value)
            assert "/dev/net/tun" not in str(taken.value)
        finally:
            os.close(fd)

    tcfilter._in_netns(pod_netns, open_twice)
