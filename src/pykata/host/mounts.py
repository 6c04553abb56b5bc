"""Host mounts pykata makes for a guest, each one safe to hand to a hostile guest.

Every mount lands on a file descriptor opened without following links
(`safepath`), never on a path resolved again later. Every mount is nosuid,
nodev and noexec on the host: the guest writes through these mounts as root
(QEMU's 9p server), and nothing it writes may become a setuid program, a
device node or an executable for the host. Bind mounts get their flags while
still detached (the new mount API), so a read-only bind is read-only all the
way down before anyone can see it, and its propagation is private: a mount
the host makes later below a volume's source does not appear, writable, in
the guest's share.

The syscalls are called directly (not mount(8)): no extra processes on a
container start, and errors come as errno values, not text.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pykata.errors import PykataError
from pykata.host import safepath
from pykata.host import syscalls as sc

# What every mount pykata makes for a guest carries on the host.
GUEST_MOUNT_ATTRS = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
_GUEST_MS_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC

# mount(8)-style options that are flags, not filesystem data.
_FLAG_OPTIONS = {
    "ro": sc.MS_RDONLY,
    "nosuid": sc.MS_NOSUID,
    "nodev": sc.MS_NODEV,
    "noexec": sc.MS_NOEXEC,
    "bind": sc.MS_BIND,
    "rbind": sc.MS_BIND | sc.MS_REC,
}
_IGNORED_OPTIONS = {"rw", "defaults", "suid", "dev", "exec"}


class MountError(PykataError):
    """A host mount or unmount failed."""


@dataclass(frozen=True)
class Mount:
    """A mount as containerd describes one: type, source and mount(8) options."""

    type: str
    source: str
    options: Sequence[str] = field(default_factory=tuple)

    @property
    def is_bind(self) -> bool:
        return self.type in ("bind", "rbind") or any(
            o in ("bind", "rbind") for o in self.options)

    @property
    def recursive(self) -> bool:
        return self.type == "rbind" or "rbind" in self.options

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _split_options(options: Sequence[str]) -> tuple[int, str]:
    flags = 0
    data = []
    for option in options:
        if option in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[option]
        elif option not in _IGNORED_OPTIONS:
            data.append(option)
    return flags, ",".join(data)


def mount_beneath(m: Mount, base: Path, rel: str | PurePosixPath, *,
                  readonly: bool = False) -> None:
    """Mount `m` at `base`/`rel` (an existing directory or file), resolved
    without following links; nosuid, nodev, noexec, private; read-only all
    the way down when `readonly` or `m` says "ro"."""
    what = f"{m.type} mount of {m.source or '(none)'} at {base / rel}"
    try:
        target = safepath.open_beneath(base, rel, directory=_source_is_dir(m))
    except OSError as exc:
        raise MountError(f"{what} failed: {_reason(exc)}") from exc
    try:
        if m.is_bind:
            _bind(m, target, readonly=readonly or m.readonly)
        else:
            _mount_fs(m, target, readonly=readonly)
            # The new mount's root, for the propagation change below.
            root = safepath.open_beneath(base, rel, directory=True)
            try:
                sc.mount_setattr(root, set_flags=0, recursive=False, propagation=sc.MS_PRIVATE)
            finally:
                os.close(root)
    except OSError as exc:
        raise MountError(f"{what} failed: {_reason(exc)}" + _hint(exc, m)) from exc
    finally:
        os.close(target)


def share_propagation(base: Path, rel: str | PurePosixPath) -> None:
    """Make the mount at `base`/`rel` (not those below it) a shared one: the
    mounts made below it later reach the mount namespaces that hold a slave
    copy of it (virtiofsd's), and nothing flows back from them."""
    root = safepath.open_beneath(base, rel, directory=True)
    try:
        sc.mount_setattr(root, set_flags=0, recursive=False, propagation=sc.MS_SHARED)
    except OSError as exc:
        raise MountError(f"making {base / rel} a shared mount failed: {_reason(exc)}") from exc
    finally:
        os.close(root)


def _source_is_dir(m: Mount) -> bool:
    if not m.is_bind:
        return True
    return os.path.isdir(m.source)


def _bind(m: Mount, target: int, *, readonly: bool) -> None:
    tree = sc.open_tree(m.source, recursive=m.recursive)
    try:
        attrs = GUEST_MOUNT_ATTRS | (sc.MOUNT_ATTR_RDONLY if readonly else 0)
        # Recursive in every case: the flags must hold for each mount of an
        # rbind, not only its top (CVE-2020-28914's class).
        sc.mount_setattr(tree, set_flags=attrs, recursive=True, propagation=sc.MS_PRIVATE)
        sc.move_mount(tree, target)
    finally:
        os.close(tree)


def _mount_fs(m: Mount, target: int, *, readonly: bool) -> None:
    flags, data = _split_options(m.options)
    flags |= _GUEST_MS_FLAGS | (sc.MS_RDONLY if readonly else 0)
    sc.mount(m.source, safepath.fd_path(target), m.type, flags, data)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link is in the way (refused: host mounts never follow links)"
    if exc.errno == errno.EXDEV:
        return "the path leaves its base directory (refused)"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _hint(exc: OSError, m: Mount) -> str:
    if exc.errno == errno.EPERM:
        return " (pykata must run as root to mount)"
    if exc.errno == errno.ENOENT:
        return " (a source or lower directory does not exist)"
    if exc.errno == errno.ENOSYS:
        return " (pykata needs Linux 5.12 or later on the host)"
    if m.type == "overlay" and exc.errno == errno.EINVAL:
        return f" (overlay options {_split_options(m.options)[1]!r} were refused)"
    return ""


def mount_tmpfs(target: Path, *, size_mib: int, mode: int = 0o700) -> None:
    """A bounded, private tmpfs at `target` (a directory pykata just made)."""
    mount_beneath(Mount("tmpfs", "tmpfs", (f"size={size_mib}m", f"mode={mode:o}")),
                  target.parent, target.name)


def unmount(target: Path, *, lazy: bool = False) -> None:
    """Unmount `target` (never through a link); not mounted is not an error."""
    flags = sc.UMOUNT_NOFOLLOW | (sc.MNT_DETACH if lazy else 0)
    try:
        sc.umount2(str(target), flags)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return
        raise MountError(f"unmounting {target} failed: {_reason(exc)}") from exc


def unmount_all(target: Path) -> None:
    """Unmount `target` until nothing is mounted there (mounts can stack)."""
    for _ in range(16):
        if not os.path.ismount(target):
            return
        unmount(target)
    unmount(target, lazy=True)


def remove_unmounted(base: Path, *, lazy: bool = False) -> None:
    """Unmount everything at or below `base`, deepest first, then remove `base`.

    Raises MountError, leaving `base` in place, if a mount remains: rmtree
    through a mount would delete the mounted files (a user's rootfs or volume),
    not the mount point.
    """
    for point in mounts_under(base):
        unmount(point, lazy=lazy)
    if mounts_under(base):
        raise MountError(f"mounts remain under {base}; leaving it in place")
    shutil.rmtree(base, ignore_errors=True)


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix`, deepest first (the order to unmount)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = Path(unescape_mountinfo(line.split()[4]))
            if point == prefix or prefix in point.parents:
                found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def mounts_of_type(fstype: str) -> list[Path]:
    """Mount points whose filesystem type is `fstype` ("nsfs", "tmpfs", ...)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # Optional fields end with a lone "-"; the type follows it.
            if fields[fields.index("-", 6) + 1] == fstype:
                found.append(Path(unescape_mountinfo(fields[4])))
    return found


def mount_options(point: Path) -> set[str]:
    """The per-mount options (ro, nosuid, ...) of the topmost mount at `point`."""
    options: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if Path(unescape_mountinfo(fields[4])) == point:
                options = set(fields[5].split(","))
    return options


def unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
