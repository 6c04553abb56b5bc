"""QEMU's output streams (guest console, QEMU's stderr) into bounded files.

The guest writes its console as fast as it likes, and a hostile guest can make
QEMU print errors without end: neither may grow a file on the host without
bound. The host reads each stream from a socket or pipe and keeps at most
`limit` bytes of it: when the file reaches half the limit it becomes
`<name>.1` (replacing the older one) and a new file starts. Readers take only
the tail (`read_tail`), never the whole file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


def rolled(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class CappedLog:
    """Copies one stream to `path`, keeping at most `limit` bytes on disk.

    The file is named relative to a descriptor of its directory, opened at
    `start`: a warm VM's directory is renamed when a pod adopts it, and the
    copy must go on (a stream nobody reads stalls its writer: QEMU blocks on
    a full stderr pipe, the guest's serial port on a full console socket).
    """

    def __init__(self, path: Path, limit: int, *, append: bool = False) -> None:
        """`append`: go on with the file that is there (a VM taken over from
        another process keeps its log), rather than start it anew."""
        self.path = path
        self._append_first = append
        self._half = max(4096, limit // 2)
        self._task: asyncio.Task[None] | None = None
        self._dir_fd = -1
        self._fd = -1  # the current file; -1 once writing failed
        self._written = 0

    def start(self, reader: asyncio.StreamReader) -> None:
        self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._task = asyncio.ensure_future(self._copy(reader))
        # Not in _copy's `finally`: a task cancelled before it ran never gets there.
        self._task.add_done_callback(self._release)

    async def _copy(self, reader: asyncio.StreamReader) -> None:
        try:
            self._fd = self._open()
        except OSError as exc:
            log.warning("opening %s: %s; dropping its stream", self.path, exc.strerror)
        while data := await reader.read(_CHUNK):
            if self._fd < 0:
                continue  # the file failed: drain the stream, keep nothing
            try:
                self._append(data)
            except OSError as exc:
                log.warning("writing %s: %s; dropping the rest of its stream",
                            self.path, exc.strerror)
                self._close_file()

    def _release(self, _: object) -> None:
        self._close_file()
        if self._dir_fd >= 0:
            fd, self._dir_fd = self._dir_fd, -1
            os.close(fd)

    def _append(self, data: bytes) -> None:
        """Write `data`, rolling the file over each time it reaches half the limit."""
        while data:
            room = self._half - self._written
            if room <= 0:
                self._close_file()
                os.replace(self.path.name, rolled(self.path).name,
                           src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
                self._fd = self._open()
                continue
            written = os.write(self._fd, data[:room])
            self._written += written
            data = data[written:]

    def _open(self) -> int:
        keep, self._append_first = self._append_first, False
        fd = os.open(self.path.name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                     | (os.O_APPEND if keep else os.O_TRUNC), 0o600, dir_fd=self._dir_fd)
        self._written = os.fstat(fd).st_size if keep else 0
        return fd

    def _close_file(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    async def wait(self, timeout: float) -> None:
        """Wait until the stream ended (its writer exited), up to `timeout` s."""
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def read_tail(path: Path, size: int = 16384) -> bytes:
    """The last `size` bytes of the log at `path`, across a roll-over."""
    data = b""
    for part in (path, rolled(path)):
        try:
            with open(part, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - (size - len(data))))
                data = f.read() + data
        except OSError:
            continue
        if len(data) >= size:
            break
    return data[-size:]
