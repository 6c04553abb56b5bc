"""A pod's network as a sandbox resource: the interfaces of its network
namespace mirrored into its VM (the tcfilter model, `network.tcfilter`).

Before the VM boots: the namespace is scanned (one the VM cannot mirror is
refused before anything is made), each interface gets a tap with tc
redirects both ways, and the VM gets a NIC per tap with the interface's
MAC. Once the agent answers: the guest's interfaces get their addresses and
MTU, then the routes and the neighbours. The redirects are recorded in the
sandbox's saved state once they exist (never before: a start that failed
made none to undo, and must not undo another's), so a dead owner's are
removed by `pykata cleanup` and the shim's `delete`.

A namespace serves one VM: a second could only cut the first off. One that
a live sandbox under the same run root mirrors (by the namespace's
identity: /run/netns/NAME and /proc/PID/ns/net are one namespace) is
refused before anything is made, naming that sandbox (`runtime.mirrors`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pykata.errors import NetworkError
from pykata.hypervisor.base import NetworkInterface
from pykata.network import tcfilter
from pykata.protocols import agent_pb2
from pykata.runtime import mirrors
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.state import SandboxState

log = logging.getLogger(__name__)
T = TypeVar("T")


def template_mac(index: int) -> str:
    """The MAC of a template VM's NIC `index`: every clone resumes with it,
    and its guest link is then given the pod interface's MAC."""
    return f"02:70:6b:74:00:{index:02x}"


class PodNetwork:
    """The mirrored interfaces of the namespace at `netns` ("" for none), for
    the sandbox keyed `key` under the run root's `sandboxes` directory.
    `record` saves the sandbox's state: called under the mirror lock once
    the redirects exist."""

    def __init__(self, netns: str, *, vhost: bool, sandboxes: Path, key: str,
                 record: Callable[[], None], live: Callable[[SandboxState], bool]) -> None:
        self.netns = netns
        self._vhost = vhost
        self._sandboxes = sandboxes
        self._key = key
        self._record = record
        self._live = live
        self.endpoints: list[tcfilter.Endpoint] = []
        self.identity: tcfilter.NetnsId | None = None
        # Whether this sandbox's taps and redirects exist: the state records
        # them (`mirrored`, the namespace and its identity) only then.
        self.mirroring = False

    @property
    def wanted(self) -> bool:
        return bool(self.netns)

    @property
    def mirrored(self) -> dict[str, int]:
        return {e.name: e.index for e in self.endpoints} if self.mirroring else {}

    async def check(self) -> None:
        """Find the interfaces to mirror; refuse, before anything is made, a
        namespace another VM mirrors or the VM cannot mirror. Netlink work
        runs on threads that enter the namespace."""
        if not self.netns:
            return
        self.identity = tcfilter.netns_identity(Path(self.netns))
        self._refuse_if_mirrored()
        self.endpoints = await asyncio.to_thread(tcfilter.scan, Path(self.netns))

    def _refuse_if_mirrored(self) -> None:
        """Refuse the namespace if a live sandbox mirrors it (a dead one's
        leftover redirects are refused by tcfilter, which names `pykata
        cleanup`)."""
        assert self.identity is not None
        others = (s for s in mirrors.sandbox_states(self._sandboxes) if s.key != self._key)
        for holder in mirrors.holders(self.identity, others):
            if self._live(holder):
                raise NetworkError(
                    f"network namespace {self.netns} is already mirrored into the VM of "
                    f"sandbox {holder.id} ({holder.front_end}, owner pid {holder.owner_pid}, "
                    f"as {holder.netns}): a VM's network cannot be joined by another VM",
                    hint="give this pod a network namespace of its own; containers that "
                         f"must share that network belong in the pod of {holder.id}")

    async def prepare(self) -> None:
        if not self.endpoints:
            return
        await _to_the_end(asyncio.to_thread(self._mirror))
        if self._vhost:
            tcfilter.open_vhost(self.endpoints)

    def _mirror(self) -> None:
        """Attach the taps and redirects and record them, under the run
        root's mirror lock (blocking: run on a thread). The namespace is
        checked again under the lock: another start may have taken it since."""
        path = Path(self.netns)
        with mirrors.exclusive(self._sandboxes):
            self._refuse_if_mirrored()
            tcfilter.attach(path, self.endpoints, self.identity)
            self.mirroring = True
            try:
                self._record()
            except BaseException:
                # Unrecorded, they would outlive this sandbox: undo now.
                self.mirroring = False
                tcfilter.detach(path, self.endpoints, self.identity)
                raise

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
        self.mirroring = False


async def _to_the_end(work: Awaitable[T]) -> T:
    """`work`'s result, awaited to its end even if this task is cancelled
    meanwhile (the cancellation is raised after it). For a thread that
    changes host state: it cannot be stopped half-way, and the teardown that
    follows a cancellation must find what it made recorded."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if task.exception() is not None:  # undone by the thread itself
            log.info("cancelled while it failed: %s", task.exception())
        raise asyncio.CancelledError
    return task.result()


def _family(family: int) -> agent_pb2.IPFamily.ValueType:
    """The agent API's address family for a socket one."""
    return agent_pb2.v6 if family == socket.AF_INET6 else agent_pb2.v4
