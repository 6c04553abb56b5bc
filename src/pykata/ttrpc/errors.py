"""Errors of the ttRPC layer, and the one mapping from exceptions to wire statuses.

The hierarchy::

    TtrpcError
    ├── ProtocolError            a malformed frame, header or payload
    │   └── MessageTooLargeError a message above the 4 MiB limit (size, limit, stream_id)
    ├── ConnectionClosedError    the peer went away; raised ``from`` the root cause
    └── StatusError              a call answered with a non-OK status (code, message)

``asyncio.CancelledError`` is never wrapped in any of these: cancellation always
propagates as itself.
"""

from __future__ import annotations

import asyncio
import enum

from pykata.protocols import status_pb2


class Code(enum.IntEnum):
    """The google.rpc.Code values that ttRPC carries in ``Response.status.code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """Base class of every error raised by `pykata.ttrpc`."""


class ProtocolError(TtrpcError):
    """The peer sent bytes that are not a valid ttRPC frame or message."""


class MessageTooLargeError(ProtocolError):
    """A message is larger than the protocol allows.

    Raised before anything is written when sending, and after the oversized payload
    was discarded when receiving (so the connection is still in sync).
    """

    def __init__(self, size: int, limit: int, stream_id: int | None = None) -> None:
        where = f" on stream {stream_id}" if stream_id is not None else ""
        super().__init__(f"message of {size} bytes{where} exceeds the maximum of {limit} bytes")
        self.size = size
        self.limit = limit
        self.stream_id = stream_id


class ConnectionClosedError(TtrpcError):
    """The connection is gone; ``__cause__`` holds the root cause when there is one."""


class StatusError(TtrpcError):
    """A call finished with a non-OK status.

    The client raises it when a response carries a non-OK status; a server handler
    raises it to answer with a chosen status.
    """

    def __init__(self, code: Code, message: str = "") -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> StatusError:
        """Build the error a client raises for a response's status."""
        try:
            code = Code(status.code)
        except ValueError:
            # A code outside google.rpc.Code: keep the number visible, as UNKNOWN.
            return cls(Code.UNKNOWN, f"unrecognised status code {status.code}: {status.message}")
        return cls(code, status.message)

    def to_status(self) -> status_pb2.Status:
        """The wire status a server sends for this error."""
        return status_pb2.Status(code=int(self.code), message=self.message)


def status_from_exception(exc: BaseException) -> status_pb2.Status:
    """Map an exception raised while serving a request to the status sent to the peer.

    Only the exception's text crosses the wire, never a traceback: the peer may be
    less trusted than we are.
    """
    if isinstance(exc, StatusError):
        return exc.to_status()
    if isinstance(exc, asyncio.TimeoutError):
        return status_pb2.Status(
            code=Code.DEADLINE_EXCEEDED, message=str(exc) or "deadline exceeded"
        )
    if isinstance(exc, asyncio.CancelledError):
        return status_pb2.Status(code=Code.CANCELLED, message=str(exc) or "cancelled")
    if isinstance(exc, NotImplementedError):
        return status_pb2.Status(code=Code.UNIMPLEMENTED, message=str(exc) or "not implemented")
    return status_pb2.Status(code=Code.UNKNOWN, message=str(exc) or type(exc).__name__)
