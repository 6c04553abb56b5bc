"""Tasks and processes as containerd sees them: status, stdio, exit.

A `ShimProcess` is containerd's view of one process (a task's init, or an
exec): its FIFOs, its status, and its exit, which is recorded only after its
output has been written out to the FIFOs, so that a client that saw the exit
has also seen every byte before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from google.protobuf import timestamp_pb2

from pykata.protocols import shim_pb2, task_types_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.container import Container
from pykata.runtime.lifecycle import OUTPUT_DRAIN_SECONDS, Lifecycle, Status
from pykata.runtime.stdio import StdioRelay
from pykata.shim.events import now
from pykata.shim.fifo import ProcessFifos

log = logging.getLogger(__name__)

# containerd's names for the lifecycle's states.
TASK_STATUS = {
    Status.CREATING: task_types_pb2.UNKNOWN,
    Status.CREATED: task_types_pb2.CREATED,
    Status.RUNNING: task_types_pb2.RUNNING,
    Status.PAUSED: task_types_pb2.PAUSED,
    Status.STOPPED: task_types_pb2.STOPPED,
}



class ShimProcess:
    def __init__(
        self,
        task: Task,
        exec_id: str,
        *,
        terminal: bool,
        stdin: str,
        stdout: str,
        stderr: str,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.exec_id = exec_id
        self.terminal = terminal
        self.paths = (stdin, stdout, stderr)
        self.spec = spec
        self.lifecycle = Lifecycle("process", self.label, Status.CREATED)
        self.exit_status = 0
        self.exited_at: timestamp_pb2.Timestamp | None = None
        self.exited = asyncio.Event()
        self.fifos = ProcessFifos(stdin, stdout, stderr)
        self.relay: StdioRelay | None = None
        self._finishing: asyncio.Task[None] | None = None

    @property
    def agent_exec_id(self) -> str:
        """The process's exec id in the agent: the container id for the init."""
        return self.exec_id or self.task.id

    @property
    def label(self) -> str:
        return f"{self.task.id}/{self.exec_id}" if self.exec_id else self.task.id

    def start_relay(self, agent: AgentClient) -> None:
        relay = StdioRelay(agent, self.task.id, self.agent_exec_id)
        fifos = self.fifos
        relay.start(
            fifos.stdout.write if fifos.stdout else None,
            fifos.stderr.write if fifos.stderr else None,
            fifos.stdin.read if fifos.stdin else None,
            terminal=self.terminal,
        )
        self.relay = relay

    @property
    def finishing(self) -> bool:
        """Its exit is known (perhaps still being recorded)."""
        return self._finishing is not None

    def finish(self, code: int) -> asyncio.Task[None]:
        """Record the exit (once): drain output, close FIFOs, then mark stopped."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish(code))
        return self._finishing

    async def _finish(self, code: int) -> None:
        if self.relay is not None:
            await self.relay.drain(OUTPUT_DRAIN_SECONDS)
            await self.relay.close()
        await self.fifos.close()
        self.exit_status = code
        self.exited_at = now()
        self.lifecycle.move(Status.STOPPED)
        self.exited.set()
        log.info("process %s exited with status %d", self.label, code,
                 extra={"container": self.task.id, "exec_id": self.exec_id})

    async def discard(self) -> None:
        """Release stdio of a process that never ran (or is being deleted)."""
        if self.relay is not None:
            await self.relay.close()
        with contextlib.suppress(Exception):
            await self.fifos.close()

    def state(self, pid: int) -> shim_pb2.StateResponse:
        stdin, stdout, stderr = self.paths
        response = shim_pb2.StateResponse(
            id=self.task.id, bundle=self.task.bundle, pid=pid,
            status=TASK_STATUS[self.lifecycle.status],
            stdin=stdin, stdout=stdout, stderr=stderr, terminal=self.terminal,
            exit_status=self.exit_status, exec_id=self.exec_id,
        )
        if self.exited_at is not None:
            response.exited_at.CopyFrom(self.exited_at)
        return response


class Task:
    """One container of the pod: its init process and its execs."""

    def __init__(self, container: Container, bundle: str) -> None:
        self.id = container.id
        self.container = container
        self.bundle = bundle
        self.init: ShimProcess | None = None
        self.execs: dict[str, ShimProcess] = {}
        self.rootfs_mounted = False

    def processes(self) -> list[ShimProcess]:
        return [p for p in (self.init, *self.execs.values()) if p is not None]
