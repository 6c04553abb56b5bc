"""Which kernel and guest root a VM boots: the files the configuration names,
else the cache's for the current inputs.

The guest's root filesystem comes from one of two files built from the same
entries: the initrd (unpacked into each VM's RAM) or the read-only ext4 image
(read on demand from one host file; see assets/root_image.py). `image` or
`initrd` naming a file picks that form; with neither, `guest_root` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pykata.config import QemuConfig
from pykata.errors import AssetsError


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    root: Path  # the initrd, or the image when `root_is_image`
    root_is_image: bool

    @property
    def initrd(self) -> Path | None:
        return None if self.root_is_image else self.root

    @property
    def image(self) -> Path | None:
        return self.root if self.root_is_image else None


def guest_files(q: QemuConfig) -> GuestFiles:
    """The files a VM started now boots; AssetsError (with the fix) when the
    cache holds none for the current inputs."""
    chosen = q.image or q.initrd
    is_image = bool(q.image) or (not q.initrd and q.guest_root == "image")
    if q.kernel and chosen:
        return GuestFiles(Path(q.kernel), Path(chosen), is_image)
    from pykata.assets import locate

    paths = locate()
    kernel = Path(q.kernel) if q.kernel else paths.kernel
    if chosen:
        return GuestFiles(kernel, Path(chosen), is_image)
    if not is_image:
        return GuestFiles(kernel, paths.initrd, False)
    if paths.image is None or not paths.image.is_file():
        raise AssetsError(
            f"guest root image not found at {paths.image or paths.initrd.parent}",
            hint="run `pykata assets build` as root (the image holds device nodes, so it "
                 "is built only as root), or set [hypervisor.qemu] guest_root = \"initrd\"")
    return GuestFiles(kernel, paths.image, True)
