"""Relaying a guest process's stdio to host-side sinks and from a host source.

Output is pulled with ReadStdout/ReadStderr, one call in flight per stream,
each call written to its sink before the next is made: nothing is reordered
and nothing is dropped. Input is pushed with WriteStdin in order; its end is
sent as CloseStdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pykata.errors import PykataError
from pykata.runtime.agent_client import AgentClient, StreamEnd

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
Sink = Callable[[bytes], Awaitable[None]]
Source = Callable[[], Awaitable[bytes]]


async def pump_output(
    agent: AgentClient, stream: str, cid: str, exec_id: str, sink: Sink
) -> None:
    """Copy `stream` ("stdout"/"stderr") to `sink` until end-of-file."""
    while True:
        try:
            data = await agent.read_stream(stream, cid, exec_id, READ_CHUNK)
        except StreamEnd:
            return
        await sink(data)


async def pump_input(agent: AgentClient, cid: str, exec_id: str, source: Source) -> None:
    """Copy `source` to the process's stdin until `source` returns b'', then close it."""
    try:
        while True:
            data = await source()
            if not data:
                break
            await agent.write_stdin(cid, exec_id, data)
    except PykataError as exc:
        # The process exited or closed its stdin: the rest of the input has
        # nowhere to go, which is not an error of the run.
        log.debug("stdin of %s/%s: %s", cid, exec_id, exc)
        return
    with contextlib.suppress(PykataError):
        await agent.close_stdin(cid, exec_id)


async def _no_input() -> bytes:
    return b""


class StdioRelay:
    """The pumps of one process; `drain` waits for its output to end."""

    def __init__(self, agent: AgentClient, cid: str, exec_id: str) -> None:
        self._agent = agent
        self._cid = cid
        self._exec_id = exec_id
        self._outputs: list[asyncio.Task[None]] = []
        self._input: asyncio.Task[None] | None = None

    def start(
        self, stdout: Sink | None, stderr: Sink | None, stdin: Source | None,
        *, terminal: bool = False,
    ) -> None:
        """Start the pumps. Without a `stdin` source the process's stdin is
        closed at once (it reads end-of-file), except on a terminal, which
        stays open as an idle terminal does."""
        if stdin is None and not terminal:
            stdin = _no_input
        for name, sink in (("stdout", stdout), ("stderr", stderr)):
            if sink is not None:
                self._outputs.append(asyncio.ensure_future(
                    pump_output(self._agent, name, self._cid, self._exec_id, sink)
                ))
        if stdin is not None:
            self._input = asyncio.ensure_future(
                pump_input(self._agent, self._cid, self._exec_id, stdin)
            )

    async def finish_input(self, grace: float) -> bool:
        """The client will send no more input: let what it already sent through.

        Waits up to `grace` seconds for the input pump to reach end-of-file
        (it then closes the process's stdin itself) and returns True; after
        that it stops the pump and returns False, and the caller closes stdin.
        """
        if self._input is None:
            return False
        done, _ = await asyncio.wait({self._input}, timeout=grace)
        if done:
            return True
        self._input.cancel()
        await asyncio.gather(self._input, return_exceptions=True)
        self._input = None
        return False

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every output stream reached end-of-file (or `timeout`)."""
        if self._outputs:
            await asyncio.wait(self._outputs, timeout=timeout)

    async def close(self) -> None:
        tasks = [*self._outputs, *([self._input] if self._input else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
