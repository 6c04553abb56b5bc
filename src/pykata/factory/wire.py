"""Messages between the VM cache, its warm pod monitors and the shims that
ask it for VMs: one JSON object per SOCK_SEQPACKET message, with descriptors
(pidfds) passed alongside as SCM_RIGHTS.

Both ends are local root processes, but a message is still checked: its size
is bounded, a truncated one is refused, and descriptors that come with a
message nobody expects are closed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import socket
import struct
from typing import Any

MAX_MESSAGE = 65536
MAX_FDS = 8
# getsockopt: a pidfd of a unix socket's peer (Linux 6.5; not in Python 3.11).
_SO_PEERPIDFD = 77


class WireError(Exception):
    """A message that is not one the other side sends."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"a message of {len(data)} bytes is too large")
    socket.send_fds(sock, [data], fds or [])


def _recv_now(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise WireError("a truncated message")
    if not data:
        close_fds(fds)
        raise EOFError("the other side closed the connection")
    try:
        message = json.loads(data)
    except ValueError:
        close_fds(fds)
        raise WireError("a message that is not JSON") from None
    if not isinstance(message, dict):
        close_fds(fds)
        raise WireError("a message that is not an object")
    return message, fds


async def recv(sock: socket.socket, timeout: float | None = None
               ) -> tuple[dict[str, Any], list[int]]:
    """The next message and its descriptors (the caller closes them);
    EOFError when the other side is gone."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    sock.setblocking(False)
    while True:
        try:
            return _recv_now(sock)
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = ready) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait_for(ready, remaining)
        finally:
            loop.remove_reader(sock.fileno())


def peer_uid_pid(sock: socket.socket) -> tuple[int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return uid, pid


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class PeerGone(Exception):
    """The process at the other end of a request cannot be watched."""


def requester_pidfd(conn: socket.socket, pid: int) -> int:
    """A pidfd of the process that sent the request on `conn` (the shim the
    adopted VM lives as long as); PeerGone when it is gone or cannot be
    named from here."""
    try:
        pidfd: int = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise PeerGone(f"the requesting process is gone ({exc.strerror})") from None
        # A kernel before 6.5: by the pid it had when it connected.
        pidfd = _pidfd_by_pid(pid)
    if exited(pidfd):
        os.close(pidfd)
        raise PeerGone("the requesting process is gone")
    return pidfd


def _pidfd_by_pid(pid: int) -> int:
    if pid <= 0:
        raise PeerGone("the requesting process is in a PID namespace the VM cache "
                          "cannot see into")
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise PeerGone("the requesting process is gone") from None
    except OSError as exc:
        raise PeerGone(f"the requesting process {pid} cannot be watched "
                          f"({exc.strerror})") from None


def exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


