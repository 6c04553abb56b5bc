"""What the agent imports after its first answer, before a container needs it.

At boot the agent imports only what answering the host takes; the modules
that only containers use (see `containers.DEFERRED_MODULES`) are imported
here once the host's first request is answered, one at a time with the event
loop run in between, so a request that arrives meanwhile waits for at most
one module's import. The host spends that time on its side of the pod (its
shared directory, the sandbox request, the container's bundle), so the first
container finds them imported. A module whose import fails here is left to
fail where it is used, with that request's own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging

from pykata.agent import boot_profile

log = logging.getLogger(__name__)

# If the host's first request does not come (an older host, or one that
# starts with another call), import anyway after this long.
START_AFTER_SECONDS = 2.0


async def warm_up(modules: tuple[str, ...], start_after: float = START_AFTER_SECONDS) -> None:
    """Import `modules` once the first request is answered (or `start_after` passed)."""
    answered = asyncio.Event()
    boot_profile.when("first_request", answered.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(answered.wait(), start_after)
    # One loop turn first: the reply to the first request is written out
    # before any import starts.
    await asyncio.sleep(0)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # its first real use reports it, with that request's error
            log.warning("warm-up: importing %s failed", name, exc_info=True)
        await asyncio.sleep(0)
    boot_profile.mark("agent_warm")
    log.debug("warm-up done: %d modules imported", len(modules))
