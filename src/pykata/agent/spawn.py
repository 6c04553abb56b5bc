"""Starting programs in the guest without asyncio's child watcher (see reaper.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import NamedTuple

from pykata.agent.reaper import Reaper

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class CommandResult(NamedTuple):
    argv: tuple[str, ...]
    code: int
    stdout: bytes
    stderr: bytes

    def error_text(self) -> str:
        text = (self.stderr or self.stdout).decode("utf-8", "replace").strip()
        return text or f"{self.argv[0]} exited with status {self.code}"


def spawn(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> tuple[int, asyncio.Future[int]]:
    """Start `argv` with the given fds as its stdio (None: /dev/null).

    Returns the pid and a future for its exit code. The pid is registered with
    the reaper before this returns, so no exit can be missed.
    """
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target)
            for target, fd in enumerate((stdin, stdout, stderr))
        ]
        pid = os.posix_spawn(argv[0], list(argv), _ENV, file_actions=actions, setsid=True)
    finally:
        os.close(devnull)
    return pid, reaper.watch(pid)


async def run(
    reaper: Reaper, argv: Sequence[str], *, stdin: int | None = None
) -> CommandResult:
    """Run `argv` to completion and capture its output."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        _pid, done = spawn(reaper, argv, stdin=stdin, stdout=out_w, stderr=err_w)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    out, err = await asyncio.gather(read_all(out_r), read_all(err_r))
    return CommandResult(tuple(argv), await done, out, err)


async def read_all(fd: int) -> bytes:
    """Read a pipe to end-of-file without blocking the event loop; closes `fd`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.read()
    finally:
        transport.close()
