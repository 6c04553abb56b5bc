"""What a pod gives its guest, each as a resource: made on the host, given
to the VM, released after.

A sandbox's resources (`SandboxResource`: its shared filesystem, its
network) are prepared before the VM boots, and the VM is made with their
devices (`microvm` has no hot-plug: every device exists at boot, see
`Sandbox.vm_config`); once the agent
answers they set themselves up in the guest; teardown releases them in
reverse, and what a dead owner left is removed from the sandbox's saved
state (`cleanup_host_state`). A container's resources (its rootfs, its
volumes) are prepared when it is created and attached to its spec (the
guest path crun finds them at); they go when the container is deleted.
Each removes only what it made, so a start that fails part-way leaves
nothing behind and takes nobody else's state along.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pykata.channels import SHARED_FS_TAG
from pykata.host.mounts import Mount
from pykata.protocols import agent_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.paths import GUEST_SHARED_DIR
from pykata.runtime.share import ContainerShare, SandboxShare
from pykata.runtime.volumes import Volume

# 9p options in the guest: a larger msize moves more per round trip, and
# cache=mmap lets programs mmap their files shared (needed by some loaders).
NINEP_OPTIONS = ("trans=virtio", "version=9p2000.L", "msize=524288", "cache=mmap")


class SandboxResource(Protocol):
    async def prepare(self) -> None:
        """Make it on the host, before the VM boots."""

    def storages(self) -> Sequence[agent_pb2.Storage]:
        """What the agent mounts for it at CreateSandbox."""

    async def setup_guest(self, agent: AgentClient, boot: str) -> None:
        """Set it up in the guest once the sandbox exists there (`boot`:
        how the VM started; a restored one still has its template's MACs)."""

    def release(self) -> None:
        """Undo `prepare` (only what it made); safe to repeat."""


class SharedFilesystem:
    """The sandbox's export, over 9p or virtio-fs (`kind`, `runtime.fs_choice`):
    a VM device, and a storage the agent mounts at GUEST_SHARED_DIR when the
    sandbox is created."""

    def __init__(self, share: SandboxShare, kind: str = "virtio-9p") -> None:
        self.share = share
        self.kind = kind

    def use(self, kind: str) -> None:
        """Serve the export over `kind` (before `prepare`)."""
        self.kind = kind
        self.share.for_virtio_fs = kind == "virtio-fs"

    async def prepare(self) -> None:
        self.share.prepare()

    def storages(self) -> Sequence[agent_pb2.Storage]:
        if self.kind == "virtio-fs":
            return [agent_pb2.Storage(driver="virtio-fs", source=SHARED_FS_TAG,
                                      fstype="virtiofs", mount_point=GUEST_SHARED_DIR)]
        return [agent_pb2.Storage(driver="9p", source=SHARED_FS_TAG, fstype="9p",
                                  options=list(NINEP_OPTIONS), mount_point=GUEST_SHARED_DIR)]

    async def setup_guest(self, agent: AgentClient, boot: str) -> None:
        pass  # mounted by CreateSandbox (`storages`)

    def release(self) -> None:
        # Its mounts live under the sandbox's directory, which the sandbox's
        # teardown unmounts and removes as a whole (cleanup_host_state).
        pass


class ContainerRootfs:
    """A container's root filesystem, mounted where the guest finds it."""

    def __init__(self, share: ContainerShare, mounts: Sequence[Mount], *,
                 readonly: bool) -> None:
        self.share = share
        self.mounts = mounts
        self.readonly = readonly

    def prepare(self) -> None:
        if not self.share.created:
            self.share.create()
        self.share.mount_rootfs(self.mounts, readonly=self.readonly)

    @staticmethod
    def attach_path(spec: dict[str, Any], guest_path: str) -> None:
        """Point the spec the guest gets at where the rootfs appears there."""
        spec.setdefault("root", {})["path"] = guest_path

    def release(self) -> None:
        self.share.remove()


class ContainerVolume:
    """A host path a container's spec binds in (`mounts[index]`)."""

    def __init__(self, share: ContainerShare, index: int, volume: Volume,
                 guest_dir: str) -> None:
        self.share = share
        self.index = index
        self.volume = volume
        self.guest_dir = guest_dir  # the export, as the guest mounts it
        self.guest_path = ""

    @property
    def source(self) -> Path:
        return self.volume.source

    def prepare(self) -> None:
        # The pod's mount of the host path, shared with its other
        # containers that bind it alike (runtime.share).
        self.guest_path = f"{self.guest_dir}/{self.share.add_volume(self.volume)}"

    def attach(self, mounts: Any) -> None:
        mounts[self.index].source = self.guest_path

    def release(self) -> None:
        # Unmounted with the container's share (ContainerShare.remove).
        pass
