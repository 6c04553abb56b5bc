"""Writing to non-blocking file descriptors from asyncio, for pipes and FIFOs.

asyncio's write-pipe transport watches a FIFO for readability to notice its
reader going away; on a FIFO opened read-write (as pykata opens stdio FIFOs)
its own unread data would look like that. A plain write loop has no such trap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to non-blocking `fd`, waiting while it is full."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _wake, ready)
            try:
                await ready
            finally:
                with contextlib.suppress(Exception):
                    loop.remove_writer(fd)
            continue
        view = view[n:]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
