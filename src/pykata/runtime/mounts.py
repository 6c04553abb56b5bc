"""Host mounts, through mount(2) and umount2(2) directly.

Calling the syscalls (instead of running mount(8)) keeps a container start
free of extra processes and gives errors as errno values, not as text.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pykata.errors import PykataError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2

# mount(8)-style options that are flags, not filesystem data.
_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}
_IGNORED_OPTIONS = {"rw", "defaults"}

_libc: ctypes.CDLL | None = None


class MountError(PykataError):
    """A host mount or unmount failed."""


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


@dataclass(frozen=True)
class Mount:
    """A mount as containerd describes one: type, source and mount(8) options."""

    type: str
    source: str
    options: Sequence[str] = field(default_factory=tuple)


def _split_options(options: Sequence[str]) -> tuple[int, str]:
    flags = 0
    data = []
    for option in options:
        if option in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[option]
        elif option not in _IGNORED_OPTIONS:
            data.append(option)
    return flags, ",".join(data)


def mount(m: Mount, target: Path) -> None:
    """Mount `m` at `target`; a read-only bind is remounted read-only as it must be."""
    flags, data = _split_options(m.options)
    fstype = "" if m.type in ("bind", "rbind") else m.type
    if m.type in ("bind", "rbind"):
        flags |= MS_BIND | (MS_REC if m.type == "rbind" else 0)
    _mount(m.source, target, fstype, flags & ~MS_RDONLY if flags & MS_BIND else flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        try:
            remount_readonly(target)
        except MountError:
            unmount(target)
            raise


def remount_readonly(target: Path) -> None:
    """Make the bind mount at `target` read-only (binds ignore MS_RDONLY at first)."""
    _mount("", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY, "")


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    rc = _lib().mount(
        source.encode() or None, str(target).encode(), fstype.encode() or None,
        ctypes.c_ulong(flags), data.encode() or None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        what = f"{fstype or 'bind'} mount of {source or '(none)'} at {target}"
        raise MountError(f"{what} failed: {os.strerror(err)}" + _mount_hint(err, fstype, data))


def _mount_hint(err: int, fstype: str, data: str) -> str:
    if err == errno.EPERM:
        return " (pykata must run as root to mount)"
    if err == errno.ENOENT:
        return " (a source or lower directory does not exist)"
    if fstype == "overlay" and err == errno.EINVAL:
        return f" (overlay options {data!r} were refused)"
    return ""


def unmount(target: Path, *, lazy: bool = False) -> None:
    """Unmount `target`; not mounted is not an error."""
    rc = _lib().umount2(str(target).encode(), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise MountError(f"unmounting {target} failed: {os.strerror(err)}")


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
            point = Path(_unescape(line.split()[4]))
            if point == prefix or prefix in point.parents:
                found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unescape(field: str) -> str:
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
