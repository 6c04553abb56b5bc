"""A deterministic writer for the cpio "newc" format the kernel unpacks as initramfs.

Written in Python rather than driving the `cpio` tool so that the archive can hold
device nodes (`/dev/console` must exist before the kernel starts `/init`) without
`mknod` on the host, and so that the same inputs always give the same bytes:
entries are written sorted by path, with mtime 0, uid/gid 0 and inode numbers
counted from 1. Format: the kernel's Documentation/driver-api/early-userspace/
buffer-format.rst ("newc", magic 070701, 4-byte alignment, a TRAILER!!! entry).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_COPY_CHUNK = 1 << 20


class Sink(Protocol):
    """Where an archive is written: a binary file, or a gzip stream."""

    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class Entry:
    """One archive member. `path` is relative (no leading '/'), as the kernel expects."""

    path: str
    mode: int  # file type bits and permission bits, as in st_mode
    data: bytes | None = None  # regular file content held in memory
    source: Path | None = None  # regular file content read from the host at write time
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _normalize(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid archive path: {path!r}")
    return "/".join(parts)


class Archive:
    """An in-memory list of entries, written out sorted.

    Adding a path twice replaces the earlier entry; missing parent directories
    are created (mode 0755) when the archive is written.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        """The number of entries written, implicit parent directories included."""
        return len(self.entries())

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and _normalize(path) in self._entries

    def add(self, entry: Entry) -> None:
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self.add(Entry(_normalize(path), stat.S_IFDIR | mode))

    def add_data(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.add(Entry(_normalize(path), stat.S_IFREG | mode, data=data))

    def add_file(self, path: str, source: Path, mode: int | None = None) -> None:
        """A regular file whose content is copied from `source` (symlinks followed)."""
        if mode is None:
            mode = stat.S_IMODE(source.stat().st_mode)
        self.add(Entry(_normalize(path), stat.S_IFREG | mode, source=source))

    def add_symlink(self, path: str, target: str) -> None:
        self.add(Entry(_normalize(path), stat.S_IFLNK | 0o777, data=target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(Entry(_normalize(path), stat.S_IFCHR | mode, rdev=(major, minor)))

    def entries(self) -> list[Entry]:
        """All entries, implicit parent directories included, sorted by path.

        Sorting puts every directory before its contents ("a" < "a/b"), which
        the kernel's unpacker needs.
        """
        entries = dict(self._entries)
        for path in self._entries:
            parent = path.rpartition("/")[0]
            while parent and parent not in entries:
                entries[parent] = Entry(parent, stat.S_IFDIR | 0o755)
                parent = parent.rpartition("/")[0]
        return [entries[p] for p in sorted(entries)]

    def write(self, out: Sink) -> int:
        """Write the archive; returns the number of bytes written."""
        writer = _Writer(out)
        for ino, entry in enumerate(self.entries(), start=1):
            writer.write_entry(entry, ino)
        writer.write_trailer()
        return writer.offset


def header(
    *,
    name: str,
    ino: int,
    mode: int,
    nlink: int,
    filesize: int,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """The 110-byte newc header followed by the NUL-terminated name, padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime
        filesize,
        0,  # devmajor: of the filesystem holding the file, meaningless here
        0,  # devminor
        rdev[0],  # rdevmajor: of a device node
        rdev[1],  # rdevminor
        len(encoded),  # namesize, the NUL included
        0,  # check: only used by the "crc" variant
    )
    raw = MAGIC + b"".join(b"%08X" % f for f in fields) + encoded
    return raw + b"\0" * (-len(raw) % 4)


class _Writer:
    def __init__(self, out: Sink) -> None:
        self._out = out
        self.offset = 0

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.offset += len(data)

    def _pad(self) -> None:
        self._emit(b"\0" * (-self.offset % 4))

    def write_entry(self, entry: Entry, ino: int) -> None:
        size = entry.source.stat().st_size if entry.source else len(entry.data or b"")
        nlink = 2 if entry.is_dir else 1
        self._emit(
            header(
                name=entry.path,
                ino=ino,
                mode=entry.mode,
                nlink=nlink,
                filesize=size,
                rdev=entry.rdev,
            )
        )
        if entry.source is not None:
            copied = 0
            for chunk in _read_chunks(entry.source):
                self._emit(chunk)
                copied += len(chunk)
            if copied != size:
                # The file changed while it was being archived: the header
                # already promised `size` bytes, so the archive would be corrupt.
                raise OSError(f"{entry.source} changed size while being archived")
        elif entry.data:
            self._emit(entry.data)
        self._pad()

    def write_trailer(self) -> None:
        self._emit(header(name=TRAILER, ino=0, mode=0, nlink=1, filesize=0))


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            yield chunk


def host_mode(path: Path) -> int:
    """Permission bits of a host file, reduced to 0755 or 0644 for determinism."""
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644
