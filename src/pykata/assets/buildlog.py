"""The build log: every command a build runs, and its output, go to one file.

Command output is never shown on the terminal (a kernel build prints thousands
of lines); the user sees one progress line per step, and on failure the last
lines of the log together with its path.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Receives one human-readable line per build step."""

TAIL_LINES = 20


def no_progress(_line: str) -> None:
    """The default progress sink: say nothing."""


class StepFailed(Exception):
    """A build step failed; the message says which, the build log says why."""


class BuildLog:
    """An open build log plus the progress sink of the build it belongs to."""

    def __init__(self, path: Path, progress: Progress = no_progress) -> None:
        self.path = path
        self.progress = progress
        self._file: TextIO = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115

    def close(self) -> None:
        self._file.close()

    def write(self, text: str) -> None:
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()

    def step(self, line: str) -> None:
        """Record a step in the log and report it as progress."""
        log.debug("%s", line)
        self.write(f"==> {line}")
        self.progress(line)

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        input_text: str | None = None,
    ) -> None:
        """Run a command with stdout and stderr appended to the log."""
        self._run(argv, cwd=cwd, env=env, input_text=input_text, capture=False)

    def output(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        input_text: str | None = None,
    ) -> str:
        """Run a command and return its stdout; stderr goes to the log."""
        return self._run(argv, cwd=cwd, env=env, input_text=input_text, capture=True)

    def _run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None,
        env: Mapping[str, str] | None,
        input_text: str | None,
        capture: bool,
    ) -> str:
        args = [os.fspath(a) for a in argv]
        command = shlex.join(args)
        self.write(f"$ {command}" + (f"  (in {cwd})" if cwd else ""))
        full_env = None if env is None else {**os.environ, **env}
        try:
            proc = subprocess.run(
                args,
                cwd=cwd,
                env=full_env,
                input=input_text,
                stdout=subprocess.PIPE if capture else self._file,
                stderr=self._file,
                text=True,
                check=False,
            )
        except OSError as exc:
            self.write(f"cannot run {args[0]}: {exc}")
            raise StepFailed(f"cannot run `{command}`: {exc.strerror}") from exc
        if proc.returncode != 0:
            self.write(f"exit status {proc.returncode}")
            raise StepFailed(f"`{command}` exited with status {proc.returncode}")
        return proc.stdout if capture else ""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
