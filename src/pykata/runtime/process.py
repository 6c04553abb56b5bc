"""A process of a pod, as the host sees it: its status, its stdio and its exit.

A process's exit is recorded only after its output has reached the front
end's sinks and they are closed (`finish`), so a client that saw the exit
has seen every byte before it. The container's init process carries the
container's status; an exec'd process has a status of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from pykata.runtime.agent_client import AgentClient
from pykata.runtime.lifecycle import OUTPUT_DRAIN_SECONDS, Lifecycle, Status
from pykata.runtime.stdio import Sink, Source, StdioRelay

log = logging.getLogger(__name__)


class ProcessIO(Protocol):
    """A process's stdio on the host, as its front end keeps it (FIFOs for
    containerd, inherited descriptors or a pty for the OCI command line, the
    user's terminal for `pykata run`). A stream left None is not wanted."""

    @property
    def stdout(self) -> Sink | None: ...

    @property
    def stderr(self) -> Sink | None: ...

    @property
    def stdin(self) -> Source | None: ...

    async def close(self) -> None:
        """The output is complete: let the reader see its end."""

    def close_stdin(self) -> None:
        """No more input will be read."""


class PodProcess:
    """One process: a container's init (`exec_id` ""), or an exec'd one.

    `io` None: the process's stdio is relayed by another host process
    through the pod's control socket (`pykata-oci exec`), not by the owner."""

    def __init__(self, container_id: str, exec_id: str, *, terminal: bool,
                 io: ProcessIO | None, spec: dict[str, Any] | None = None,
                 stdio_paths: tuple[str, str, str] = ("", "", "")) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.terminal = terminal
        self.io = io
        self.spec = spec
        # What the front end named the stdio by (containerd's FIFO paths).
        self.stdio_paths = stdio_paths
        kind = "process" if exec_id else "container"
        self.lifecycle = Lifecycle(kind, self.label, Status.CREATED)
        self.exit_status = 0
        self.exited_at = 0.0  # wall clock, once exited
        self.exited = asyncio.Event()
        # The host process standing for it (pykata-oci's exec relay), 0 if none.
        self.host_pid = 0
        self.relay: StdioRelay | None = None
        self._finishing: asyncio.Task[None] | None = None

    @property
    def agent_exec_id(self) -> str:
        """The process's exec id in the agent: the container id for the init."""
        return self.exec_id or self.container_id

    @property
    def label(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def status(self) -> Status:
        return self.lifecycle.status

    def start_relay(self, agent: AgentClient) -> None:
        """Relay the process's stdio (once it exists in the guest)."""
        if self.io is None or self.relay is not None:
            return
        relay = StdioRelay(agent, self.container_id, self.agent_exec_id)
        relay.start(self.io.stdout, self.io.stderr, self.io.stdin, terminal=self.terminal)
        self.relay = relay

    @property
    def finishing(self) -> bool:
        """Its exit is known (perhaps still being recorded)."""
        return self._finishing is not None

    def finish(self, code: int, announce: Callable[[PodProcess], None] | None = None
               ) -> asyncio.Task[None]:
        """Record the exit (once): drain its output, close its stdio, mark it
        stopped, `announce` it, and only then wake its waiters."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish(code, announce))
        return self._finishing

    async def _finish(self, code: int, announce: Callable[[PodProcess], None] | None
                      ) -> None:
        if self.relay is not None:
            await self.relay.drain(OUTPUT_DRAIN_SECONDS)
            await self.relay.close()
        if self.io is not None:
            with contextlib.suppress(Exception):
                await self.io.close()
        self.exit_status = code
        self.exited_at = time.time()
        self.lifecycle.move(Status.STOPPED)
        try:
            if announce is not None:
                announce(self)
        finally:
            self.exited.set()
        log.info("process %s exited with status %d", self.label, code,
                 extra={"container": self.container_id, "exec_id": self.exec_id})

    async def discard(self) -> None:
        """Release the stdio of a process that is being deleted (or never ran)."""
        if self.relay is not None:
            await self.relay.close()
        if self.io is not None:
            with contextlib.suppress(Exception):
                await self.io.close()
            self.io.close_stdin()
