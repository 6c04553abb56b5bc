"""The tcfilter model: each interface of a pod's network namespace is joined
to a tap in the same namespace, traffic redirected both ways by tc.

For an interface (a veth CNI made, say) the host creates a tap in the pod's
namespace with the interface's MTU, adds an ingress qdisc to both, and a u32
match-all filter with `mirred egress redirect` from each to the other. QEMU
gets the tap as a descriptor; the guest's NIC gets the interface's MAC, so
the pod's address and MAC are the guest's.

The tap is not persistent: it lives as long as a descriptor to it is open
(QEMU's), so a VM that dies takes its taps along. `detach` removes the
qdiscs (and with them the filters) from the pod's interfaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pykata.errors import HostError, NetworkError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
INGRESS = "ffff:"
# Kinds of interface the VM can mirror: what CNI plugins put in a pod.
T = TypeVar("T")
MIRRORED_KINDS = frozenset({"veth", "macvlan", "macvtap", "ipvlan", "tap", "tun", ""})


@dataclass(frozen=True)
class Address:
    address: str
    prefix_len: int
    family: int


@dataclass
class Endpoint:
    """One pod interface and the tap that stands for it."""

    name: str
    index: int
    mac: str
    mtu: int
    addresses: list[Address] = field(default_factory=list)
    tap_name: str = ""
    tap_index: int = 0
    tap_fd: int = -1
    vhost_fd: int = -1


def _in_netns(path: Path, work: Callable[[Any], T]) -> T:
    """`work(ipr)` with a netlink socket of the namespace at `path`.

    A thread of its own enters the namespace (a namespace is per thread) and
    opens the socket there. Not pyroute2's NetNS: it forks a helper, and a
    forked child of a process with asyncio signal handlers writes the
    signals it gets into the parent's wake-up descriptor, so the parent sees
    a SIGTERM nobody sent it."""
    if not path.exists():
        raise NetworkError(f"network namespace {path} does not exist",
                           hint="pass the path of a namespace (e.g. /run/netns/NAME)")
    result: list[Any] = []

    def run() -> None:
        from pyroute2 import IPRoute

        try:
            _enter(path)
            ipr = IPRoute()
            try:
                result.append((True, work(ipr)))
            finally:
                ipr.close()
        except BaseException as exc:
            result.append((False, exc))

    # The thread ends in the pod's namespace; it is never reused.
    thread = threading.Thread(target=run, name="netns")
    thread.start()
    thread.join()
    if not result:
        raise HostError(f"working in {path} failed")
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _enter(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise HostError(f"cannot enter {path}: {os.strerror(err)}")
    finally:
        os.close(ns_fd)


def scan(path: Path) -> list[Endpoint]:
    """The interfaces of the namespace at `path` the VM mirrors: every one
    with an address, loopback excepted. An interface of a kind the VM cannot
    mirror (a bridge, a vxlan, ...) is refused, naming it."""

    def work(ns: Any) -> list[Endpoint]:
        addresses: dict[int, list[Address]] = {}
        for msg in ns.get_addr():
            addresses.setdefault(msg["index"], []).append(
                Address(msg.get_attr("IFA_ADDRESS"), msg["prefixlen"], msg["family"]))
        found = []
        for link in ns.get_links():
            name = link.get_attr("IFLA_IFNAME")
            index = link["index"]
            if name == "lo" or index not in addresses:
                continue
            info = link.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info else "") or ""
            if kind not in MIRRORED_KINDS:
                raise NetworkError(
                    f"interface {name} in {path} is a {kind}, which pykata cannot mirror "
                    "into a VM", hint="give the pod veth, macvlan or ipvlan interfaces")
            found.append(Endpoint(name, index, link.get_attr("IFLA_ADDRESS"),
                                  link.get_attr("IFLA_MTU"), addresses[index]))
        return found

    return _in_netns(path, work)


def _open_tap(name: str) -> int:
    """Create tap `name` and return its descriptor (for QEMU's `-netdev
    tap,fd=N`). A tap belongs to the namespace of the thread that opens it:
    called on the thread `_in_netns` moved into the pod's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(
            "16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd


def attach(path: Path, endpoints: list[Endpoint]) -> None:
    """Give each endpoint its tap and the redirects both ways, in one visit
    of the namespace; on failure, undo what was done (taps close, qdiscs go)."""
    def work(ns: Any) -> None:
        for i, endpoint in enumerate(endpoints):
            endpoint.tap_name = f"tap{i}_pykata"
            try:
                endpoint.tap_fd = _open_tap(endpoint.tap_name)
            except OSError as exc:
                raise NetworkError(f"cannot create tap {endpoint.tap_name} in {path}: "
                                   f"{exc.strerror}", hint="the host needs /dev/net/tun") from exc
        for endpoint in endpoints:
            endpoint.tap_index = ns.link_lookup(ifname=endpoint.tap_name)[0]
            ns.link("set", index=endpoint.tap_index, mtu=endpoint.mtu, state="up")
            for source, target in ((endpoint.index, endpoint.tap_index),
                                   (endpoint.tap_index, endpoint.index)):
                ns.tc("add", "ingress", source, INGRESS)
                ns.tc("add-filter", "u32", source, parent=INGRESS, protocol=ETH_P_ALL,
                      target=0x10001, keys=["0x0/0x0+0"],
                      action=[{"kind": "mirred", "direction": "egress",
                               "action": "redirect", "ifindex": target}])

    try:
        _in_netns(path, work)
    except BaseException:
        detach(path, endpoints)
        raise


VHOST_NET = Path("/dev/vhost-net")


def open_vhost(endpoints: list[Endpoint]) -> None:
    """An open /dev/vhost-net per endpoint, for the kernel's datapath; none
    (QEMU's datapath) on a host without it."""
    if not VHOST_NET.exists():
        return
    for endpoint in endpoints:
        try:
            endpoint.vhost_fd = os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(f"cannot open {VHOST_NET}: {exc.strerror}",
                               hint="set disable_vhost_net = true in [hypervisor.qemu]"
                               ) from exc


def close_taps(endpoints: list[Endpoint]) -> None:
    """Close this process's descriptors of the taps and vhost devices (once
    QEMU has its own)."""
    for endpoint in endpoints:
        for name in ("tap_fd", "vhost_fd"):
            fd = getattr(endpoint, name)
            if fd >= 0:
                os.close(fd)
                setattr(endpoint, name, -1)


def detach(path: Path, endpoints: list[Endpoint]) -> None:
    """Remove the pod interfaces' ingress qdiscs (their filters go with them)
    and close the taps (which removes them). Safe to repeat."""
    try:
        detach_recorded(path, {e.name: e.index for e in endpoints})
    finally:
        close_taps(endpoints)


def detach_recorded(path: Path, mirrored: dict[str, int]) -> None:
    """Remove the ingress qdiscs of the interfaces `mirrored` names (name:
    index), as a live sandbox knows them or a dead one's state recorded them.
    One whose index now has another name is not pykata's and is left alone;
    a qdisc already gone (never added, or the interface left) is fine."""
    def work(ns: Any) -> None:
        for name, index in mirrored.items():
            if index not in ns.link_lookup(ifname=name):
                continue
            with contextlib.suppress(Exception):
                ns.tc("del", "ingress", index, INGRESS)

    if path.exists():
        _in_netns(path, work)


@dataclass(frozen=True)
class RouteInfo:
    dest: str  # "" for the default route
    gateway: str
    device: str
    source: str
    scope: int
    family: int


def _routes(ns: Any, names: dict[int, str]) -> list[RouteInfo]:
    """The main table's routes through the mirrored interfaces (index: name)."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ns.get_routes(family=family, table=254):
            oif = msg.get_attr("RTA_OIF")
            if oif not in names:
                continue
            dst = msg.get_attr("RTA_DST")
            if family == socket.AF_INET6 and dst and dst.startswith("fe80"):
                continue  # the guest's kernel makes its own link-local routes
            found.append(RouteInfo(
                dest=f"{dst}/{msg['dst_len']}" if dst else "",
                gateway=msg.get_attr("RTA_GATEWAY") or "",
                device=names[oif], source=msg.get_attr("RTA_PREFSRC") or "",
                scope=msg["scope"], family=family))
    return found


NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NUD_FAILED = 0x20
NUD_INCOMPLETE = 0x01


@dataclass(frozen=True)
class NeighborInfo:
    address: str
    mac: str
    device: str
    family: int


def _neighbors(ns: Any, names: dict[int, str], gateways: set[str]) -> list[NeighborInfo]:
    """The neighbours the guest is given as permanent entries: the pod
    namespace's permanent ones (a CNI plugin may set them so the pod never
    has to ask), and the gateways' when the namespace already knows their MAC."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ns.get_neighbours(family=family):
            device = names.get(msg["ifindex"])
            address = msg.get_attr("NDA_DST")
            mac = msg.get_attr("NDA_LLADDR")
            if device is None or not address or not mac:
                continue
            state = msg["state"]
            if state & (NUD_FAILED | NUD_INCOMPLETE | NUD_NOARP):
                continue
            if state & NUD_PERMANENT or address in gateways:
                found.append(NeighborInfo(address, mac, device, family))
    return found


def scan_routes_and_neighbors(path: Path, endpoints: list[Endpoint]
                              ) -> tuple[list[RouteInfo], list[NeighborInfo]]:
    """What the guest is told besides its addresses, in one visit of the
    namespace: the routes through the mirrored interfaces, and the neighbours
    (see `_neighbors`) on them."""
    names = {e.index: e.name for e in endpoints}

    def work(ns: Any) -> tuple[list[RouteInfo], list[NeighborInfo]]:
        routes = _routes(ns, names)
        return routes, _neighbors(ns, names, {r.gateway for r in routes if r.gateway})

    return _in_netns(path, work)
