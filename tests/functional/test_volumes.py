"""The host side of volumes: what QEMU's 9p server, and so the guest, may write.

Whatever the guest does, it reaches a volume only through QEMU on the host, so
the host's mount flags are the boundary; these check them with real mounts.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pykata.errors import ContainerError
from pykata.host.mounts import (
    Mount,
    MountError,
    mount_beneath,
    mount_options,
    mounts_under,
    unmount,
)
from pykata.runtime.paths import SandboxPaths, private_dir
from pykata.runtime.sandbox import cleanup_host_state
from pykata.runtime.share import SandboxShare
from pykata.runtime.volumes import Volume, plan_volumes


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
    return share.paths.shared_dir / container.add_volume(volume)


def _volume(source: Path, options: list[str]) -> Volume:
    [(_, volume)] = plan_volumes(
        [{"destination": "/d", "type": "bind", "source": str(source), "options": options}],
        None)
    return volume


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
                     shared / "containers" / "c1" / "x", shared / "volumes" / "x"):
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


def test_two_containers_binding_one_path_share_one_mount(tmp_path: Path) -> None:
    """Two containers of a pod bind the same host directory: one mount in the
    export (the guest sees one inode, so their locks meet), kept while either
    uses it, unmounted and its point removed with the last."""
    source = tmp_path / "vol"
    source.mkdir()
    share = _share(tmp_path)
    try:
        first, second = share.container("c1"), share.container("c2")
        for container in (first, second):
            container.create()
        rel = first.add_volume(_volume(source, ["rbind", "rw"]))
        assert second.add_volume(_volume(source, ["rbind", "rw"])) == rel
        point = share.paths.shared_dir / rel
        assert mounts_under(point) == [point]
        first.remove()
        assert mounts_under(point) == [point], "removed while the other container uses it"
        (point / "still").write_text("second container's volume")
        second.remove()
        assert not mounts_under(point) and not point.exists()
        assert (source / "still").exists()
    finally:
        cleanup_host_state(share.paths)


def test_read_only_and_writable_binds_of_one_path_stay_apart(tmp_path: Path) -> None:
    """A read-only bind does not become writable because another container of
    the pod binds the same path writable, nor the other way round; a
    non-recursive bind does not get the recursive one's submounts."""
    source = tmp_path / "vol"
    (source / "below").mkdir(parents=True)
    _tmpfs(source / "below")
    share = _share(tmp_path)
    try:
        reader, writer, flat = (share.container(c) for c in ("ro", "rw", "flat"))
        for container in (reader, writer, flat):
            container.create()
        ro = share.paths.shared_dir / reader.add_volume(_volume(source, ["rbind", "ro"]))
        rw = share.paths.shared_dir / writer.add_volume(_volume(source, ["rbind", "rw"]))
        plain = share.paths.shared_dir / flat.add_volume(_volume(source, ["bind", "rw"]))
        assert len({ro, rw, plain}) == 3
        with pytest.raises(OSError) as refused:
            (ro / "x").write_text("x")
        assert refused.value.errno == errno.EROFS
        (rw / "below" / "x").write_text("through the recursive bind")
        assert not (plain / "below" / "x").exists()
        writer.remove()
        with pytest.raises(OSError) as still:
            (ro / "y").write_text("y")
        assert still.value.errno == errno.EROFS
    finally:
        cleanup_host_state(share.paths)
        unmount(source / "below")


def test_a_replaced_source_path_is_a_new_volume(tmp_path: Path) -> None:
    """The host path names another directory by the time the second container
    binds it: the second gets the new directory, not the first's mount."""
    source = tmp_path / "vol"
    source.mkdir()
    (source / "old").write_text("old")
    share = _share(tmp_path)
    try:
        first, second = share.container("c1"), share.container("c2")
        for container in (first, second):
            container.create()
        old = share.paths.shared_dir / first.add_volume(_volume(source, ["rbind"]))
        source.rename(tmp_path / "moved")
        source.mkdir()
        new = share.paths.shared_dir / second.add_volume(_volume(source, ["rbind"]))
        assert old != new
        assert (old / "old").exists() and not (new / "old").exists()
    finally:
        cleanup_host_state(share.paths)


def test_a_volume_that_cannot_be_mounted_leaves_nothing(tmp_path: Path) -> None:
    """The source is gone, or no longer a directory, when the container is
    created: a clear error, nothing counted, no mount point left in the export."""
    gone, changed = tmp_path / "gone", tmp_path / "changed"
    gone.mkdir()
    changed.mkdir()
    volumes = [_volume(gone, ["rbind"]), _volume(changed, ["rbind"])]
    gone.rmdir()
    changed.rmdir()
    changed.write_text("a file now")
    share = _share(tmp_path)
    try:
        container = share.container("c1")
        container.create()
        with pytest.raises(ContainerError, match="gone: No such file or directory"):
            container.add_volume(volumes[0])
        with pytest.raises(MountError, match=r"changed at .*volumes/0 failed"):
            container.add_volume(volumes[1])  # a file bound onto a directory
        assert not share.volumes and not container.volume_keys
        assert not list((share.paths.share_source / "volumes").iterdir())
        assert not mounts_under(share.paths.shared_dir / "volumes")
        container.remove()
    finally:
        cleanup_host_state(share.paths)


def test_one_container_binding_a_path_twice_holds_it_once(tmp_path: Path) -> None:
    """Two destinations of one container bind the same host path: one mount,
    released with the container."""
    source = tmp_path / "vol"
    source.mkdir()
    share = _share(tmp_path)
    try:
        container = share.container("c1")
        container.create()
        rel = container.add_volume(_volume(source, ["rbind"]))
        assert container.add_volume(_volume(source, ["rbind"])) == rel
        container.remove()
        assert not share.volumes and not (share.paths.shared_dir / rel).exists()
    finally:
        cleanup_host_state(share.paths)


def test_a_volume_that_will_not_unmount_does_not_keep_the_rootfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Releasing a volume fails: the container's rootfs is unmounted and its
    directories removed all the same, then the error is raised."""
    source, rootfs = tmp_path / "vol", tmp_path / "rootfs"
    source.mkdir()
    rootfs.mkdir()
    share = _share(tmp_path)
    try:
        container = share.container("c1")
        container.create()
        container.mount_rootfs([Mount("bind", str(rootfs), ("rbind",))], readonly=False)
        container.add_volume(_volume(source, ["rbind"]))

        def busy(*_: object) -> None:
            raise MountError("mounts remain under the volume")

        monkeypatch.setattr(share, "release_volume", busy)
        with pytest.raises(MountError, match="mounts remain under the volume"):
            container.remove()
        assert not mounts_under(share.paths.shared_dir / "containers")
        assert not (share.paths.share_source / "containers" / "c1").exists()
        assert not container.volume_keys
    finally:
        cleanup_host_state(share.paths)
