"""The FIFOs containerd hands a task for its stdio, as async sources and sinks.

- stdout/stderr are opened read-write: the open never blocks or fails for want
  of a reader, and the reader sees end-of-file only when pykata closes them,
  after the last byte of output.
- stdin is opened read-only and non-blocking: until a writer connects, epoll
  reports nothing (no busy loop); when the writer closes, end-of-file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from pykata.errors import PykataError
from pykata.fdio import write_all

log = logging.getLogger(__name__)


class FifoError(PykataError):
    """A stdio FIFO could not be opened."""


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FifoError(f"cannot open stdio FIFO {path}: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL byte in the path
        raise FifoError(f"cannot open stdio FIFO {path!r}: {exc}") from exc


class FifoWriter:
    """An output FIFO; `write` waits while containerd's reader is behind."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = _open(path, os.O_RDWR)

    async def write(self, data: bytes) -> None:
        if self._fd is not None:
            await write_all(self._fd, data)

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class FifoReader:
    """The stdin FIFO; `read` returns b'' at end-of-file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = _open(path, os.O_RDONLY)
        self._reader: asyncio.StreamReader | None = None
        self._transport: asyncio.ReadTransport | None = None

    async def read(self) -> bytes:
        if self._fd < 0 and self._reader is None:
            return b""
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader = asyncio.StreamReader()
            self._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(self._reader),  # type: ignore[arg-type]
                os.fdopen(self._fd, "rb", buffering=0),
            )
        return await self._reader.read(256 * 1024)

    def close(self) -> None:
        """Safe to repeat: the descriptor is closed once."""
        if self._transport is not None:
            self._transport.close()
        elif self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1


class ProcessFifos:
    """stdin/stdout/stderr of one process; any path may be empty (not wanted)."""

    def __init__(self, stdin: str, stdout: str, stderr: str) -> None:
        self.stdin = FifoReader(stdin) if stdin else None
        self.stdout: FifoWriter | None = None
        try:
            self.stdout = FifoWriter(stdout) if stdout else None
            self.stderr = FifoWriter(stderr) if stderr else None
        except BaseException:
            if self.stdin is not None:
                self.stdin.close()
            if self.stdout is not None:
                self.stdout.close_now()
            raise

    async def close(self) -> None:
        """Flush and close the outputs (the reader then sees end-of-file)."""
        for writer in (self.stdout, self.stderr):
            if writer is not None:
                await writer.close()
        self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin is not None:
            self.stdin.close()
