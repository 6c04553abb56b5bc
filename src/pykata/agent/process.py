"""One process in a container, as the agent holds it: its stdio and its exit.

The agent owns the host-facing ends of every stdio stream: pipes for plain
processes, the pty master for terminal ones. The host pulls output with
ReadStdout/ReadStderr and pushes input with WriteStdin; output that arrives
after the process exited is still delivered, until end-of-file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import termios

from pykata.fdio import write_all
from pykata.ttrpc import Code, StatusError

log = logging.getLogger(__name__)

# A read larger than this is clamped: a response must fit a ttRPC message.
MAX_READ = 1 << 20


class EndOfStream(StatusError):
    """The stream reached end-of-file. OUT_OF_RANGE, as reading past the end is."""

    def __init__(self) -> None:
        super().__init__(Code.OUT_OF_RANGE, "EOF")


# Plain classes rather than dataclasses: a dataclass compiles its methods at
# import time, and compiling is among the slowest things Python does under
# emulation, on the path of every VM boot.
class Stdio:
    """The agent's ends of a process's streams, and the ends the process gets."""

    def __init__(
        self,
        terminal: bool,
        stdin_w: int | None = None,
        stdout_r: int | None = None,
        stderr_r: int | None = None,
        child_fds: tuple[int | None, int | None, int | None] = (None, None, None),
    ) -> None:
        self.terminal = terminal
        self.stdin_w = stdin_w
        self.stdout_r = stdout_r
        self.stderr_r = stderr_r
        self.child_fds = child_fds

    @classmethod
    def pipes(cls) -> Stdio:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        os.set_blocking(in_w, False)
        return cls(False, in_w, out_r, err_r, (in_r, out_w, err_w))

    @classmethod
    def for_terminal(cls) -> Stdio:
        return cls(True)

    def attach_terminal(self, master: int) -> None:
        os.set_blocking(master, False)
        self.stdin_w = master
        self.stdout_r = os.dup(master)

    def close_child_ends(self) -> None:
        for fd in self.child_fds:
            if fd is not None:
                os.close(fd)
        self.child_fds = (None, None, None)


class _OutputProtocol(asyncio.StreamReaderProtocol):
    """A pty master reads EIO once the last slave closed: that is the end of
    the output, not an error. Reported as an error, it would also discard
    what was read but not yet asked for (an exec's output, when the host's
    first read comes after the process already exited)."""

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.EIO:
            exc = None
        super().connection_lost(exc)


class Process:
    def __init__(self, container_id: str, exec_id: str, stdio: Stdio) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.pid = 0
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._readers: dict[str, asyncio.StreamReader] = {}
        self._transports: list[asyncio.BaseTransport] = []
        self._stdin_lock = asyncio.Lock()

    async def open_streams(self) -> None:
        """Start reading the output fds (after the process exists)."""
        loop = asyncio.get_running_loop()
        for name in ("stdout", "stderr"):
            fd = getattr(self.stdio, f"{name}_r")
            if fd is None:
                continue
            # From here on the transport owns the fd (and closes it).
            setattr(self.stdio, f"{name}_r", None)
            reader = asyncio.StreamReader(limit=MAX_READ)
            transport, _ = await loop.connect_read_pipe(
                lambda r=reader: _OutputProtocol(r),  # type: ignore[misc]
                os.fdopen(fd, "rb", buffering=0),
            )
            self._readers[name] = reader
            self._transports.append(transport)

    async def read(self, stream: str, length: int) -> bytes:
        reader = self._readers.get(stream)
        if reader is None:
            raise EndOfStream()
        try:
            data = await reader.read(max(1, min(length, MAX_READ)))
        except OSError as exc:
            # A pty master reads EIO once the last slave fd is closed.
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            raise EndOfStream()
        return data

    async def write_stdin(self, data: bytes) -> int:
        fd = self.stdio.stdin_w
        if fd is None:
            raise StatusError(Code.FAILED_PRECONDITION, "stdin of this process is closed")
        async with self._stdin_lock:
            try:
                await write_all(fd, data)
            except BrokenPipeError:
                raise StatusError(
                    Code.FAILED_PRECONDITION, "the process closed its stdin"
                ) from None
        return len(data)

    def close_stdin(self) -> None:
        fd = self.stdio.stdin_w
        if fd is None:
            return
        if self.stdio.terminal:
            # The master is also the output: send end-of-file (^D) instead.
            with contextlib.suppress(OSError):
                os.write(fd, b"\x04")
            return
        self.stdio.stdin_w = None
        os.close(fd)

    def resize(self, rows: int, columns: int) -> None:
        fd = self.stdio.stdin_w
        if not self.stdio.terminal or fd is None:
            raise StatusError(Code.FAILED_PRECONDITION, "the process has no terminal")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def close(self) -> None:
        """Release every fd; pending reads end with end-of-file."""
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        # Output ends no transport took over: the process never got that far
        # (a create that crun refused), and they would leak with each one.
        for attr in ("stdin_w", "stdout_r", "stderr_r"):
            fd = getattr(self.stdio, attr)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self.stdio, attr, None)
        self.stdio.close_child_ends()
