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
    """Copies one stream to `path`, keeping at most `limit` bytes on disk."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self._half = max(4096, limit // 2)
        self._task: asyncio.Task[None] | None = None

    def start(self, reader: asyncio.StreamReader) -> None:
        self._task = asyncio.ensure_future(self._copy(reader))

    async def _copy(self, reader: asyncio.StreamReader) -> None:
        fd = self._open()
        written = 0
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                while data:
                    room = self._half - written
                    if room <= 0:
                        os.close(fd)
                        os.replace(self.path, rolled(self.path))
                        fd, written = self._open(), 0
                        continue
                    part, data = data[:room], data[room:]
                    os.write(fd, part)
                    written += len(part)
        except OSError as exc:
            log.warning("writing %s: %s", self.path, exc.strerror)
        finally:
            os.close(fd)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

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
