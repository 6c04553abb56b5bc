"""The client of a debug console session (`pykata exec`): find the pod's
owner, ask it for the session, relay the terminal (or stdio) until the
process exits, and return its exit status."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.channels import DEBUG_CONSOLE_ID
from pykata.errors import NotFoundError, PykataError
from pykata.host import hostio
from pykata.protocols import pod_pb2
from pykata.runtime.control_client import PodClient
from pykata.runtime.lifecycle import OUTPUT_DRAIN_SECONDS
from pykata.runtime.paths import run_root
from pykata.runtime.sandbox_index import list_sandboxes
from pykata.runtime.state import SandboxState
from pykata.runtime.stdio import StdioRelay

# Signals `pykata exec` passes on to the session's process when its stdin is
# not a terminal (on one, ^C and the like travel as bytes to the guest's pty).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
WRITE_OUT_SECONDS = 10.0


@dataclass(frozen=True)
class Stdio:
    stdin: int
    stdout: int
    stderr: int
    terminal: bool
    term: str = ""


def find_pod(sandbox_id: str, root: Path | None = None) -> SandboxState:
    """The running pod whose sandbox id (or state key) is `sandbox_id`."""
    root = root or run_root()
    found = [e.state for e in list_sandboxes(root)
             if e.state is not None and e.alive and sandbox_id in (e.state.id, e.state.key)]
    if not found:
        raise NotFoundError(f"no running pod has sandbox id {sandbox_id!r} under {root}",
                            hint="the ids are the pod's (crictl pods, ctr task ls, docker ps "
                                 "--no-trunc); PYKATA_RUN_ROOT must be the owner's")
    exact = [s for s in found if s.key == sandbox_id]
    if len(found) > 1 and not exact:
        keys = ", ".join(s.key for s in found)
        raise PykataError(f"{len(found)} pods have sandbox id {sandbox_id!r}",
                          hint=f"name one by its state key: {keys}")
    state = (exact or found)[0]
    if not state.control_socket:
        raise PykataError(f"pod {sandbox_id} is still starting (no control socket yet)",
                          hint="try again once it runs")
    return state


async def run_session(socket_path: str, pod_name: str, args: list[str], stdio: Stdio) -> int:
    """One debug console session; the exit status of its process."""
    client = await PodClient.connect(socket_path, f"pod {pod_name}")
    loop = asyncio.get_running_loop()
    exec_id = f"console-{secrets.token_hex(8)}"
    agent = client.agent
    pending: set[asyncio.Task[Any]] = set()
    writers = [hostio.FdWriter(stdio.stdout)]
    if not stdio.terminal:
        writers.append(hostio.FdWriter(stdio.stderr))
    size = hostio.window_size(stdio.stdin) if stdio.terminal else None
    request = pod_pb2.DebugConsoleRequest(
        exec_id=exec_id, args=args, terminal=stdio.terminal, term=stdio.term,
        rows=size[0] if size else 0, columns=size[1] if size else 0)
    session = asyncio.ensure_future(client.debug_console(request))

    def spawn(coro: Any) -> None:
        async def quiet() -> None:
            with contextlib.suppress(PykataError):
                await coro
        task = asyncio.ensure_future(quiet())
        pending.add(task)
        task.add_done_callback(pending.discard)

    # One resize in flight at a time, always of the terminal's size when it
    # is sent: a burst of SIGWINCH cannot reach the guest out of order.
    resized = asyncio.Event()

    async def follow_size() -> None:
        while True:
            await resized.wait()
            resized.clear()
            new = hostio.window_size(stdio.stdin)
            if new is not None:
                with contextlib.suppress(PykataError):
                    await agent.resize(DEBUG_CONSOLE_ID, exec_id, *new)

    handled: list[signal.Signals] = []
    if stdio.terminal:
        loop.add_signal_handler(signal.SIGWINCH, resized.set)
        handled.append(signal.SIGWINCH)
        follower = asyncio.ensure_future(follow_size())
        pending.add(follower)
    else:
        def forward(signum: int) -> None:
            spawn(agent.signal_process(DEBUG_CONSOLE_ID, exec_id, signum))

        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, forward, sig)
            handled.append(sig)
    relay = StdioRelay(agent, DEBUG_CONSOLE_ID, exec_id)
    try:
        relay.start(writers[0].write, writers[1].write if len(writers) > 1 else None,
                    hostio.FdReader(stdio.stdin).read, terminal=stdio.terminal)
        status = await session
        await relay.drain(OUTPUT_DRAIN_SECONDS)
        return status
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)
        await relay.close()
        for writer in writers:
            await writer.close(WRITE_OUT_SECONDS)
        await client.close()

