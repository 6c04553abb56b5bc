"""Who reaches the agent over vsock: only the runtime that started the VM.

This machine has no /dev/vhost-vsock, so no VM here can serve vsock; these
tests run the agent's real listener and ttRPC server on a unix socket, which
behaves the same to the listener (the peer check gets each peer's address).
A hostile host process connects without the token, with a wrong one, from a
peer that is not the host, and while the runtime is connected.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from pykata.agent.listener import AuthenticatedListener, from_host
from pykata.agent.service import HealthService
from pykata.channels import TOKEN_SIZE
from pykata.protocols import health_pb2
from pykata.ttrpc import Client, ConnectionClosedError, Server

TOKEN = bytes(range(TOKEN_SIZE))


async def _listener(tmp_path: Path, peer_ok: object = None) -> tuple[
        AuthenticatedListener, asyncio.Task[None], str]:
    server = Server()
    server.register_object("grpc.Health", HealthService(), {"Check": health_pb2.CheckRequest})
    auth = AuthenticatedListener(server, TOKEN, peer_ok or (lambda _address: True))  # type: ignore[arg-type]
    path = str(tmp_path / "agent.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    sock.setblocking(False)
    return auth, asyncio.ensure_future(auth.serve(sock)), path


async def _check(path: str, preamble: bytes, timeout: float = 5) -> bool:
    """Connect, send `preamble`, then Health.Check; whether it was answered."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(preamble)
    client = Client(reader, writer)
    try:
        await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                          health_pb2.HealthCheckResponse, timeout=timeout)
        return True
    except ConnectionClosedError:
        return False
    finally:
        await client.aclose()


async def test_only_a_connection_with_the_token_is_served(tmp_path: Path) -> None:
    """No token, a wrong token, or a short one: the connection is closed
    without an answer. The right token: served."""
    auth, task, path = await _listener(tmp_path)
    try:
        assert not await _check(path, b"")
        assert not await _check(path, bytes(TOKEN_SIZE))
        assert not await _check(path, TOKEN[:16])
        assert await _check(path, TOKEN)
        assert auth.refused == 3
    finally:
        task.cancel()


async def test_a_second_connection_is_refused_while_one_is_served(tmp_path: Path) -> None:
    """The runtime holds the agent's one connection: another process that got
    the token some other way still cannot get in beside it."""
    _, task, path = await _listener(tmp_path)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(TOKEN)
        runtime = Client(reader, writer)
        await runtime.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                           health_pb2.HealthCheckResponse, timeout=5)
        assert not await _check(path, TOKEN)
        await runtime.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                           health_pb2.HealthCheckResponse, timeout=5)
        await runtime.aclose()
        await asyncio.sleep(0.1)
        assert await _check(path, TOKEN)  # the runtime reconnecting
    finally:
        task.cancel()


async def test_peers_other_than_the_host_are_refused(tmp_path: Path) -> None:
    """A peer the address check refuses (over vsock: any context id but the
    host's 2, such as another VM) is closed before it may send anything."""
    auth, task, path = await _listener(tmp_path, peer_ok=lambda _address: False)
    try:
        assert not await _check(path, TOKEN)
        assert auth.refused == 1
    finally:
        task.cancel()
    assert from_host((2, 51234))
    assert not from_host((3, 51234)) and not from_host((1, 1)) and not from_host("2")
