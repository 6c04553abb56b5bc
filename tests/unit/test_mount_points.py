"""Mount points a read-only rootfs lacks are made on the host, beneath the
rootfs and never through a link of the image's."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from pykata.errors import SpecError
from pykata.runtime.mount_points import MountPoint, make_mount_points, spec_mount_points


def test_the_spec_destinations_that_land_on_the_image(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    spec = {"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},  # on /dev's tmpfs
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts),
         "options": ["rbind", "ro"]},
        {"destination": "/data/../var//lib/", "type": "bind", "source": str(tmp_path)},
        {"destination": "/../../escape", "type": "tmpfs"},
        {"destination": 7},
    ]}
    points = spec_mount_points(spec)
    assert points == [
        MountPoint(PurePosixPath("proc"), False), MountPoint(PurePosixPath("dev"), False),
        MountPoint(PurePosixPath("etc/hosts"), True), MountPoint(PurePosixPath("var/lib"), False),
        MountPoint(PurePosixPath("escape"), False)]


def test_missing_points_are_made_and_present_ones_left(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "proc").mkdir(parents=True)
    (root / "pause").write_bytes(b"\x7fELF")
    made = make_mount_points(root, [MountPoint(PurePosixPath("proc"), False),
                                    MountPoint(PurePosixPath("dev"), False),
                                    MountPoint(PurePosixPath("etc/resolv.conf"), True)])
    assert made == [PurePosixPath("dev"), PurePosixPath("etc/resolv.conf")]
    assert (root / "dev").is_dir() and (root / "etc" / "resolv.conf").is_file()
    assert make_mount_points(root, [MountPoint(PurePosixPath("dev"), False)]) == []


def test_an_images_links_are_never_followed_on_the_host(tmp_path: Path) -> None:
    """A hostile image points etc/ and a mount point at host directories:
    nothing is made outside the rootfs (crun resolves them in the guest)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    root = tmp_path / "rootfs"
    root.mkdir()
    os.symlink(str(victim), root / "etc")
    os.symlink(str(victim / "made"), root / "proc")
    made = make_mount_points(root, [MountPoint(PurePosixPath("etc/resolv.conf"), True),
                                    MountPoint(PurePosixPath("etc/x/y"), False),
                                    MountPoint(PurePosixPath("proc"), False)])
    assert made == []
    assert list(victim.iterdir()) == []


def test_a_rootfs_that_cannot_take_a_point_is_named(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").write_text("a file where a directory should be")
    with pytest.raises(SpecError, match=r"mount point /etc/hosts in the read-only rootfs"):
        make_mount_points(root, [MountPoint(PurePosixPath("etc/hosts"), True)])
