"""The host side of volumes: what QEMU's 9p server, and so the guest, may write.

Whatever the guest does, it reaches a volume only through QEMU on the host, so
the host's mount flags are the boundary; these check them with real mounts.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pykata.runtime.mounts import Mount, mount, mounts_under, unmount
from pykata.runtime.volumes import plan_volumes, share_volume


def test_read_only_recursive_volume_is_read_only_below_too(tmp_path: Path) -> None:
    """A read-only rbind of a directory with a mount below it: the host side of
    the share refuses writes to both, as root."""
    source, below, share = tmp_path / "source", tmp_path / "source" / "below", tmp_path / "share"
    below.mkdir(parents=True)
    mount(Mount("tmpfs", "tmpfs", ("size=1m",)), below)
    try:
        [(_, volume)] = plan_volumes(
            [{"destination": "/d", "type": "bind", "source": str(source),
              "options": ["rbind", "ro"]}], None)
        point = share_volume(volume, share)
        try:
            for target in (point / "top", point / "below" / "x"):
                with pytest.raises(OSError) as refused:
                    target.write_text("x")
                assert refused.value.errno == errno.EROFS, target
        finally:
            for inner in mounts_under(share):
                unmount(inner)
        (below / "x").write_text("the source itself stays writable")
    finally:
        unmount(below)
