"""crun, the program that turns an OCI bundle into a container in the guest.

Every call names its own log file (`--log`, JSON lines): `crun create` and
`crun exec` run with the container's stdio, so crun's error messages would
otherwise land in the container's stderr instead of in the agent's reply.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

from pykata.agent import spans
from pykata.agent.process_attrs import INHERITED, ProcessAttrs, inherited_by_spawns
from pykata.agent.reaper import Reaper
from pykata.agent.spawn import CommandResult, run, spawn
from pykata.ttrpc import Code, StatusError

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"


class CrunError(StatusError):
    """crun refused or failed; the message is crun's own."""


# How crun 1.8.1 says, at `crun create` or `crun exec`, that the process's
# executable cannot be run (it looks the executable up before it waits to be
# started, so these never surface at `crun start`):
#   executable file `X` not found in $PATH: No such file or directory
#   open executable: Permission denied           (no x bit)
#   open executable: Operation not permitted     (a directory)
# An exec that fails later (a script whose interpreter is missing) fails in the
# container's process after start: crun prints its error to the process's
# stderr and the process exits 1, as runc's does.
_NOT_FOUND = re.compile(r"executable file `.*` not found")
_CANNOT_EXECUTE = re.compile(r"open executable: ")


def launch_error(verb: str, message: str, executable: str) -> CrunError:
    """The error for a failed `crun create`/`crun exec` that said `message`.

    Code NOT_FOUND when the executable does not exist and PERMISSION_DENIED
    when it cannot be executed (the host's exit statuses 127 and 126, see
    pykata.runtime.exit_status), INTERNAL otherwise. crun's wording is kept:
    docker 20.10 and podman 4.3 read the runtime's message and look for "no
    such file or directory" (127) and "permission denied" (126), which is
    therefore added where crun says "Operation not permitted", with the name
    of the executable, which crun's words lack.
    """
    text = f"crun {verb}: {message}"
    if _NOT_FOUND.search(message):
        return CrunError(Code.NOT_FOUND, text)
    if _CANNOT_EXECUTE.search(message):
        # crun's words do not say which file; for a directory it says EPERM.
        said = "permission denied" in message.lower()
        text += f" (`{executable}` cannot be executed{'' if said else ': permission denied'})"
        return CrunError(Code.PERMISSION_DENIED, text)
    return CrunError(Code.INTERNAL, text)


def _base(log_file: Path) -> list[str]:
    return [CRUN, "--root", CRUN_ROOT, f"--log=file:{log_file}", "--log-format=json"]


def last_error(log_file: Path) -> str:
    """The last message crun logged, or '' when it logged nothing."""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        message = _message(line)
        if message:
            return message
    return ""


def _message(line: str) -> str:
    """The text of one log line. crun's container process logs through its
    parent, which logs the child's JSON line again as its own message: the
    innermost message is the one that says what went wrong."""
    text = line.strip()
    for _ in range(3):
        try:
            entry = json.loads(text)
        except ValueError:
            return text
        if not isinstance(entry, dict):
            return text
        text = str(entry.get("msg") or "").strip()
    return text


