"""Mount points a read-only rootfs lacks, made on the host before it is shared.

crun in the guest creates the directory or file each mount of the spec needs
(`/proc`, `/dev`, `/etc/resolv.conf`, ...) when the image lacks it. A rootfs
the spec makes read-only (`root.readonly`; containerd's CRI plugin sets it for
every pod's sandbox container, whose pause image holds one file) is read-only
on the host side of the share as well, so crun cannot. pykata makes the
missing ones in the rootfs on the host first, as runc does before it remounts
the root read-only.

The rootfs is image content: a path is resolved beneath it without following
any link (safepath). A destination behind a link is left to crun, which
resolves it inside the container.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pykata.errors import SpecError
from pykata.host import safepath
from pykata.runtime.volumes import is_bind


@dataclass(frozen=True)
class MountPoint:
    path: PurePosixPath  # relative to the rootfs
    is_file: bool


def spec_mount_points(spec: dict[str, Any]) -> list[MountPoint]:
    """The spec's mount destinations, relative, in order; those beneath
    another destination are left out (they land on that mount, not the image)."""
    mounts = [m for m in spec.get("mounts") or [] if isinstance(m, dict)]
    points: list[MountPoint] = []
    seen: set[PurePosixPath] = set()
    for entry in mounts:
        destination = entry.get("destination")
        if not isinstance(destination, str):
            continue
        normal = posixpath.normpath("/" + destination).lstrip("/")
        if not normal or normal.startswith(".."):
            continue
        rel = PurePosixPath(normal)
        if any(parent in seen for parent in rel.parents):
            continue
        seen.add(rel)
        source = entry.get("source")
        is_file = bool(is_bind(entry) and isinstance(source, str) and os.path.isabs(source)
                       and os.path.isfile(source))
        points.append(MountPoint(rel, is_file))
    return points


def make_mount_points(root: Path, points: Sequence[MountPoint]) -> list[PurePosixPath]:
    """Create the points missing beneath `root`; return those made."""
    made: list[PurePosixPath] = []
    for point in points:
        try:
            try:
                os.close(safepath.open_beneath(root, point.path, directory=False))
                continue  # there already
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            if point.is_file:
                safepath.make_file(root, point.path, mode=0o644)
            else:
                safepath.make_dirs(root, point.path)
        except OSError as exc:
            if exc.errno in _BEHIND_A_LINK:
                continue  # crun resolves it inside the container
            raise SpecError(
                f"cannot create the mount point /{point.path} in the read-only rootfs "
                f"{root}: {exc.strerror}",
                hint="add it to the image, or do not make the root read-only") from exc
        made.append(point.path)
    return made


# openat2's answers for a path through a symlink, or one that leaves the base.
_BEHIND_A_LINK = (errno.ELOOP, errno.EXDEV)
