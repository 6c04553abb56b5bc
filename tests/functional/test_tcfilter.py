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
