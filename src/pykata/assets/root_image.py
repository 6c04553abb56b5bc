"""The guest's root filesystem as a read-only ext4 image (`[hypervisor]
guest_root = "image"`), made from the same entries as the initrd.

A VM booted from the initrd copies the compressed archive into its RAM and
unpacks it into a ramfs that stays there for the VM's life: every pod holds
its own copy of every file. The image is mapped into each guest by default
(DAX, hypervisor.qemu_args.RootPmem): every VM maps the host's page-cache
pages of it and the guest's ext4 reads them in place, so no guest keeps a
copy and nothing is unpacked at boot. As a read-only virtio-blk disk
(disable_image_nvdimm) the host reads each block once for every VM, but each
guest caches the blocks it reads.

What keeps a guest from writing it is QEMU: it opens and maps the file
read-only (`readonly=on`), so a guest's stores into the mapping are dropped
and a disk refuses writes; the guest also mounts it `ro`. The file is 0444
in the root-owned cache, which keeps other host users from changing it (not
a compromised QEMU: it runs as root). A hostile guest can read pykata's
files and nothing else; it cannot change what another VM or the next boot
reads.

Its size is a whole number of 2 MiB, the unit a guest maps it in.

No journal (nothing is ever written) and no reserved blocks; pykata's own
mke2fs settings (initrd/mke2fs.conf, not the host's); a fixed UUID and hash
seed taken from the build key, and every time stamp zero, so one plan gives
one image. Building needs root: the image holds device nodes
(/dev/console must exist before /init runs) and root-owned files, which
mke2fs copies from a staging tree made with mknod and chown.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path

from pykata.assets.buildlog import BuildLog
from pykata.assets.cpio import Archive, Entry

ROOT_IMAGE = "root.img"
MKE2FS = "/usr/sbin/mke2fs"
DEBUGFS = "/usr/sbin/debugfs"
# Its settings, not the host's /etc/mke2fs.conf.
MKE2FS_CONFIG = Path(__file__).resolve().parent / "initrd" / "mke2fs.conf"
_BLOCK = 4096
_BLOCKS_PER_PMEM_UNIT = (2 << 20) // _BLOCK
# Room for directories, inodes' extent blocks and the allocator's rounding.
_SLACK_BYTES = 8 << 20


class RootImageUnavailable(Exception):
    """The image cannot be built on this host or as this user (says why)."""


def can_build() -> str | None:
    """None when the image can be built here, else why not."""
    if os.geteuid() != 0:
        return "the guest root image is built as root (it holds device nodes)"
    for tool in (MKE2FS, DEBUGFS):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (install e2fsprogs)"
    return None


def write_root_image(archive: Archive, key: str, work: Path, out: Path, log: BuildLog) -> int:
    """Lay `archive` out in `work`, make the ext4 image `out` from it (0444);
    returns its size in bytes."""
    why = can_build()
    if why is not None:
        raise RootImageUnavailable(why)
    tree = work / "root-tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(mode=0o755, parents=True)
    entries = archive.entries()
    data_bytes = sum(_extract(entry, tree) for entry in entries)
    _zero_times(tree)
    blocks = (data_bytes + len(entries) * _BLOCK + _SLACK_BYTES) // _BLOCK
    blocks += blocks // 8
    # A whole number of 2 MiB, the unit a guest maps it in as DAX
    # (hypervisor.qemu_args.PMEM_ALIGN), so the image can be mapped as is.
    blocks = -(-blocks // _BLOCKS_PER_PMEM_UNIT) * _BLOCKS_PER_PMEM_UNIT
    fs_id = str(uuid.UUID(hex=(key * 4)[:32]))
    log.step(f"root image: {len(entries)} entries, {data_bytes} bytes of files, "
             f"{blocks * _BLOCK >> 20} MiB")
    out.unlink(missing_ok=True)
    log.run(
        [MKE2FS, "-q", "-F", "-t", "ext4", "-b", str(_BLOCK), "-m", "0",
         "-N", str(len(entries) + 256),
         "-E", f"root_owner=0:0,hash_seed={fs_id},lazy_itable_init=0",
         "-U", fs_id, "-L", "pykata-root", "-d", str(tree), str(out), str(blocks)],
        env={"E2FSPROGS_FAKE_TIME": "1", "MKE2FS_CONFIG": str(MKE2FS_CONFIG),
             "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    shutil.rmtree(tree)
    _zero_change_times(entries, work, out, log)
    os.chmod(out, 0o444)
    return out.stat().st_size


def _zero_change_times(entries: Sequence[Entry], work: Path, out: Path, log: BuildLog) -> None:
    """Set every entry's inode times to 0 in the image. mke2fs -d copies each
    file's times from the staging tree, where no call can set a ctime (it is
    when the build ran) and reading a file for its copy moves its atime off
    the 0 given it (relatime), so two builds a second apart differed."""
    commands = []
    for entry in entries:
        if '"' in entry.path or "\n" in entry.path:
            raise ValueError(f"root image: {entry.path!r} cannot be named to debugfs")
        commands += [f'sif "/{entry.path}" {field} @0' for field in ("ctime", "atime", "mtime")]
    script = work / "zero-ctime.debugfs"
    script.write_text("\n".join(commands) + "\n")
    log.run([DEBUGFS, "-w", "-f", script, out],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    script.unlink()


def _extract(entry: Entry, tree: Path) -> int:
    """Create one entry under `tree`, owned by root; returns its data size."""
    path = tree / entry.path
    # The plan holds absolute symlinks (/bin/ls -> /bin/busybox): an entry
    # below one would be written, as root, through it onto the host.
    if os.path.realpath(path.parent) != os.path.join(os.path.realpath(tree),
                                                     *Path(entry.path).parent.parts):
        raise ValueError(f"root image: {entry.path} lies below a symbolic link")
    kind = stat.S_IFMT(entry.mode)
    perm = stat.S_IMODE(entry.mode)
    size = 0
    if kind == stat.S_IFDIR:
        path.mkdir(exist_ok=True)
    elif kind == stat.S_IFLNK:
        assert entry.data is not None
        os.symlink(entry.data.decode(), path)
    elif kind == stat.S_IFCHR:
        os.mknod(path, stat.S_IFCHR | perm, os.makedev(*entry.rdev))
    elif kind == stat.S_IFREG:
        if entry.data is not None:
            path.write_bytes(entry.data)
        else:
            assert entry.source is not None
            shutil.copyfile(entry.source, path)
        size = path.stat().st_size
    else:
        raise ValueError(f"root image: {entry.path} has an unsupported file type {kind:o}")
    os.lchown(path, 0, 0)
    if kind != stat.S_IFLNK:
        os.chmod(path, perm)
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _zero_times(tree: Path) -> None:
    for top, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            os.utime(os.path.join(top, name), (0, 0), follow_symlinks=False)
    os.utime(tree, (0, 0))
