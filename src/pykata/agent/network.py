"""The guest's network, as the host describes the pod's: interfaces by MAC,
their addresses and MTU, routes, and the neighbours the host knows.

Done with busybox's `ip` (already in the initrd) rather than a netlink
library: nothing more to import at boot, and these calls happen once per
sandbox. Neighbours, which busybox's `ip` cannot add, take one netlink
request of our own. Every value comes from the host and is checked before it reaches a
command line (argv, never a shell).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import re
import socket
import struct
from pathlib import Path

from pykata.agent.reaper import Reaper
from pykata.agent.spawn import run
from pykata.protocols import agent_pb2
from pykata.ttrpc import Code, StatusError

IP = "/sbin/ip"  # busybox applet link in the initrd
SYS_NET = Path("/sys/class/net")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


def _invalid(message: str) -> StatusError:
    return StatusError(Code.INVALID_ARGUMENT, message)


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise _invalid(f"invalid interface name {name!r}")
    return name


def _address(addr: agent_pb2.IPAddress) -> str:
    try:
        return str(ipaddress.ip_interface(f"{addr.address}/{addr.mask or 32}"))
    except ValueError:
        raise _invalid(f"invalid address {addr.address!r}/{addr.mask!r}") from None


def link_by_mac(mac: str) -> str:
    """The guest's interface with this MAC (the NIC the host made for it)."""
    mac = mac.lower()
    if not _MAC.fullmatch(mac):
        raise _invalid(f"invalid MAC {mac!r}")
    for entry in sorted(os.listdir(SYS_NET)):
        try:
            if (SYS_NET / entry / "address").read_text().strip() == mac:
                return entry
        except OSError:
            continue
    raise StatusError(Code.NOT_FOUND, f"no interface with MAC {mac} in the guest")


async def _ip(reaper: Reaper, *args: str) -> None:
    result = await run(reaper, [IP, *args])
    if result.code != 0:
        raise StatusError(Code.INTERNAL, f"ip {' '.join(args)}: {result.error_text()}")


def _link_for(iface: agent_pb2.Interface) -> tuple[str, bool]:
    """The link to configure, and whether its MAC must become the request's:
    the link with that MAC, else the one the request names as `device` (a
    VM restored from a template has the template's MACs)."""
    try:
        return link_by_mac(iface.hwAddr), False
    except StatusError as exc:
        if exc.code != Code.NOT_FOUND or not iface.device:
            raise
    device = _check_name(iface.device)
    if not (SYS_NET / device).is_dir():
        raise StatusError(Code.NOT_FOUND, f"no interface with MAC {iface.hwAddr.lower()} "
                                          f"or named {device} in the guest")
    return device, True


async def update_interface(reaper: Reaper, iface: agent_pb2.Interface) -> agent_pb2.Interface:
    current, set_mac = _link_for(iface)
    name = _check_name(iface.name or current)
    addresses = [_address(a) for a in iface.IPAddresses]
    if not 0 <= iface.mtu <= 65535:
        raise _invalid(f"invalid MTU {iface.mtu}")
    await _ip(reaper, "link", "set", "dev", current, "down")
    if set_mac:
        await _ip(reaper, "link", "set", "dev", current, "address", iface.hwAddr.lower())
    if name != current:
        await _ip(reaper, "link", "set", "dev", current, "name", name)
    if iface.mtu:
        await _ip(reaper, "link", "set", "dev", name, "mtu", str(iface.mtu))
    await _ip(reaper, "addr", "flush", "dev", name)
    for address in addresses:
        await _ip(reaper, "addr", "add", address, "dev", name)
    await _ip(reaper, "link", "set", "dev", name, "up")
    out = agent_pb2.Interface()
    out.CopyFrom(iface)
    out.name = name
    return out