class Crun:
    def __init__(self, reaper: Reaper, state_dir: Path) -> None:
        self._reaper = reaper
        self._state_dir = state_dir

    def _log(self, container_id: str) -> Path:
        return self._state_dir / container_id / "crun.log"

    def hooks_log(self, container_id: str) -> Path:
        """Where the container's guest hooks write their output (crun's
        run.oci.hooks.stdout/stderr annotations): crun's own error names only
        the hook's path and status, their stderr says why."""
        return self._state_dir / container_id / "hooks.log"

    def _with_hook_output(self, container_id: str, message: str) -> str:
        if "hook" not in message:
            return message
        tail = _tail(self.hooks_log(container_id))
        return f"{message}; the hook wrote: {tail}" if tail else message

    async def _call(self, container_id: str, *args: str, code: Code = Code.INTERNAL) -> bytes:
        log_file = self._log(container_id)
        verb = next((a for a in args if not a.startswith("-")), "")
        with spans.span(f"crun {verb}", container=container_id):
            result = await run(self._reaper, [*_base(log_file), *args])
        if result.code != 0:
            message = self._with_hook_output(container_id, self._describe(result, log_file))
            raise CrunError(code, message)
        return result.stdout

    @staticmethod
    def _describe(result: CommandResult, log_file: Path) -> str:
        verb = next((a for a in result.argv[1:] if not a.startswith("-") and "/" not in a), "")
        return f"crun {verb}: {last_error(log_file) or result.error_text()}"

    async def launch(
        self,
        container_id: str,
        args: list[str],
        stdio: tuple[int | None, int | None, int | None],
        executable: str = "",
        attrs: ProcessAttrs = INHERITED,
    ) -> None:
        """Run `crun create` or `crun exec --detach`, which return once the
        process exists; the process keeps `stdio`, crun exits. `executable`
        (the process's args[0]) names the program in an error about it;
        crun starts with `attrs`, which its process inherits."""
        log_file = self._log(container_id)
        argv = [*_base(log_file), *args]
        with spans.span(f"crun {args[0]}", container=container_id):
            with inherited_by_spawns(attrs):
                _pid, done = spawn(self._reaper, argv, stdin=stdio[0], stdout=stdio[1],
                                   stderr=stdio[2])
            code = await done
        if code != 0:
            message = last_error(log_file) or f"crun exited with status {code}"
            raise launch_error(
                args[0], self._with_hook_output(container_id, message), executable)

    async def create(
        self,
        container_id: str,
        bundle: Path,
        pid_file: Path,
        stdio: tuple[int | None, int | None, int | None],
        console_socket: Path | None = None,
        executable: str = "",
    ) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self.launch(container_id, [*args, container_id], stdio, executable)

    async def exec(
        self,
        container_id: str,
        process_file: Path,
        pid_file: Path,
        stdio: tuple[int | None, int | None, int | None],
        console_socket: Path | None = None,
        executable: str = "",
        attrs: ProcessAttrs = INHERITED,
    ) -> None:
        args = ["exec", "--detach", "--process", str(process_file), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self.launch(container_id, [*args, container_id], stdio, executable, attrs)

    async def start(self, container_id: str) -> None:
        await self._call(container_id, "start", container_id)

    async def kill(self, container_id: str, signal: int, all_processes: bool = False) -> None:
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(signal)]
        await self._call(container_id, *args)

    async def delete(self, container_id: str) -> None:
        await self._call(container_id, "delete", "--force", container_id)

    async def pause(self, container_id: str) -> None:
        await self._call(container_id, "pause", container_id, code=Code.FAILED_PRECONDITION)

    async def resume(self, container_id: str) -> None:
        await self._call(container_id, "resume", container_id, code=Code.FAILED_PRECONDITION)

    async def update(self, container_id: str, resources_file: Path) -> None:
        await self._call(container_id, "update", f"--resources={resources_file}", container_id)

    async def pids(self, container_id: str) -> list[int]:
        out = await self._call(container_id, "ps", "--format", "json", container_id)
        pids = json.loads(out or b"[]")
        return [int(p) for p in pids]


def _tail(path: Path, limit: int = 2000) -> str:
    """The last `limit` bytes of `path` as one line, or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            data = f.read(limit)
    except OSError:
        return ""
    return " | ".join(data.decode("utf-8", "replace").split("\n")).strip(" |")


def read_pid_file(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise StatusError(Code.INTERNAL, f"crun wrote no usable pid file {path}: {exc}") from exc


async def wait_pid_file(path: Path, timeout: float = 5.0) -> int:
    """crun writes the pid file just before exiting; tolerate a short delay."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not os.path.exists(path) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return read_pid_file(path)
