"""Receiving a container's pty master from crun over a console socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

from pykata.ttrpc import Code, StatusError


class ConsoleSocket:
    """A listening unix socket crun connects to and sends the pty master on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._sock.setblocking(False)

    async def receive_master(self, timeout: float = 30.0) -> int:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(self._sock), timeout)
        except TimeoutError:
            raise StatusError(Code.INTERNAL, "crun never sent the terminal") from None
        except OSError:
            # Cancelled, then the socket closed under the pending accept:
            # wait_for hands back the accept's error instead of the cancel.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError() from None
            raise
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    _msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 1)
                    break
                except BlockingIOError:
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(conn.fileno(), _wake, ready)
                    try:
                        await asyncio.wait_for(ready, timeout)
                    finally:
                        loop.remove_reader(conn.fileno())
        if not fds:
            raise StatusError(Code.INTERNAL, "crun closed the console socket without a terminal")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
