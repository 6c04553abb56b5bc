"""The host side of a sandbox's shared filesystem (the 9p export).

What the guest can write, and where:
- the export's own directories (its root, `containers/`, each container's
  directory): nothing. The export is a read-only bind of a host-only
  directory, so the guest cannot create, rename or replace the entries the
  host mounts on (the CVE-2020-2024/2026 class) nor fill the host's /run;
- a container's rootfs: what its mounts allow, read-only all the way down
  when the spec's root.readonly says so (CVE-2020-28914's rootfs variant);
- a volume: what the spec allows, read-only all the way down for `ro`.
Every one of these mounts is nosuid, nodev and noexec on the host.
`pykata run`'s writable layer lives on the sandbox's scratch tmpfs, bounded
by [runtime] scratch_size.

9p is served by QEMU in the host's mount namespace, so it sees each mount
as it is made. virtiofsd serves from a mount namespace of its own, made
when the VM starts, holding a slave copy of the export: the export is then
a shared mount (`for_virtio_fs`), so the rootfs and volumes mounted below it
later reach virtiofsd, and what virtiofsd's namespace does never reaches the
host. Each mount below keeps its own flags in the copy (read-only stays
read-only) and stays private towards its own source: a mount the host makes
later under a volume's source reaches neither. A container's mounts are
unmounted lazily there: virtiofsd keeps a descriptor of every file the
guest has looked up, which would make a plain unmount fail as busy until
the guest forgets them.

Volumes are the pod's, not a container's: the containers of a pod that bind
the same host path (the same file or directory, with the same `ro` and
recursion) get one mount of it, `volumes/<n>` in the export, so the guest
sees one file where they share one, and their `flock` and `fcntl` locks meet
in the guest's kernel. A read-only and a writable bind of one path stay two
mounts (the read-only one read-only on the host), and `<n>` is a counter,
not the host path. The mount is counted by the containers using it and
unmounted when the last one is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pykata.errors import ContainerError
from pykata.host import safepath
from pykata.host.mounts import (
    Mount,
    MountError,
    mount_beneath,
    mount_tmpfs,
    mounts_under,
    share_propagation,
    unmount,
)
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.volumes import Volume

log = logging.getLogger(__name__)

# At or above this share of its size, a scratch tmpfs counts as full.
_FULL_FRACTION = 0.98


# What makes two binds one pod volume: the host path, the file it names
# (device and inode: a path replaced between two containers is a new
# volume), read-only, recursive.
VolumeKey = tuple[str, int, int, bool, bool]
POD_VOLUMES = PurePosixPath("volumes")


@dataclass
class PodVolume:
    """One mount of a host path in the export, and the containers using it."""

    rel: PurePosixPath
    users: set[str] = field(default_factory=set)


class SandboxShare:
    """The scratch tmpfs and the read-only export of one sandbox."""

    def __init__(self, paths: SandboxPaths, scratch_mib: int) -> None:
        self.paths = paths
        self.scratch_mib = scratch_mib
        # Served by virtiofsd from its own mount namespace (see above).
        self.for_virtio_fs = False
        self.volumes: dict[VolumeKey, PodVolume] = {}
        self._next_volume = 0

    def prepare(self) -> None:
        """Mount the scratch tmpfs and the export; the run dir must exist.
        The caller's teardown removes whatever this made if it fails."""
        p = self.paths
        p.scratch_dir.mkdir(mode=0o700)
        mount_tmpfs(p.scratch_dir, size_mib=self.scratch_mib)
        safepath.make_dirs(p.scratch_dir, "share/containers")
        safepath.make_dirs(p.scratch_dir, "containers", mode=0o700)
        p.shared_dir.mkdir(mode=0o700)
        mount_beneath(Mount("bind", str(p.share_source), ("bind",)), p.run_dir, "shared",
                      readonly=True)
        if self.for_virtio_fs:
            share_propagation(p.run_dir, "shared")

    def container(self, container_id: str) -> ContainerShare:
        return ContainerShare(self, container_id)

    def acquire_volume(self, volume: Volume, container_id: str) -> tuple[VolumeKey, PurePosixPath]:
        """The pod's mount of `volume` for `container_id`, made on first use;
        returns its key and its place in the export."""
        try:
            st = os.stat(volume.source)
        except OSError as exc:
            raise ContainerError(f"volume {volume.source}: {exc.strerror}",
                                 hint="the host path must exist while the container "
                                      "is created") from exc
        key: VolumeKey = (str(volume.source), st.st_dev, st.st_ino, volume.readonly,
                          volume.recursive)
        shared = self.volumes.get(key)
        if shared is None:
            rel = POD_VOLUMES / str(self._next_volume)
            self._next_volume += 1
            self._mount_volume(volume, rel)
            shared = self.volumes[key] = PodVolume(rel)
        shared.users.add(container_id)
        return key, shared.rel

    def _mount_volume(self, volume: Volume, rel: PurePosixPath) -> None:
        safepath.make_dirs(self.paths.share_source, POD_VOLUMES)
        if volume.is_dir:
            safepath.make_dirs(self.paths.share_source, rel, exclusive=True)
        else:
            safepath.make_file(self.paths.share_source, rel)
        options = ("rbind" if volume.recursive else "bind",)
        try:
            mount_beneath(Mount("bind", str(volume.source), options), self.paths.shared_dir,
                          rel, readonly=volume.readonly)
        except BaseException:
            _remove_point(self.paths.share_source / rel)
            raise

    def release_volume(self, key: VolumeKey, container_id: str) -> None:
        """`container_id` no longer uses the volume: unmount it when no
        container of the pod does."""
        shared = self.volumes.get(key)
        if shared is None:
            return
        shared.users.discard(container_id)
        if shared.users:
            return
        point = self.paths.shared_dir / shared.rel
        for mounted in mounts_under(point):
            unmount(mounted, lazy=self.for_virtio_fs)
        if mounts_under(point):
            raise MountError(f"mounts remain under {point}; leaving it in place")
        del self.volumes[key]
        _remove_point(self.paths.share_source / shared.rel)

    def scratch_full(self) -> bool:
        """Whether the scratch tmpfs is (about) full: writes in it fail with ENOSPC."""
        try:
            st = os.statvfs(self.paths.scratch_dir)
        except OSError:
            return False
        return st.f_blocks > 0 and (st.f_blocks - st.f_bavail) >= _FULL_FRACTION * st.f_blocks


