"""ttRPC for pykata: containerd's lightweight RPC protocol over asyncio streams.

The shim serves containerd's task service with it, and the host talks to the guest
agent with it. Layers, each importable alone: `errors` → `framing` (pure frame
encoding) → `protocol` (frames over a byte stream) → `client` and `server`.

This package is imported on the container start path and by the guest agent, so it
imports nothing beyond the standard library's asyncio family and protobuf.
"""

from __future__ import annotations

import logging

from pykata.ttrpc.client import Client, ClientState
from pykata.ttrpc.errors import (
    Code,
    ConnectionClosedError,
    MessageTooLargeError,
    ProtocolError,
    StatusError,
    TtrpcError,
    status_from_exception,
)
from pykata.ttrpc.framing import MAX_MESSAGE_SIZE
from pykata.ttrpc.protocol import open_fd_streams
from pykata.ttrpc.server import PeerCredentials, RequestContext, Server

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "ClientState",
    "Code",
    "ConnectionClosedError",
    "MessageTooLargeError",
    "PeerCredentials",
    "ProtocolError",
    "RequestContext",
    "Server",
    "StatusError",
    "TtrpcError",
    "open_fd_streams",
    "status_from_exception",
]
