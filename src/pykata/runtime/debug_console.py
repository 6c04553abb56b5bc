"""The owner's side of the debug console (`pykata exec SANDBOX_ID`).

A session is one control call, `DebugConsole`: the owner checks that the pod
has the console enabled (its configuration or its allowlisted annotation),
logs who asked, has the agent start the process in the VM's root environment,
waits for it and logs how it ended. While the call runs, its client relays
the process's stdio with the forwarded agent calls, under the pseudo-container
id DEBUG_CONSOLE_ID and the session's exec id, which `allows` admits only for
a session this owner started. A call that ends early (its client went away)
kills the session's process group in the guest: no shell outlives its user.

The console is host to guest only: the owner starts a process in the guest
and relays bytes; nothing the guest sends makes the host do anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from pykata.channels import DEBUG_CONSOLE_ID
from pykata.errors import PykataError
from pykata.protocols import agent_pb2, pod_pb2
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.paths import run_root
from pykata.ttrpc import Code, PeerCredentials, StatusError
from pykata.untrusted import guest_line

log = logging.getLogger(__name__)

ANNOTATION = "io.katacontainers.config.agent.debug_console_enabled"
# The host's record of every session, beside the sandboxes' directories.
AUDIT_LOG = "debug-console.log"
AUDIT_LOG_LIMIT = 1024 * 1024
AUDIT_LOCK = AUDIT_LOG + ".lock"
# What a client may send: a command line, not a payload.
MAX_ARGS = 256
MAX_ARGS_BYTES = 64 * 1024
# As the agent keeps a session's output readable after it exited.
RELEASE_SECONDS = 10.0
START_SECONDS = 30.0
# One record line at most (a long command is cut, its start kept).
AUDIT_LINE_LIMIT = 1024
# What the command line makes (`console-` and hex); nothing else is a name.
_EXEC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def disabled_message(pod_id: str, config_source: str) -> str:
    return (f"the debug console of pod {pod_id} is not enabled: set [agent] "
            f"debug_console_enabled = true in {config_source}, or create the pod with the "
            f"annotation {ANNOTATION}=true allowed by [agent] enable_annotations "
            f"(\"debug_console_enabled\")")


class _Session:
    def __init__(self, exec_id: str) -> None:
        self.exec_id = exec_id
        self.started = time.time()
        # Set once the agent answered StartDebugConsole (`error` if it refused).
        self.ready = asyncio.Event()
        self.error: StatusError | None = None
        self.start_call: asyncio.Future[Any] | None = None


class ConsoleSessions:
    """The debug console sessions of one pod."""

    def __init__(self, pod_id: str, enabled: bool, config_source: str,
                 audit_dir: Path | None = None) -> None:
        self.pod_id = pod_id
        self.enabled = enabled
        self._config_source = config_source
        self._audit_dir = audit_dir
        self._sessions: dict[str, _Session] = {}

    async def allows(self, exec_id: str, timeout: float | None) -> None:
        """Refuse a forwarded call for a console process this owner did not
        start; for one it is starting, wait until it runs (a client relays
        the session's stdio while the call that starts it is in flight)."""
        if not self.enabled:
            raise StatusError(Code.PERMISSION_DENIED,
                              disabled_message(self.pod_id, self._config_source))
        session = self._sessions.get(exec_id)
        if session is None:
            raise StatusError(Code.NOT_FOUND,
                              f"debug console session {exec_id!r} does not exist")
        await asyncio.wait_for(session.ready.wait(), timeout)
        if session.error is not None:
            raise session.error

    async def run(self, agent: AgentClient, req: pod_pb2.DebugConsoleRequest,
                  peer: PeerCredentials | None) -> int:
        """One session, start to end; its process's exit status."""
        if not self.enabled:
            self._audit(peer, req, "refused: not enabled")
            raise StatusError(Code.PERMISSION_DENIED,
                              disabled_message(self.pod_id, self._config_source))
        _check_request(req)
        if req.exec_id in self._sessions:
            raise StatusError(Code.ALREADY_EXISTS,
                              f"debug console session {req.exec_id!r} already exists")
        session = _Session(req.exec_id)
        self._sessions[req.exec_id] = session
        try:
            await self._start(agent, req, session)
        except BaseException as exc:
            if _refused(exc):
                self._audit(peer, req, f"failed to start: {session.error}")
            else:
                # The client went away, the call timed out or its answer was
                # lost: the guest may have started the shell all the same.
                # Kill it once the start call is over, so that no shell is
                # left without its user (nor holds one of the agent's slots).
                _kill_later(agent, req.exec_id, after=session.start_call)
                self._audit(peer, req, f"start interrupted ({_what(exc)}); killing it")
            self._release(req.exec_id)
            raise
        self._audit(peer, req, "started")
        status: int | None = None
        how = "ended: its client went away"
        try:
            status = await agent.wait_process(DEBUG_CONSOLE_ID, req.exec_id)
            how = f"exited with status {status}"
            return status
        except PykataError as exc:
            how = f"lost: {exc}"
            raise StatusError(Code.UNAVAILABLE, f"debug console session: {exc}") from exc
        finally:
            if status is None:
                # The client went away (or the agent did): end the session's
                # processes rather than leave a root shell behind.
                _kill_later(agent, req.exec_id)
            self._audit(peer, req, how, seconds=time.time() - session.started)
            self._release(req.exec_id)

    async def _start(self, agent: AgentClient, req: pod_pb2.DebugConsoleRequest,
                     session: _Session) -> None:
        # The call goes on if this one is cancelled: `run` waits for it to
        # end before it kills what it may have started.
        session.start_call = asyncio.ensure_future(agent.forward(
            "StartDebugConsole", agent_pb2.StartDebugConsoleRequest(
                exec_id=req.exec_id, args=req.args, terminal=req.terminal, term=req.term,
                rows=req.rows, columns=req.columns), empty_pb2.Empty, START_SECONDS))
        try:
            await asyncio.shield(session.start_call)
        except StatusError as exc:
            # The agent's words are the guest's: they reach the session
            # record, the owner's log and root's terminal, so escaped.
            session.error = StatusError(exc.code, guest_line(exc.message))
            raise session.error from exc
        except BaseException:
            session.error = StatusError(Code.UNAVAILABLE, "the session did not start")
            raise
        finally:
            session.ready.set()

    def _release(self, exec_id: str) -> None:
        """Forget the session once its output had time to be read (the agent
        keeps it as long)."""
        asyncio.get_running_loop().call_later(RELEASE_SECONDS, self._sessions.pop,
                                              exec_id, None)

    def _audit(self, peer: PeerCredentials | None, req: pod_pb2.DebugConsoleRequest,
               what: str, seconds: float | None = None) -> None:
        who = (f"uid={peer.uid} gid={peer.gid} pid={peer.pid}" if peer is not None
               else "uid=? pid=?")
        command = _field(shlex.join(req.args)) if req.args else "(shell)"
        line = (f"debug console: pod={_field(self.pod_id)} session={_field(req.exec_id)} "
                f"{who} command={command!r} terminal={req.terminal} {_field(what)}"
                + (f" after {seconds:.1f}s" if seconds is not None else ""))
        if len(line) > AUDIT_LINE_LIMIT:
            line = line[:AUDIT_LINE_LIMIT - 3] + "..."
        log.info("%s", line)
        write_audit(self._audit_dir or run_root(), line)


def _field(text: str) -> str:
    """One field of a record line: on one line, no control characters
    (the guest's words and a client's command alike)."""
    return guest_line(text, AUDIT_LINE_LIMIT)


def _check_request(req: pod_pb2.DebugConsoleRequest) -> None:
    if not _EXEC_ID.fullmatch(req.exec_id):
        raise StatusError(Code.INVALID_ARGUMENT,
                          f"the session name {guest_line(req.exec_id, 140)!r} is not "
                          "letters, digits, '.', '_' or '-' (at most 128)")
    if len(req.args) > MAX_ARGS or sum(len(a) for a in req.args) > MAX_ARGS_BYTES:
        raise StatusError(Code.INVALID_ARGUMENT,
                          f"the command is too long (at most {MAX_ARGS} arguments, "
                          f"{MAX_ARGS_BYTES} bytes)")
    if any("\0" in a for a in req.args) or "\0" in req.term:
        raise StatusError(Code.INVALID_ARGUMENT, "the command contains a NUL character")


# What the agent answers when it did not start a session; anything else
# (these codes included: they are also what a lost or late answer becomes)
# may leave a shell running in the guest.
_NOT_REFUSALS = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.DATA_LOSS, Code.CANCELLED,
                 Code.UNKNOWN)


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, StatusError) and exc.code not in _NOT_REFUSALS


