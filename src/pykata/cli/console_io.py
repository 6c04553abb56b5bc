"""The command line's own stdio as async sources and sinks, and its terminal.

Reads and writes happen on daemon threads: the terminal or pipe stays in
blocking mode (switching it to non-blocking would leak into the user's shell),
and a thread blocked in read() never holds up the command's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sys
import termios
import threading
import tty
from collections.abc import Iterator

_CHUNK = 64 * 1024


class ThreadedReader:
    """An fd read on a daemon thread, as an async `read() -> bytes` (b'' at EOF)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        threading.Thread(target=self._run, name=f"read-fd{fd}", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self._fd, _CHUNK)
            except OSError:
                data = b""
            fut = asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop)
            try:
                fut.result()
            except Exception:
                return
            if not data:
                return

    async def read(self) -> bytes:
        return await self._queue.get()


class ThreadedWriter:
    """An fd written on a daemon thread; `write` returns once the data is queued."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self._done = threading.Event()
        threading.Thread(target=self._run, name=f"write-fd{fd}", daemon=True).start()

    def _run(self) -> None:
        try:
            while (data := self._queue.get()) is not None:
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(self._fd, view)
                    except BrokenPipeError:
                        return
                    view = view[n:]
        finally:
            self._done.set()

    async def write(self, data: bytes) -> None:
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, data)

    async def close(self) -> None:
        """Flush everything queued, then stop the thread."""
        await asyncio.to_thread(self._queue.put, None)
        await asyncio.to_thread(self._done.wait)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put the terminal on `fd` in raw mode for the duration (no-op if not a tty)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int]:
    """(rows, columns) of the controlling terminal, or 24x80."""
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            size = os.get_terminal_size(stream.fileno())
            return size.lines, size.columns
    return 24, 80
