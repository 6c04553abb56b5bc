"""What a sandbox gives its guest, each as a resource with three steps.

`prepare` makes the thing on the host (directories, mounts); `attach` says
how the guest reaches it (a VM device, a storage the agent mounts, a path
in the container's spec); `release` undoes `prepare`, removing only what it
made. The sandbox and its containers go through these steps in order and
release in reverse, so a start that fails part-way leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pykata.channels import SHARED_FS_TAG
from pykata.hypervisor.base import Device, SharedDirectory
from pykata.protocols import agent_pb2
from pykata.runtime.mounts import Mount
from pykata.runtime.paths import GUEST_SHARED_DIR
from pykata.runtime.share import ContainerShare, SandboxShare
from pykata.runtime.volumes import Volume

# 9p options in the guest: a larger msize moves more per round trip, and
# cache=mmap lets programs mmap their files shared (needed by some loaders).
NINEP_OPTIONS = ("trans=virtio", "version=9p2000.L", "msize=524288", "cache=mmap")


class Resource(Protocol):
    def prepare(self) -> None: ...

    def release(self) -> None: ...


class SharedFilesystem:
    """The sandbox's 9p export: a VM device, and a storage the agent mounts
    at GUEST_SHARED_DIR when the sandbox is created."""

    def __init__(self, share: SandboxShare) -> None:
        self.share = share

    def prepare(self) -> None:
        self.share.prepare()

    def devices(self) -> list[Device]:
        return [SharedDirectory(self.share.paths.shared_dir, SHARED_FS_TAG)]

    def guest_storage(self) -> agent_pb2.Storage:
        return agent_pb2.Storage(driver="9p", source=SHARED_FS_TAG, fstype="9p",
                                 options=list(NINEP_OPTIONS), mount_point=GUEST_SHARED_DIR)

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
        self.guest_path = f"{guest_dir}/{volume.name}"

    @property
    def source(self) -> Path:
        return self.volume.source

    def prepare(self) -> None:
        self.share.add_volume(self.volume)

    def attach(self, mounts: Any) -> None:
        mounts[self.index].source = self.guest_path

    def release(self) -> None:
        # Unmounted with the container's share (ContainerShare.remove).
        pass
