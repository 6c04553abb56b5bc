"""A pod's network as a sandbox resource: the interfaces of its network
namespace mirrored into its VM (the tcfilter model, `network.tcfilter`).

Before the VM boots: the namespace is scanned (one the VM cannot mirror is
refused before anything is made), each interface gets a tap with tc
redirects both ways, and the VM gets a NIC per tap with the interface's
MAC. Once the agent answers: the guest's interfaces get their addresses and
MTU, then the routes and the neighbours. The redirects are recorded in the
sandbox's saved state, so a dead owner's are removed by `pykata cleanup`
and the shim's `delete`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

from pykata.hypervisor.base import NetworkInterface
from pykata.network import tcfilter
from pykata.protocols import agent_pb2
from pykata.runtime.agent_client import AgentClient


def template_mac(index: int) -> str:
    """The MAC of a template VM's NIC `index`: every clone resumes with it,
    and its guest link is then given the pod interface's MAC."""
    return f"02:70:6b:74:00:{index:02x}"


class PodNetwork:
    """The mirrored interfaces of the namespace at `netns` ("" for none)."""

    def __init__(self, netns: str, *, vhost: bool) -> None:
        self.netns = netns
        self._vhost = vhost
        self.endpoints: list[tcfilter.Endpoint] = []
        # What `prepare` made, as the saved state records it (name: index).
        self.mirrored: dict[str, int] = {}

    @property
    def wanted(self) -> bool:
        return bool(self.netns)

    async def check(self) -> None:
        """Find the interfaces to mirror; refuse, before anything is made, a
        namespace the VM cannot mirror. Netlink work runs on threads that
        enter the namespace."""
        if self.netns:
            self.endpoints = await asyncio.to_thread(tcfilter.scan, Path(self.netns))

    async def prepare(self) -> None:
        if not self.endpoints:
            return
        await asyncio.to_thread(tcfilter.attach, Path(self.netns), self.endpoints)
        self.mirrored = {e.name: e.index for e in self.endpoints}
        if self._vhost:
            tcfilter.open_vhost(self.endpoints)

    def devices(self) -> Sequence[NetworkInterface]:
        return [NetworkInterface(e.tap_fd, e.mac, e.mtu, e.vhost_fd) for e in self.endpoints]

    def storages(self) -> Sequence[agent_pb2.Storage]:
        return []

    def close_taps(self) -> None:
        """QEMU holds its own copies now: a tap lives exactly as long as it."""
        tcfilter.close_taps(self.endpoints)

    async def setup_guest(self, agent: AgentClient, boot: str) -> None:
        """Give the guest the pod's addresses, MTU, routes and neighbours, on
        the NICs that carry the pod interfaces' MACs."""
        if not self.endpoints:
            return
        # A clone's links still carry the template's MACs: each is named by
        # its template MAC's link and gets the pod interface's MAC.
        guest_links = await agent.interface_names_by_mac() if boot == "template" else {}
        for i, e in enumerate(self.endpoints):
            await agent.update_interface(agent_pb2.Interface(
                device=guest_links.get(template_mac(i), ""),
                name=e.name, hwAddr=e.mac, mtu=e.mtu, IPAddresses=[
                    agent_pb2.IPAddress(family=_family(a.family), address=a.address,
                                        mask=str(a.prefix_len))
                    for a in e.addresses if not a.address.startswith("fe80")]))
        routes, neighbors = await asyncio.to_thread(
            tcfilter.scan_routes_and_neighbors, Path(self.netns), self.endpoints)
        await agent.update_routes([agent_pb2.Route(
            dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
            family=_family(r.family)) for r in routes])
        if neighbors:
            await agent.add_arp_neighbors([agent_pb2.ARPNeighbor(
                toIPAddress=agent_pb2.IPAddress(family=_family(n.family), address=n.address),
                device=n.device, lladdr=n.mac, state=tcfilter.NUD_PERMANENT)
                for n in neighbors])

    def release(self) -> None:
        """Close this process's tap descriptors. The redirects go with the
        sandbox's host state, by its record (`cleanup_host_state`), the one
        path dead owners take too."""
        self.close_taps()
        self.endpoints = []


def _family(family: int) -> agent_pb2.IPFamily.ValueType:
    """The agent API's address family for a socket one."""
    return agent_pb2.v6 if family == socket.AF_INET6 else agent_pb2.v4
