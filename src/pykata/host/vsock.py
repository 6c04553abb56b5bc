"""The host's end of the vsock agent channel (hosts with /dev/vhost-vsock).

The guest's agent listens on vsock port 1024 once it is up; until then a
connect is refused or reset, so the host retries until the deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Callable

from pykata.channels import AGENT_VSOCK_PORT as AGENT_PORT

# Context ids 0-2 are reserved (hypervisor, local, host); 0xFFFFFFFF is "any".
_CID_RANGE = (3, 0xFFFFFFFE)
_RETRY_SECONDS = 0.05


def pick_cid() -> int:
    low, high = _CID_RANGE
    return low + secrets.randbelow(high - low)


def _connect_once(cid: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect((cid, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(
    cid: int,
    timeout: float,
    *,
    port: int = AGENT_PORT,
    connect_once: Callable[[int, int], socket.socket] = _connect_once,
) -> socket.socket:
    """A connected socket to the guest's agent; TimeoutError after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await asyncio.to_thread(connect_once, cid, port)
        except OSError as exc:
            if loop.time() >= deadline:
                raise TimeoutError(f"no agent on vsock {cid}:{port}: {exc.strerror}") from exc
        await asyncio.sleep(_RETRY_SECONDS)
