"""The one place pykata talks QMP, through the qemu.qmp library."""

from __future__ import annotations

import contextlib
import logging
import socket

from qemu.qmp import QMPClient

log = logging.getLogger(__name__)


class QmpConnection:
    """A negotiated QMP session over an already-connected socket."""

    def __init__(self, client: QMPClient) -> None:
        self._client = client

    @classmethod
    async def open(cls, sock: socket.socket) -> QmpConnection:
        client = QMPClient("pykata")
        # qemu.qmp logs every failed connection at ERROR; the caller reports.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        await client.connect(sock)
        return cls(client)

    async def execute(self, command: str, **arguments: object) -> object:
        return await self._client.execute(command, arguments or None)

    def send_fd(self, fd: int) -> None:
        """Pass `fd` to QEMU (SCM_RIGHTS); the next `getfd` names it."""
        self._client.send_fd_scm(fd)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()
