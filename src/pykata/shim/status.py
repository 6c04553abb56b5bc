"""pykata's errors as the ttRPC status codes containerd turns into its error kinds."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pykata.errors import (
    AgentError,
    AlreadyExistsError,
    AssetsError,
    ConfigError,
    ContainerError,
    HostError,
    InvalidStateError,
    NetworkError,
    NotFoundError,
    PykataError,
    SpecError,
)
from pykata.ttrpc import Code, StatusError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_CODES: list[tuple[type[PykataError], Code]] = [
    (NotFoundError, Code.NOT_FOUND),
    (InvalidStateError, Code.FAILED_PRECONDITION),
    (AlreadyExistsError, Code.ALREADY_EXISTS),
    (SpecError, Code.INVALID_ARGUMENT),
    (ConfigError, Code.INVALID_ARGUMENT),
    (AssetsError, Code.FAILED_PRECONDITION),
    (HostError, Code.FAILED_PRECONDITION),
    (NetworkError, Code.FAILED_PRECONDITION),
    (ContainerError, Code.FAILED_PRECONDITION),
]


def to_status(exc: PykataError) -> StatusError:
    if isinstance(exc, AgentError) and exc.code is not None:
        try:
            return StatusError(Code(exc.code), str(exc))
        except ValueError:
            pass
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return StatusError(code, str(exc))
    return StatusError(Code.UNKNOWN, str(exc))


def not_found(what: str) -> StatusError:
    return StatusError(Code.NOT_FOUND, f"{what} does not exist")


def precondition(message: str) -> StatusError:
    return StatusError(Code.FAILED_PRECONDITION, message)


def rpc(method: F) -> F:
    """Log the call and translate pykata's errors, in one place for every RPC."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, ctx: Any) -> Any:
        name = method.__name__
        ident = getattr(request, "id", "")
        log.debug("%s %s", name, ident, extra={"container": ident})
        try:
            return await method(self, request, ctx)
        except StatusError as exc:
            log.info("%s %s: %s", name, ident, exc, extra={"container": ident})
            raise
        except PykataError as exc:
            log.error("%s %s failed: %s", name, ident, exc, extra={"container": ident})
            raise to_status(exc) from exc

    return wrapper  # type: ignore[return-value]
