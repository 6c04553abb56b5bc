"""The VM cache's endpoint: the socket a cache serves, and the record that
says it is that cache's own.

The endpoint may be anywhere the operator chooses, /run included: pykata
refuses one in a directory another user could change, never changes a
directory's mode, and removes only the socket a cache recorded as its own
(`EndpointClaim`: the socket's device, inode and modification time, in the
run root, locked while that cache lives) once that cache is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import stat
from pathlib import Path

from pykata.config import Config
from pykata.errors import PykataError
from pykata.runtime.paths import others_can_replace, private_dir, run_root


def endpoint(config: Config) -> Path:
    return Path(config.factory.vm_cache_endpoint or run_root() / "factory" / "cache.sock")


def remove_stale_endpoint(config: Config) -> bool:
    """Remove the endpoint of a cache that was killed: only a socket a cache
    recorded as the one it bound, when no cache holds that record any more.
    PykataError when the endpoint's directory lets another user swap it."""
    path = endpoint(config)
    claim = EndpointClaim.take(path, create=False)
    if claim is None:
        return False  # no record, or a cache serves it
    try:
        if not os.path.lexists(path):
            return False  # only the record is left, which goes
        problem = others_can_replace(path.parent)
        if problem:
            raise PykataError(f"{path} is not removed: another user could have swapped it "
                              f"({problem})", hint=f"check what {path} is and remove it yourself")
        return claim.remove_own_socket()
    finally:
        claim.release()


def claim_endpoint(path: Path) -> EndpointClaim:
    """The claim a cache serving `path` holds, once nothing stands in its way:
    PykataError when another user could swap the endpoint, a cache serves it,
    or something that is not a socket a dead cache left is there."""
    _check_endpoint_directory(path)
    claim = EndpointClaim.take(path, create=True)
    if claim is None:
        raise PykataError(f"a VM cache already serves {path}",
                          hint="stop it with `pykata factory destroy`, or set another "
                               "[factory] vm_cache_endpoint")
    try:
        if os.path.lexists(path) and not claim.remove_own_socket():
            raise PykataError(
                f"{path} exists and is not a socket a VM cache of pykata left behind: "
                "pykata does not remove it",
                hint="remove it yourself if nothing uses it, or set another [factory] "
                     "vm_cache_endpoint")
    except BaseException:
        claim.release()
        raise
    return claim


def _check_endpoint_directory(path: Path) -> None:
    """The endpoint's directory exists (made private when it did not) and
    only this user or root can change what is in it."""
    if not os.path.lexists(path.parent):
        private_dir(path.parent)
    problem = others_can_replace(path.parent)
    if problem:
        raise PykataError(
            f"the VM cache's endpoint {path} is in a directory another user could change "
            f"({problem}): its socket could be swapped",
            hint="set [factory] vm_cache_endpoint to a path in a directory only root can "
                 "write, such as the default <run root>/factory/cache.sock")


def _record_path(path: Path) -> Path:
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:24]
    return run_root() / "factory" / f"endpoint-{digest}.json"


class EndpointClaim:
    """A cache's claim on its endpoint: a record, in pykata's private run
    root, of the socket it bound there, locked (flock) for as long as the
    cache lives. The lock ends with the process, however it dies: a record
    nobody holds names a socket whose cache is gone. The socket is named by
    device, inode and modification time: a file made later in its place
    may reuse the inode number, not the time it was made."""

    def __init__(self, path: Path, record: Path, fd: int) -> None:
        self.path = path
        self._record = record
        self._fd = fd
        self._bound: tuple[int, int, int] | None = None

    @classmethod
    def take(cls, path: Path, *, create: bool) -> EndpointClaim | None:
        """The claim, locked; None while a live cache holds it (or, unless
        `create`, when there is no record)."""
        record = _record_path(path)
        for _ in range(10):
            fd = _open_record(record, create)
            if fd < 0:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # The one a releasing cache removed while we waited is not the record.
            with contextlib.suppress(FileNotFoundError):
                if _same_file(os.stat(record), os.fstat(fd)):
                    return cls(path, record, fd)
            os.close(fd)
        raise PykataError(f"cannot take {record}: it is replaced over and over",
                          hint="stop whatever else starts VM caches on this endpoint")

    def listen(self) -> socket.socket:
        """Bind the endpoint (0600) and record its socket as this cache's."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            self._bound = _identity(os.lstat(self.path))
            dev, ino, mtime = self._bound
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({"endpoint": str(self.path), "dev": dev, "ino": ino,
                                            "mtime_ns": mtime}).encode(), 0)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return listener

    def remove_own_socket(self) -> bool:
        """Unlink the endpoint if it is the socket this claim's record names."""
        bound = self._bound or self._recorded()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if bound is None or not stat.S_ISSOCK(st.st_mode) or _identity(st) != bound:
            return False
        os.unlink(self.path)
        return True

    def _recorded(self) -> tuple[int, int, int] | None:
        try:
            data = json.loads(os.pread(self._fd, 4096, 0) or b"{}")
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("endpoint") != str(self.path):
            return None
        found = (data.get("dev"), data.get("ino"), data.get("mtime_ns"))
        if not all(isinstance(n, int) for n in found):
            return None
        return found  # type: ignore[return-value]

    def release(self) -> None:
        """Remove this cache's socket (if it is still there) and the record."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.remove_own_socket()
        with contextlib.suppress(OSError):
            self._record.unlink()
        with contextlib.suppress(OSError):
            self._record.parent.rmdir()  # when nothing else of pykata is there
        os.close(self._fd)
        self._fd = -1


def _open_record(record: Path, create: bool) -> int:
    """The record's descriptor; -1 when there is none and `create` is false."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _ in range(10):
        try:
            if create:
                private_dir(record.parent)  # again: a releasing cache may remove it
            return os.open(record, flags, 0o600)
        except FileNotFoundError:
            if not create:
                return -1
    raise PykataError(f"cannot create {record}: its directory is removed over and over")


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns
