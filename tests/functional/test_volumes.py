"""The host side of volumes: what QEMU's 9p server, and so the guest, may write.

Whatever the guest does, it reaches a volume only through QEMU on the host, so
the host's mount flags are the boundary; these check them with real mounts.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pykata.host.mounts import Mount, mount_beneath, mount_options, mounts_under, unmount
from pykata.runtime.paths import SandboxPaths, private_dir
from pykata.runtime.sandbox import cleanup_host_state
from pykata.runtime.share import SandboxShare
from pykata.runtime.volumes import plan_volumes


def _tmpfs(point: Path) -> None:
    mount_beneath(Mount("tmpfs", "tmpfs", ("size=1m",)), point.parent, point.name)


def _add_volume(share: SandboxShare, source: Path, options: list[str]) -> Path:
    """Share `source` as container c1's only volume; its mount point in the share."""
    [(_, volume)] = plan_volumes(
        [{"destination": "/d", "type": "bind", "source": str(source), "options": options}],
        None)
    container = share.container("c1")
    if not container.paths.container_rootfs("c1").exists():
        container.create()
    container.add_volume(volume)
    return share.paths.container_volumes("c1") / volume.name


def _share(tmp_path: Path) -> SandboxShare:
    paths = SandboxPaths("host-side", private_dir(tmp_path / "root"))
    private_dir(paths.sandboxes)
    paths.run_dir.mkdir(mode=0o700)
    share = SandboxShare(paths, scratch_mib=16)
    share.prepare()
    return share


def test_read_only_recursive_volume_is_read_only_below_too(tmp_path: Path) -> None:
    """A read-only rbind of a directory with a mount below it: the host side of
    the share refuses writes to both, as root."""
    source, below = tmp_path / "source", tmp_path / "source" / "below"
    below.mkdir(parents=True)
    _tmpfs(below)
    share = _share(tmp_path)
    try:
        point = _add_volume(share, source, ["rbind", "ro"])
        for target in (point / "top", point / "below" / "x"):
            with pytest.raises(OSError) as refused:
                target.write_text("x")
            assert refused.value.errno == errno.EROFS, target
        (below / "x").write_text("the source itself stays writable")
    finally:
        cleanup_host_state(share.paths)
        unmount(below)


def test_export_is_read_only_and_every_mount_nosuid_nodev(tmp_path: Path) -> None:
    """The export's own directories are read-only (the guest can create no entry
    where the host mounts), and every mount pykata made for the sandbox is
    nosuid, nodev and noexec on the host, its rootfs and volumes included."""
    source = tmp_path / "vol"
    source.mkdir()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    share = _share(tmp_path)
    try:
        container = share.container("c1")
        container.create()
        container.mount_rootfs([Mount("bind", str(rootfs), ("rbind",))], readonly=False)
        _add_volume(share, source, ["rbind"])
        shared = share.paths.shared_dir
        for path in (shared / "x", shared / "containers" / "x",
                     shared / "containers" / "c1" / "x"):
            with pytest.raises(OSError) as refused:
                path.mkdir()
            assert refused.value.errno == errno.EROFS, path
        (share.paths.container_rootfs("c1") / "written").write_text("rootfs is writable")
        points = mounts_under(share.paths.run_dir)
        assert len(points) == 4, points  # scratch, export, rootfs, volume
        for point in points:
            assert {"nosuid", "nodev", "noexec"} <= mount_options(point), point
    finally:
        cleanup_host_state(share.paths)
    assert not share.paths.run_dir.exists()
    assert (rootfs / "written").exists() and source.is_dir()


def test_a_later_host_mount_below_a_volume_stays_out_of_the_share(tmp_path: Path) -> None:
    """The volume's source is a shared mount (as on a systemd host). After the
    share is made, the host mounts a tmpfs below the source: it does not show
    up in the share, where it would be writable below a read-only volume."""
    from pykata.host import syscalls

    source = tmp_path / "source"
    (source / "later").mkdir(parents=True)
    mount_beneath(Mount("bind", str(source), ("bind",)), tmp_path, "source")
    syscalls.mount("", str(source), "", 1 << 20, "")  # MS_SHARED
    share = _share(tmp_path)
    try:
        point = _add_volume(share, source, ["rbind", "ro"])
        _tmpfs(source / "later")
        (source / "later" / "file").write_text("host only")
        assert not (point / "later" / "file").exists()
        assert point / "later" not in mounts_under(share.paths.run_dir)
    finally:
        cleanup_host_state(share.paths)
        unmount(source / "later")
        unmount(source)
