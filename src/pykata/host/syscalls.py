"""Thin wrappers over the Linux calls pykata's host path handling needs.

The new mount API (open_tree, mount_setattr, move_mount; Linux 5.12) lets a
bind mount get its flags (read-only all the way down, nosuid, nodev, private
propagation) while still detached, and be attached onto a file descriptor:
nothing is ever visible half-configured, and no path is resolved twice.
openat2 resolves a path without following any link. Each wrapper raises
OSError with the errno, as the os module does.
"""

from __future__ import annotations

import ctypes
import os
import platform

# x86_64 system call numbers (asm/unistd_64.h); pykata drives qemu-system-x86_64.
_NR = {"open_tree": 428, "move_mount": 429, "openat2": 437, "mount_setattr": 442}

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(rc: int, what: str, path: str | None = None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return rc


def _syscall(name: str, *args: object) -> int:
    if platform.machine() != "x86_64":  # pragma: no cover - pykata runs x86_64 guests
        raise OSError(38, f"{name}: only x86_64 hosts are supported")
    fn = libc().syscall
    fn.restype = ctypes.c_long
    return int(fn(ctypes.c_long(_NR[name]), *args))


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    rc = _syscall("openat2", ctypes.c_int(dirfd), path.encode(), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(rc, "openat2", path)


def open_tree(path: str, *, recursive: bool) -> int:
    """A detached copy of the mount tree at `path` (a bind mount not yet attached)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    rc = _syscall("open_tree", ctypes.c_int(AT_FDCWD), path.encode(), ctypes.c_uint(flags))
    return _check(rc, "open_tree", path)


def mount_setattr(fd: int, *, set_flags: int, recursive: bool, propagation: int = 0) -> None:
    attr = _MountAttr(attr_set=set_flags, attr_clr=0, propagation=propagation, userns_fd=0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    rc = _syscall("mount_setattr", ctypes.c_int(fd), b"", ctypes.c_uint(flags),
                  ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(rc, "mount_setattr")


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the detached mount `from_fd` onto the directory or file `to_fd`."""
    rc = _syscall("move_mount", ctypes.c_int(from_fd), b"", ctypes.c_int(to_fd), b"",
                  ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
    _check(rc, "move_mount")


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    fn = libc().mount
    rc = fn(source.encode() or None, target.encode(), fstype.encode() or None,
            ctypes.c_ulong(flags), data.encode() or None)
    _check(rc, "mount", target)


def umount2(target: str, flags: int) -> None:
    rc = libc().umount2(target.encode(), ctypes.c_int(flags))
    _check(rc, "umount2", target)
