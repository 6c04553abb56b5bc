"""Host descriptors a guest process's stdio is relayed to: pipes, files, ptys.

The OCI command line hands a container the descriptors it was started with,
or a pty whose master went to the caller's console socket. Reads and writes
run on daemon threads so the descriptors stay in blocking mode (they are
shared with the caller) and a read blocked forever never holds up an exit.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import queue
import socket
import struct
import termios
import threading
import time
import tty

from pykata.errors import PykataError

_CHUNK = 64 * 1024


class ConsoleSocketError(PykataError):
    """The caller's --console-socket could not take the terminal."""


class FdReader:
    """`read() -> bytes` of an fd, b'' at end of file (or when it fails: a pty
    whose master was closed reads EIO, which for the container is an end)."""

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
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
            except Exception:
                return
            if not data:
                return

    async def read(self) -> bytes:
        return await self._queue.get()


class FdWriter:
    """Writes to an fd in order; `close` returns once all of it is written.
    A reader that went away (EPIPE, EIO) ends the writing: what is left has
    nobody to read it."""

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
                        view = view[os.write(self._fd, view):]
                    except OSError:
                        return
        finally:
            self._done.set()

    async def write(self, data: bytes) -> None:
        if self._done.is_set():
            return
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            await asyncio.to_thread(self._put, data)

    def _put(self, data: bytes | None) -> None:
        while not self._done.is_set():
            try:
                self._queue.put(data, timeout=0.5)
                return
            except queue.Full:
                continue

    async def close(self, timeout: float | None = None) -> None:
        """Write out what is queued (for at most `timeout` seconds), then stop."""
        await asyncio.to_thread(self._put, None)
        await asyncio.to_thread(self._done.wait, timeout)


def open_pty() -> tuple[int, int]:
    """A new pty pair (master, slave), the slave raw: the guest's terminal
    does the line discipline, the host side only carries bytes."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_inheritable(master, False)
    return master, slave


def send_console(socket_path: str, master: int, slave: int) -> None:
    """Send the pty master over the caller's console socket, as runc does:
    one message carrying the terminal's name (/dev/pts/N), the master as
    SCM_RIGHTS."""
    try:
        name = os.ttyname(slave)
    except OSError:
        name = "/dev/ptmx"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(10)
    try:
        sock.connect(socket_path)
        socket.send_fds(sock, [name.encode()], [master])
    except OSError as exc:
        raise ConsoleSocketError(
            f"console socket {socket_path}: {exc.strerror or exc}",
            hint="pass the path of a unix socket that a process listens on") from None
    finally:
        sock.close()


def wait_read(master: int, timeout: float) -> None:
    """Wait until the caller has read what the container wrote to its pty.

    Linux drops what the master has not read yet when the last slave closes,
    so a container's last words would be lost if the relay closed at once;
    the relay keeps a copy of the master to ask how much is left."""
    deadline = time.monotonic() + timeout
    buf = array.array("i", [0])
    while time.monotonic() < deadline:
        try:
            fcntl.ioctl(master, termios.FIONREAD, buf, True)
        except OSError:
            return
        if buf[0] == 0:
            return
        time.sleep(0.01)


def make_controlling(fd: int) -> None:
    """Make the terminal on `fd` this session's controlling terminal, so that
    a resize of its master sends this process SIGWINCH. The caller is a
    session leader (after setsid)."""
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


def window_size(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal on `fd`, None if it is not one."""
    buf = array.array("H", [0, 0, 0, 0])
    try:
        fcntl.ioctl(fd, termios.TIOCGWINSZ, buf, True)
    except OSError:
        return None
    rows, cols = buf[0], buf[1]
    return (rows, cols) if rows and cols else None


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