async def update_routes(reaper: Reaper, routes: agent_pb2.Routes) -> agent_pb2.Routes:
    """Routes without a gateway first: a gateway must be reachable by a link
    route before a route through it can be added."""
    ordered = sorted(routes.Routes, key=lambda r: bool(r.gateway))
    for route in ordered:
        args = ["route", "replace"]
        if route.dest and route.dest != "default":
            try:
                args.append(str(ipaddress.ip_network(route.dest, strict=False)))
            except ValueError:
                raise _invalid(f"invalid route destination {route.dest!r}") from None
        else:
            args.append("default")
        if route.gateway:
            try:
                args += ["via", str(ipaddress.ip_address(route.gateway))]
            except ValueError:
                raise _invalid(f"invalid gateway {route.gateway!r}") from None
        if route.device:
            args += ["dev", _check_name(route.device)]
        if route.source:
            try:
                args += ["src", str(ipaddress.ip_address(route.source))]
            except ValueError:
                raise _invalid(f"invalid route source {route.source!r}") from None
        if route.scope:
            args += ["scope", str(route.scope)]
        await _ip(reaper, *args)
    return routes


async def add_neighbors(reaper: Reaper, neighbors: agent_pb2.ARPNeighbors) -> None:
    """Permanent neighbour entries, by netlink: busybox's `ip neigh` only
    shows and flushes."""
    for neighbor in neighbors.ARPNeighbors:
        try:
            to = ipaddress.ip_address(neighbor.toIPAddress.address)
        except ValueError:
            raise _invalid(f"invalid neighbour {neighbor.toIPAddress.address!r}") from None
        mac = neighbor.lladdr.lower()
        if not _MAC.fullmatch(mac):
            raise _invalid(f"invalid neighbour MAC {neighbor.lladdr!r}")
        device = _check_name(neighbor.device)
        try:
            index = int((SYS_NET / device / "ifindex").read_text())
        except (OSError, ValueError):
            raise StatusError(Code.NOT_FOUND, f"no interface {device} in the guest") from None
        try:
            replace_neighbor(index, to, bytes.fromhex(mac.replace(":", "")))
        except OSError as exc:
            raise StatusError(Code.INTERNAL, f"neighbour {to} on {device}: "
                                             f"{exc.strerror}") from None


RTM_NEWNEIGH = 28
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80


def _attribute(kind: int, data: bytes) -> bytes:
    header = struct.pack("HH", 4 + len(data), kind)
    return header + data + b"\0" * (-len(data) % 4)


def replace_neighbor(index: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     mac: bytes) -> None:
    """`ip neigh replace ADDRESS lladdr MAC dev INDEX nud permanent`, as one
    RTM_NEWNEIGH request; raises OSError with the kernel's answer."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    body = struct.pack("BBHiHBB", family, 0, 0, index, NUD_PERMANENT, 0, 0)
    body += _attribute(NDA_DST, address.packed) + _attribute(NDA_LLADDR, mac)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE
    message = struct.pack("IHHII", 16 + len(body), RTM_NEWNEIGH, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5)
        sock.sendto(message, (0, 0))
        answer = sock.recv(65536)
    _, kind = struct.unpack_from("IH", answer)
    if kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, "unexpected netlink answer")
    (error,) = struct.unpack_from("i", answer, 16)
    if error:
        raise OSError(-error, os.strerror(-error))


def list_interfaces() -> agent_pb2.Interfaces:
    out = agent_pb2.Interfaces()
    for entry in sorted(os.listdir(SYS_NET)):
        iface = out.Interfaces.add(name=entry, device=entry)
        try:
            iface.hwAddr = (SYS_NET / entry / "address").read_text().strip()
            iface.mtu = int((SYS_NET / entry / "mtu").read_text())
        except (OSError, ValueError):
            continue
    return out


async def list_routes(reaper: Reaper) -> agent_pb2.Routes:
    """The guest's IPv4 routes, from `ip route` (dest [via gw] dev name ...)."""
    result = await run(reaper, [IP, "-4", "route", "show"])
    if result.code != 0:
        raise StatusError(Code.INTERNAL, f"ip route: {result.error_text()}")
    out = agent_pb2.Routes()
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        words = line.split()
        if not words:
            continue
        route = out.Routes.add(dest="" if words[0] == "default" else words[0])
        for key, value in itertools.pairwise(words):
            if key == "via":
                route.gateway = value
            elif key == "dev":
                route.device = value
            elif key == "src":
                route.source = value
    return out
