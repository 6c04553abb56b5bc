"""The agent's child reaper: every exit status in the guest passes through here.

The agent is PID 1, so every orphan in the guest becomes its child: container
processes whose `crun create`/`crun exec` parent already exited, and anything
they leave behind. One SIGCHLD handler reaps them all with waitpid(-1) and
hands each status to whoever registered that pid. asyncio's own subprocess
support cannot be used alongside: its child watcher would race this handler
for the same statuses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time

log = logging.getLogger(__name__)

# Exit statuses nobody claimed yet, kept for a process that exits before its
# pid is known to the agent (a `crun exec -d` child can exit before crun has
# written its pid file). Bounded: an orphan storm must not grow memory.
_UNCLAIMED_LIMIT = 1024


def exit_code(status: int) -> int:
    """A wait status as a shell would report it: the code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        # pid -> (time reaped, wait status)
        self._unclaimed: collections.OrderedDict[int, tuple[float, int]] = (
            collections.OrderedDict()
        )

    def install(self) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self.reap)
        # Children that exited before the handler was installed.
        self.reap()

    def watch(self, pid: int, since: float | None = None) -> asyncio.Future[int]:
        """A future resolved with `pid`'s exit code (128+N when killed by signal N).

        `since` (a time.monotonic() value) is when the process was started: an
        unclaimed status for the same pid reaped before then belongs to an
        earlier process that had the number, not to this one.
        """
        fut = self._waiters.get(pid)
        if fut is not None:
            return fut
        fut = asyncio.get_running_loop().create_future()
        stale = self._unclaimed.pop(pid, None)
        if stale is not None and (since is None or stale[0] >= since):
            fut.set_result(exit_code(stale[1]))
        else:
            self._waiters[pid] = fut
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fut = self._waiters.pop(pid, None)
            if fut is None:
                self._unclaimed[pid] = (time.monotonic(), status)
                while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                    self._unclaimed.popitem(last=False)
            elif not fut.done():
                fut.set_result(exit_code(status))
