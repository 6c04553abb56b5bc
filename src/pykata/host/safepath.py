"""Host path operations below a directory pykata owns, never following a link.

The CVE-2020-2024/2026 class: a host that creates, mounts on or unmounts a
path inside a directory a guest can write lets the guest swap a component for
a symlink at the right moment and aim the operation at a host path of its
choosing. Everything here resolves paths with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS): a symlink anywhere in the path is an error (ELOOP), and
so is a path that would leave the base directory. Callers then act on the file
descriptor, not on the path again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pykata.host import syscalls as sc

_RESOLVE = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS


def _parts(rel: str | PurePosixPath) -> list[str]:
    path = PurePosixPath(rel)
    if path.is_absolute() or any(p in ("..", "") for p in path.parts):
        raise ValueError(f"{rel!s}: not a plain relative path")
    return [p for p in path.parts if p != "."]


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def open_base(base: Path) -> int:
    """An O_PATH descriptor of `base`, which must be a real directory (no link)."""
    return os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def open_beneath(base: Path, rel: str | PurePosixPath, *, directory: bool = True) -> int:
    """An O_PATH descriptor of `base`/`rel`, resolved without following links."""
    flags = os.O_PATH | (os.O_DIRECTORY if directory else 0)
    with _fd(open_base(base)) as base_fd:
        return sc.openat2(base_fd, "/".join(_parts(rel)) or ".", flags, _RESOLVE)


def make_dirs(base: Path, rel: str | PurePosixPath, *, mode: int = 0o755,
              exclusive: bool = False) -> None:
    """Create `base`/`rel` and its missing parents, one component at a time.

    With `exclusive`, the last component must not exist yet (FileExistsError):
    the caller then knows it created the directory, and may remove it.
    """
    parts = _parts(rel)
    fd = open_base(base)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                if exclusive and last:
                    raise
            next_fd = sc.openat2(fd, part, os.O_PATH | os.O_DIRECTORY, _RESOLVE)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)


def make_file(base: Path, rel: str | PurePosixPath, *, mode: int = 0o600) -> None:
    """Create the empty regular file `base`/`rel` (a mount point for a file)."""
    parts = _parts(rel)
    if not parts:
        raise ValueError("make_file needs a file name")
    parent = PurePosixPath(*parts[:-1]) if len(parts) > 1 else PurePosixPath(".")
    if len(parts) > 1:
        make_dirs(base, parent)
    with _fd(open_beneath(base, parent)) as dir_fd:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            os.close(os.open(parts[-1], flags, mode, dir_fd=dir_fd))
        except FileExistsError:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EEXIST, "exists and is not a regular file",
                              str(base / parts[-1])) from None


def fd_path(fd: int) -> str:
    """The magic link naming `fd`'s file: mount(2) onto it targets exactly that
    file, whatever its path has become since it was opened."""
    return f"/proc/self/fd/{fd}"
