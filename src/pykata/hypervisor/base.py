"""What the runtime needs of a hypervisor, and the devices a VM is made of.

The sandbox speaks to a `Hypervisor`; QEMU (`hypervisor.qemu`) is the one
that exists. A VM's devices are a list of the kinds below, so a new kind of
device (network interfaces, next) is one new entry here and its rendering in
each hypervisor, not a new field threaded through the sandbox.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pykata.channels import SHARED_FS_TAG


@dataclass(frozen=True)
class AgentChannel:
    """How the host reaches the agent: AF_VSOCK to `vsock_cid`, or (0) a
    virtio-serial port on a socketpair the hypervisor inherits."""

    vsock_cid: int = 0


@dataclass(frozen=True)
class SharedDirectory:
    """A host directory the guest mounts by `tag`, over `kind`: "virtio-9p"
    (the hypervisor serves it) or "virtio-fs" (a virtiofsd process does)."""

    path: Path
    tag: str = SHARED_FS_TAG
    kind: str = "virtio-9p"


@dataclass(frozen=True)
class Console:
    """The guest's serial console, kept on the host up to `limit` bytes."""

    limit: int


@dataclass(frozen=True)
class NetworkInterface:
    """A virtio NIC on a tap the host opened (`tap_fd`, inherited by the
    hypervisor); the guest's NIC gets `mac`, the pod interface's own."""

    tap_fd: int
    mac: str
    mtu: int = 1500
    # An open /dev/vhost-net for the NIC's kernel datapath; -1 for QEMU's.
    vhost_fd: int = -1


@dataclass(frozen=True)
class EntropySource:
    """A virtio RNG: the guest's getrandom() must not block at boot."""


@dataclass(frozen=True)
class FreePageReporting:
    """A virtio balloon that never inflates: the guest reports the pages it
    frees, and the host drops them from the VM's memory (they cost nothing
    until the guest touches them again)."""


Device = (AgentChannel | SharedDirectory | Console | EntropySource | NetworkInterface
          | FreePageReporting)


class Hypervisor(Protocol):
    """One VM, started once and stopped once."""

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    # The host's end of the agent channel when it is not vsock.
    agent_socket: socket.socket | None

    async def start(self) -> None: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float = ...) -> None: ...

    async def kill(self) -> None: ...

    def failure_report(self, lines: int = ...) -> str: ...

    def moved_to(self, run_dir: Path) -> None:
        """Its directory (logs, share) was renamed to `run_dir`."""
