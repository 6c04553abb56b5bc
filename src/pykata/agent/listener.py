"""The agent's vsock listener: only the runtime that started this VM gets in.

Over vsock the agent's port is reachable by every process on the host (a
guest's context id is on QEMU's command line, world-readable), and a process
that reached the agent would own the pod: its containers, rootfs and volumes.
So a connection is served only if
- it comes from the host (context id 2), and
- its first bytes are this VM's token: 32 random bytes the runtime handed to
  QEMU at boot through a virtio-serial port backed by a socketpair, which no
  other host process can read;
and only one connection is served at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Callable

from pykata.channels import TOKEN_SIZE
from pykata.ttrpc import Server

log = logging.getLogger(__name__)

VMADDR_CID_HOST = 2
# How long a new connection may take to present its token.
_TOKEN_TIMEOUT = 5.0


def from_host(address: object) -> bool:
    """Whether a vsock peer address (cid, port) is the host's."""
    return isinstance(address, tuple) and len(address) == 2 and address[0] == VMADDR_CID_HOST


class AuthenticatedListener:
    def __init__(self, server: Server, token: bytes,
                 peer_ok: Callable[[object], bool] = from_host) -> None:
        if len(token) != TOKEN_SIZE:
            raise ValueError(f"the token must be {TOKEN_SIZE} bytes")
        self._server = server
        self._token = token
        self._peer_ok = peer_ok
        self._busy = False
        self.refused = 0

    async def serve(self, listener: socket.socket) -> None:
        """Accept on `listener` (non-blocking, listening) until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(listener)
            if not self._peer_ok(address) or self._busy:
                why = "one connection at a time" if self._busy else "not from the host"
                self._refuse(conn, f"connection from {address!r} refused: {why}")
                continue
            self._busy = True
            task = asyncio.ensure_future(self._serve_one(conn))
            task.add_done_callback(lambda _t: self._release())

    def _release(self) -> None:
        self._busy = False

    def _refuse(self, conn: socket.socket, why: str) -> None:
        self.refused += 1
        log.warning("%s", why)
        conn.close()

    async def _serve_one(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            offered = await asyncio.wait_for(reader.readexactly(TOKEN_SIZE), _TOKEN_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            offered = b""
        if not hmac.compare_digest(offered, self._token):
            self.refused += 1
            log.warning("connection refused: it did not present this VM's token")
            writer.close()
            return
        await self._server.serve_connection(reader, writer)
