"""A host process standing for an exec'd process (runc exec --pid-file): it
relays the process's stdio through the pod's control socket, passes the
signals it gets on to the process, and exits with its exit status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from typing import Any

from pykata.errors import PykataError
from pykata.host import hostio
from pykata.oci.monitor import FORWARDED_SIGNALS, WRITE_OUT_SECONDS
from pykata.runtime.control_client import PodClient
from pykata.runtime.lifecycle import OUTPUT_DRAIN_SECONDS, VM_DIED_STATUS
from pykata.runtime.stdio import StdioRelay


async def relay_exec(socket_path: str, container_id: str, exec_id: str,
                     process: dict[str, Any], stdio: tuple[int, int, int], terminal: bool,
                     on_started: Any = None, pty_master: int = -1) -> int:
    """Start `process` in the container and relay it until it exits; returns
    its exit status. `on_started()` is called once it runs (or with the
    error that stopped it from starting, which is then raised)."""
    client = await PodClient.connect(socket_path, f"container {container_id}")
    pending: set[asyncio.Task[Any]] = set()
    loop = asyncio.get_running_loop()
    writers: list[hostio.FdWriter] = []
    relay: StdioRelay | None = None
    try:
        try:
            await client.exec(container_id, exec_id, json.dumps(process).encode(), os.getpid())
        except PykataError as exc:
            if on_started is not None:
                on_started(exc)
            raise
        agent = client.agent

        def spawn(coro: Any) -> None:
            task = asyncio.ensure_future(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)

        def forward(signum: int) -> None:
            spawn(_quiet(agent.signal_process(container_id, exec_id, signum)))

        def resize() -> None:
            size = hostio.window_size(stdio[0]) if terminal else None
            if size is not None:
                spawn(_quiet(agent.resize(container_id, exec_id, *size)))

        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, forward, sig)
        loop.add_signal_handler(signal.SIGWINCH, resize)
        out = hostio.FdWriter(stdio[1])
        writers.append(out)
        err = None if terminal else hostio.FdWriter(stdio[2])
        if err is not None:
            writers.append(err)
        relay = StdioRelay(agent, container_id, exec_id)
        relay.start(out.write, err.write if err else None, hostio.FdReader(stdio[0]).read,
                    terminal=terminal)
        resize()
        if on_started is not None:
            on_started(None)
        try:
            code = await agent.wait_process(container_id, exec_id)
        except PykataError:
            # The monitor (and with it the VM) went away: the process is gone.
            code = VM_DIED_STATUS
        await relay.drain(OUTPUT_DRAIN_SECONDS)
        return code
    finally:
        if relay is not None:
            await relay.close()
        for writer in writers:
            await writer.close(WRITE_OUT_SECONDS)
        if pty_master >= 0:
            await asyncio.to_thread(hostio.wait_read, pty_master, 2.0)
            os.close(pty_master)
        await client.close()


async def _quiet(call: Any) -> None:
    with contextlib.suppress(PykataError):
        await call