def _what(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "its client went away"
    return guest_line(str(exc) or type(exc).__name__, 200)


def _kill_later(agent: AgentClient, exec_id: str,
                after: asyncio.Future[Any] | None = None) -> None:
    """SIGKILL the session's process group in the guest, in the background;
    once `after` (the start call) ended, if given."""
    async def kill() -> None:
        if after is not None:
            await asyncio.wait([after])
            if not after.cancelled():
                after.exception()  # seen here; `run` reported it
        with contextlib.suppress(PykataError, asyncio.TimeoutError):
            await asyncio.wait_for(
                agent.signal_process(DEBUG_CONSOLE_ID, exec_id, signal.SIGKILL), 10)
    task = asyncio.ensure_future(kill())
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Task[None]] = set()


def write_audit(directory: Path, line: str) -> None:
    """Append `line` (with the time) to the host's session record, 0600 in
    pykata's root-only state directory; at the limit the record becomes
    `.1` and a new one starts, so it stays bounded."""
    path = directory / AUDIT_LOG
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        # Every owner of the node writes here: one at a time checks the
        # size, rotates and appends, so two rotating at once lose nothing.
        lock = os.open(directory / AUDIT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                       | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= AUDIT_LOG_LIMIT:
                    os.replace(path, path.with_name(AUDIT_LOG + ".1"))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as out:
                out.write(f"{stamp} {line}\n")
        finally:
            os.close(lock)  # and with it the lock
    except OSError as exc:
        log.error("cannot record the debug console session in %s: %s", path, exc)
