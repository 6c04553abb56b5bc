"""The debug console: processes in the VM's own root environment.

`pykata exec` reaches them through the host, for pods created with the
console enabled (CreateSandbox's debug_console): a shell or a command that
sees the guest's processes, mounts, /proc and the agent's log, outside every
container. Each runs in a session of its own (busybox setsid), on a pty the
agent opens when it asks for a terminal (`setsid -c` makes it the
controlling terminal, so ^C and window size changes reach the foreground
job). Its stdio, waits and signals are the ordinary process calls with the
pseudo-container id DEBUG_CONSOLE_ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import signal
import struct
import termios
from pathlib import Path

from pykata.agent.process import Process, Stdio
from pykata.agent.reaper import Reaper
from pykata.channels import DEBUG_CONSOLE_ID
from pykata.protocols import agent_pb2
from pykata.ttrpc import Code, StatusError

log = logging.getLogger(__name__)

BUSYBOX = "/bin/busybox"
SHELL = ("sh",)
# The console's copy of the agent's log (the agent's own goes to the guest
# console, which the host keeps as console.log): from CreateSandbox on.
AGENT_LOG = Path("/run/pykata/agent.log")
AGENT_LOG_LIMIT = 512 * 1024
# Sessions at once: each is a process and a pty in the guest.
MAX_SESSIONS = 8
# As for an exec: output may keep flowing this long after the process exited.
DRAIN_SECONDS = 10.0
_EXEC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def console_env(term: str) -> dict[str, str]:
    """The whole environment of a console process: nothing of the agent's."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/",
        "TERM": term if _TERM.fullmatch(term) else "dumb",
        "PS1": "debug-console:\\w# ",
    }


def console_argv(args: list[str], terminal: bool) -> list[str]:
    """The command the agent spawns: `args` (or a shell) in a new session."""
    return [BUSYBOX, "setsid", *(["-c"] if terminal else []), *(args or SHELL)]


class DebugConsole:
    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self.enabled = False
        self._processes: dict[str, Process] = {}

    def enable(self) -> None:
        """CreateSandbox asked for the console: allow sessions, keep a log copy."""
        if self.enabled:
            return
        self.enabled = True
        with_log_copy(AGENT_LOG)

    def process(self, exec_id: str) -> Process:
        proc = self._processes.get(exec_id)
        if proc is None:
            raise StatusError(Code.NOT_FOUND, f"debug console session {exec_id!r} does not exist")
        return proc

    async def start(self, req: agent_pb2.StartDebugConsoleRequest) -> None:
        if not self.enabled:
            raise StatusError(Code.PERMISSION_DENIED,
                              "the debug console is not enabled for this sandbox")
        if not _EXEC_ID.fullmatch(req.exec_id):
            raise StatusError(Code.INVALID_ARGUMENT, f"invalid exec id {req.exec_id!r}")
        if req.exec_id in self._processes:
            raise StatusError(Code.ALREADY_EXISTS,
                              f"debug console session {req.exec_id!r} already exists")
        if len(self._processes) >= MAX_SESSIONS:
            raise StatusError(Code.RESOURCE_EXHAUSTED,
                              f"{MAX_SESSIONS} debug console sessions are open already")
        self._processes[req.exec_id] = await self._spawn(req)
        log.info("debug console session %s started", req.exec_id)

    async def _spawn(self, req: agent_pb2.StartDebugConsoleRequest) -> Process:
        if req.terminal:
            master, slave = os.openpty()
            stdio = Stdio.for_terminal()
            stdio.attach_terminal(master)
            child: tuple[int, int, int] = (slave, slave, slave)
            if req.rows and req.columns:
                _set_size(master, req.rows, req.columns)
        else:
            stdio = Stdio.pipes()
            child = stdio.child_fds  # type: ignore[assignment]
            stdio.child_fds = (None, None, None)
        proc = Process(DEBUG_CONSOLE_ID, req.exec_id, stdio)
        try:
            # No await between the spawn and the watch: the reaper runs in
            # this loop, so the exit cannot be reaped before it is watched.
            proc.pid = _spawn(console_argv(list(req.args), req.terminal),
                              console_env(req.term), child)
            proc.exited = self._reaper.watch(proc.pid)
        except OSError as exc:
            proc.close()
            raise StatusError(Code.INTERNAL, f"cannot start the debug console: {exc}") from None
        finally:
            for fd in set(child):
                os.close(fd)
        try:
            await proc.open_streams()
        except BaseException:
            os.kill(proc.pid, signal.SIGKILL)
            proc.close()
            raise
        return proc

    async def wait(self, exec_id: str) -> int:
        proc = self.process(exec_id)
        code = await asyncio.shield(proc.exited)
        asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._release, proc)
        return code

    def signal(self, exec_id: str, signum: int) -> None:
        """Signal the session's process group (the process leads it): a kill
        of the session ends what it started in the foreground too."""
        proc = self.process(exec_id)
        if proc.exited.done():
            raise StatusError(Code.NOT_FOUND, f"debug console session {exec_id!r} exited")
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(proc.pid, signum)

    def _release(self, proc: Process) -> None:
        if self._processes.get(proc.exec_id) is proc:
            del self._processes[proc.exec_id]
            proc.close()

    def close_all(self) -> None:
        """End every session (the sandbox is going)."""
        for proc in list(self._processes.values()):
            if not proc.exited.done():
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self._release(proc)


def _spawn(argv: list[str], env: dict[str, str], fds: tuple[int, int, int]) -> int:
    # Not in a new session here: `setsid` makes one, and makes the pty its
    # controlling terminal, which posix_spawn cannot.
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
    return os.posix_spawn(argv[0], argv, env, file_actions=actions)


def _set_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ,
                struct.pack("HHHH", min(rows, 0xFFFF), min(columns, 0xFFFF), 0, 0))


class _BoundedFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The log in a file that never grows past `limit`: at the limit the file
    becomes `<name>.1` (replacing the one before) and a new one starts."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        super().__init__(open(path, "a", encoding="utf-8"))  # noqa: SIM115

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.stream.tell() >= self.limit:
            self.acquire()
            try:
                self.stream.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            finally:
                self.release()


def with_log_copy(path: Path, limit: int = AGENT_LOG_LIMIT) -> None:
    """Copy the agent's log to `path` from now on (bounded)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _BoundedFileHandler(path, limit)
    except OSError as exc:
        log.warning("no agent log copy at %s: %s", path, exc)
        return
    root = logging.getLogger()
    if root.handlers:
        handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
