"""The agent's end of the host channel: a named virtio-serial port, or vsock."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from pykata.ttrpc import open_fd_streams

PORT_NAME = "agent.channel.0"
VSOCK_PORT = 1024
_PORTS = Path("/sys/class/virtio-ports")


def find_serial_port(name: str = PORT_NAME, ports: Path = _PORTS) -> Path:
    for entry in sorted(ports.glob("*")):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name} under {ports}")


async def open_serial(name: str = PORT_NAME) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The host's single connection, over the named port."""
    fd = os.open(find_serial_port(name), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    return await open_fd_streams(fd)


def listen_vsock(port: int = VSOCK_PORT) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(8)
    sock.setblocking(False)
    return sock
