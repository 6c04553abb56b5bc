"""Every task RPC of the shim logs its call and answers pykata's errors with
the status codes containerd turns into its error kinds (the one table:
`runtime.error_codes`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pykata.errors import PykataError
from pykata.runtime.error_codes import to_status
from pykata.ttrpc import StatusError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


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
