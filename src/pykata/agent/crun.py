"""crun, the program that turns an OCI bundle into a container in the guest.

Every call names its own log file (`--log`, JSON lines): `crun create` and
`crun exec` run with the container's stdio, so crun's error messages would
otherwise land in the container's stderr instead of in the agent's reply.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from pykata.agent.reaper import Reaper
from pykata.agent.spawn import CommandResult, run, spawn
from pykata.ttrpc import Code, StatusError

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"


class CrunError(StatusError):
    """crun refused or failed; the message is crun's own."""


def _base(log_file: Path) -> list[str]:
    return [CRUN, "--root", CRUN_ROOT, f"--log=file:{log_file}", "--log-format=json"]


def last_error(log_file: Path) -> str:
    """The last message crun logged, or '' when it logged nothing."""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            return line.strip()
        if isinstance(entry, dict) and entry.get("msg"):
            return str(entry["msg"])
    return ""


class Crun:
    def __init__(self, reaper: Reaper, state_dir: Path) -> None:
        self._reaper = reaper
        self._state_dir = state_dir

    def _log(self, container_id: str) -> Path:
        return self._state_dir / container_id / "crun.log"

    async def _call(self, container_id: str, *args: str, code: Code = Code.INTERNAL) -> bytes:
        log_file = self._log(container_id)
        result = await run(self._reaper, [*_base(log_file), *args])
        if result.code != 0:
            raise CrunError(code, self._describe(result, log_file))
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
    ) -> None:
        """Run `crun create` or `crun exec --detach`, which return once the
        process exists; the process keeps `stdio`, crun exits."""
        log_file = self._log(container_id)
        argv = [*_base(log_file), *args]
        _pid, done = spawn(self._reaper, argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
        code = await done
        if code != 0:
            message = last_error(log_file) or f"crun exited with status {code}"
            raise CrunError(Code.INTERNAL, f"crun {args[0]}: {message}")

    async def create(
        self,
        container_id: str,
        bundle: Path,
        pid_file: Path,
        stdio: tuple[int | None, int | None, int | None],
        console_socket: Path | None = None,
    ) -> None:
        args = ["create", "--bundle", str(bundle), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self.launch(container_id, [*args, container_id], stdio)

    async def exec(
        self,
        container_id: str,
        process_file: Path,
        pid_file: Path,
        stdio: tuple[int | None, int | None, int | None],
        console_socket: Path | None = None,
    ) -> None:
        args = ["exec", "--detach", "--process", str(process_file), "--pid-file", str(pid_file)]
        if console_socket is not None:
            args += ["--console-socket", str(console_socket)]
        await self.launch(container_id, [*args, container_id], stdio)

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
