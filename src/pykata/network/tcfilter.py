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

One VM per namespace: the redirect steals the interface's traffic, so a
second VM could only take it from the first. `attach` refuses a namespace
that already has pykata's taps or an ingress qdisc on an interface it would
mirror, and its undo removes only what it added itself: a qdisc it found
belongs to someone else (another VM's redirect, most likely).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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
# The parent of an ingress (or clsact) qdisc: one per interface.
TC_H_INGRESS = 0xFFFFFFF1
TAP_SUFFIX = "_pykata"
# Kinds of interface the VM can mirror: what CNI plugins put in a pod.
T = TypeVar("T")
MIRRORED_KINDS = frozenset({"veth", "macvlan", "macvtap", "ipvlan", "tap", "tun", ""})


@dataclass(frozen=True)
class Address:
    address: str
    prefix_len: int
    family: int


@dataclass(frozen=True)
class NetnsId:
    """A network namespace as the kernel knows it (its nsfs file's device and
    inode): the same for every path that reaches it (/run/netns/NAME,
    /proc/PID/ns/net), and never another live namespace's."""

    dev: int
    ino: int


def netns_identity(path: Path) -> NetnsId:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NetworkError(f"network namespace {path} does not exist",
                           hint="pass the path of a namespace (e.g. /run/netns/NAME)") from None
    except OSError as exc:
        raise NetworkError(f"cannot read network namespace {path}: {exc.strerror}") from exc
    return NetnsId(st.st_dev, st.st_ino)


class NamespaceChanged(NetworkError):
    """The path no longer leads to the namespace it was checked or recorded as."""


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
    # The interfaces (name: index) whose ingress qdisc `attach` added for
    # this endpoint, one per direction: all its undo may remove.
    own_qdiscs: dict[str, int] = field(default_factory=dict)


def _in_netns(path: Path, work: Callable[[Any], T], expect: NetnsId | None = None) -> T:
    """`work(ipr)` with a netlink socket of the namespace at `path` (which
    must be `expect`, when given: see `_enter`).

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
            _enter(path, expect)
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


def _enter(path: Path, expect: NetnsId | None) -> None:
    """Move this thread into the namespace at `path`. With `expect`, the
    descriptor entered is checked, not the path: a path recreated since it
    was checked (or a /proc/PID whose process is gone and whose pid was
    reused) must not make pykata work in another namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(ns_fd)
        if expect is not None and NetnsId(st.st_dev, st.st_ino) != expect:
            raise NamespaceChanged(
                f"{path} is no longer the network namespace pykata checked or recorded",
                hint="it was removed and made again, or its process ended")
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


def _open_tap(path: Path, name: str) -> int:
    """Create tap `name` and return its descriptor (for QEMU's `-netdev
    tap,fd=N`). A tap belongs to the namespace of the thread that opens it:
    called on the thread `_in_netns` moved into the pod's namespace."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open /dev/net/tun: {exc.strerror}",
                           hint="the host needs the tun driver (modprobe tun)") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(
            "16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            # A tap of that name exists and a process holds it: another VM's.
            raise NetworkError(
                f"tap name {name} is taken in {path}: another VM mirrors this namespace",
                hint=_ONE_VM) from exc
        if exc.errno == errno.EINVAL:
            raise NetworkError(
                f"cannot create tap {name} in {path}: an interface of that name exists "
                "and is not a tap", hint="remove or rename it") from exc
        raise NetworkError(f"cannot create tap {name} in {path}: {exc.strerror}") from exc
    return fd


_ONE_VM = ("a VM's network cannot be joined by another VM: give this pod a network "
           "namespace of its own")


def _refuse_if_mirrored(ns: Any, path: Path, endpoints: list[Endpoint]) -> None:
    """Refuse, before anything is made, a namespace that holds pykata's taps
    (another VM mirrors it) or whose interfaces already have an ingress
    qdisc (their traffic goes elsewhere: another VM's redirect, or a tool
    of the host's that attaching would break)."""
    for link in ns.get_links():
        name = link.get_attr("IFLA_IFNAME") or ""
        if name.endswith(TAP_SUFFIX):
            raise NetworkError(
                f"{path} is already mirrored into a VM: it holds interface {name}, "
                "a name pykata gives its taps", hint=_ONE_VM)
    names = {e.index: e.name for e in endpoints}
    for qdisc in ns.tc("dump"):
        if qdisc["index"] in names and qdisc["parent"] == TC_H_INGRESS:
            raise NetworkError(
                f"{path} is already mirrored into a VM, or its traffic redirected: "
                f"interface {names[qdisc['index']]} has an ingress qdisc "
                f"({qdisc.get_attr('TCA_KIND')})",
                hint=f"{_ONE_VM}; if a pykata sandbox whose owner died left it, "
                     "`pykata cleanup` removes it")


def _redirect(ns: Any, path: Path, endpoint: Endpoint, source: tuple[str, int],
              target: tuple[str, int]) -> None:
    """Send everything `source` (name, index) receives out of `target`."""
    try:
        ns.tc("add", "ingress", source[1], INGRESS)
    except Exception as exc:  # pyroute2's NetlinkError: EEXIST when raced
        raise NetworkError(
            f"cannot add an ingress qdisc to {source[0]} in {path}: {exc}",
            hint=f"another VM may have started mirroring it just now; {_ONE_VM}") from exc
    endpoint.own_qdiscs[source[0]] = source[1]
    try:
        ns.tc("add-filter", "u32", source[1], parent=INGRESS, protocol=ETH_P_ALL,
              target=0x10001, keys=["0x0/0x0+0"],
              action=[{"kind": "mirred", "direction": "egress",
                       "action": "redirect", "ifindex": target[1]}])
    except Exception as exc:
        raise NetworkError(
            f"cannot redirect {source[0]} to {target[0]} in {path}: {exc}") from exc


def attach(path: Path, endpoints: list[Endpoint], expect: NetnsId | None = None) -> None:
    """Give each endpoint its tap and the redirects both ways, in one visit
    of the namespace (`expect`, when given); a namespace already mirrored is
    refused first. On failure, undo exactly what was done: the taps opened
    close, the qdiscs added go, a qdisc found stays."""
    def work(ns: Any) -> None:
        _refuse_if_mirrored(ns, path, endpoints)
        for i, endpoint in enumerate(endpoints):
            endpoint.tap_name = f"tap{i}{TAP_SUFFIX}"
            endpoint.tap_fd = _open_tap(path, endpoint.tap_name)
        for endpoint in endpoints:
            endpoint.tap_index = ns.link_lookup(ifname=endpoint.tap_name)[0]
            ns.link("set", index=endpoint.tap_index, mtu=endpoint.mtu, state="up")
            pod, tap = (endpoint.name, endpoint.index), (endpoint.tap_name, endpoint.tap_index)
            _redirect(ns, path, endpoint, pod, tap)
            _redirect(ns, path, endpoint, tap, pod)

    try:
        _in_netns(path, work, expect)
    except BaseException:
        detach(path, endpoints, expect)
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


def detach(path: Path, endpoints: list[Endpoint], expect: NetnsId | None = None) -> None:
    """Remove the ingress qdiscs `attach` added for `endpoints` (their
    filters go with them) and close the taps (which removes them). Safe to
    repeat: what is removed is forgotten, never removed twice."""
    own: dict[str, int] = {}
    for endpoint in endpoints:
        own.update(endpoint.own_qdiscs)
        endpoint.own_qdiscs.clear()
    try:
        detach_recorded(path, own, expect)
    finally:
        close_taps(endpoints)


def detach_recorded(path: Path, mirrored: dict[str, int], expect: NetnsId | None = None
                    ) -> None:
    """Remove the ingress qdiscs of the interfaces `mirrored` names (name:
    index), as a live sandbox knows them or a dead one's state recorded them.
    One whose index now has another name is not pykata's and is left alone;
    a qdisc already gone (never added, or the interface left) is fine, and
    so is a namespace that is no longer `expect` (the one recorded went, its
    qdiscs with it)."""
    def work(ns: Any) -> None:
        for name, index in mirrored.items():
            if index not in ns.link_lookup(ifname=name):
                continue
            with contextlib.suppress(Exception):
                ns.tc("del", "ingress", index, INGRESS)

    if mirrored and path.exists():
        with contextlib.suppress(NamespaceChanged):
            _in_netns(path, work, expect)


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
