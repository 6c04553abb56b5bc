"""How `pykata collect` opens a file it did not make: as root, a path in a
directory a user may own (`--oci-root`, a bundle) must not make it read
another file through a link, hang on a FIFO, or take in a user's forged
record. A file is read only when it is, at the moment it is opened (no
check-then-open race), a regular file, not a link, and belongs to one of
`owners`; otherwise `Skipped` says why."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection
from pathlib import Path

from pykata.hypervisor.capped_log import rolled


class Skipped(Exception):
    """A file not read, and why (one line for the report)."""


def trusted_owners() -> set[int]:
    """Root and whoever runs `pykata collect`."""
    return {0, os.getuid(), os.geteuid()}


def _open(path: Path, owners: Collection[int] | None) -> tuple[int, os.stat_result]:
    try:
        # O_NONBLOCK: opening a FIFO returns at once (then refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Skipped(f"{path} is a symbolic link: not followed") from None
        raise Skipped(f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Skipped(f"{path} is not a regular file: not read")
        if owners is not None and st.st_uid not in owners:
            raise Skipped(f"{path} belongs to uid {st.st_uid}, not root or the user "
                          "running pykata collect: not read")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_file(path: Path, limit: int, owners: Collection[int] | None) -> bytes:
    """The whole file, refused when over `limit` bytes."""
    fd, _ = _open(path, owners)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Skipped(f"{path} is over {limit} bytes: not read")
    return data


def read_tail(path: Path, size: int, owners: Collection[int] | None) -> bytes:
    """The last `size` bytes of a log, across its roll-over (`<name>.1`,
    held to the same checks; a missing one is fine)."""
    data = b""
    for part in (path, rolled(path)):
        try:
            fd, st = _open(part, owners)
        except Skipped:
            if part == path:
                raise
            break
        with os.fdopen(fd, "rb") as f:
            f.seek(max(0, st.st_size - (size - len(data))))
            data = f.read(size - len(data)) + data
        if len(data) >= size:
            break
    return data[-size:]