class ContainerShare:
    """One container's part of the export: its rootfs and volumes.

    `create` makes the container's directories and fails if they exist;
    `remove` undoes only what this object made, so a refused container
    never takes another's state with it.
    """

    def __init__(self, share: SandboxShare, container_id: str) -> None:
        self.share = share
        self.paths = share.paths
        self.id = container_id
        self.volume_keys: list[VolumeKey] = []
        self.rel = SandboxPaths.container_share(container_id)
        self.created = False
        self.lazy_unmount = share.for_virtio_fs

    @property
    def rootfs(self) -> Path:
        return self.paths.container_rootfs(self.id)

    def create(self) -> None:
        try:
            safepath.make_dirs(self.paths.share_source, self.rel, exclusive=True)
        except FileExistsError:
            raise ContainerError(
                f"container {self.id} already exists in sandbox {self.paths.key}") from None
        self.created = True
        safepath.make_dirs(self.paths.share_source, self.rel / "rootfs")

    def scratch(self) -> Path:
        """The container's host-only directory on the scratch tmpfs."""
        rel = PurePosixPath("containers", self.id)
        safepath.make_dirs(self.paths.scratch_dir, rel, mode=0o700)
        return self.paths.scratch_dir / rel

    def mount_rootfs(self, mounts: Sequence[Mount], *, readonly: bool) -> None:
        for m in mounts:
            mount_beneath(m, self.paths.shared_dir, self.rel / "rootfs", readonly=readonly)

    def add_volume(self, volume: Volume) -> PurePosixPath:
        """The pod's mount of `volume`'s host path (see the module's doc),
        shared with the pod's other containers that bind it alike; returns
        its place in the export."""
        key, rel = self.share.acquire_volume(volume, self.id)
        if key not in self.volume_keys:
            self.volume_keys.append(key)
        return rel

    def remove(self) -> None:
        """Let go of the container's volumes (unmounted when no other
        container of the pod uses them), unmount its rootfs, then remove its
        directories (only if this object created them)."""
        # A volume that cannot be unmounted does not keep the rootfs mounted:
        # its error is raised after the rest is done (the sandbox's teardown
        # unmounts what is left).
        failed: list[MountError] = []
        while self.volume_keys:
            try:
                self.share.release_volume(self.volume_keys.pop(), self.id)
            except MountError as exc:
                failed.append(exc)
        if self.created:
            self._remove_own()
        if failed:
            raise failed[0]

    def _remove_own(self) -> None:
        top = self.paths.shared_dir / self.rel
        for point in mounts_under(top):
            unmount(point, lazy=self.lazy_unmount)
        if mounts_under(top):
            raise MountError(f"mounts remain under {top}; leaving it in place")
        for path in (self.paths.share_source / self.rel, self.paths.scratch(self.id)):
            _remove_tree(path)
        self.created = False


def _remove_point(path: Path) -> None:
    """Remove an unmounted mount point (an empty directory or file)."""
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("removing %s: %s", path, exc.strerror)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("removing %s: %s", path, exc.strerror)
