"""The agent's end of the host channel: a named virtio-serial port, or vsock."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from pykata.channels import AGENT_PORT_NAME as PORT_NAME
from pykata.channels import AGENT_VSOCK_PORT as VSOCK_PORT
from pykata.channels import TOKEN_PORT_NAME, TOKEN_SIZE
from pykata.ttrpc import open_fd_streams

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


def read_token(name: str = TOKEN_PORT_NAME) -> bytes:
    """This VM's token, which the host wrote to the token port before boot."""
    fd = os.open(find_serial_port(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        token = b""
        while len(token) < TOKEN_SIZE:
            chunk = os.read(fd, TOKEN_SIZE - len(token))
            if not chunk:
                raise EOFError(f"the token port {name} closed after {len(token)} bytes")
            token += chunk
    finally:
        os.close(fd)
    return token
