"""The one-line report a forked owner sends its parent once it is ready, or
why it is not: the command that forked it (`pykata-oci create`, `exec
--detach`) waits for it, and prints the error as the child saw it.

One JSON object on one line, written to a pipe. The child writes it once;
the parent reads one line (an empty one means the child died first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass

from pykata import errors
from pykata.errors import PykataError
from pykata.runtime.error_codes import RUNC_WORDS, exit_status

log = logging.getLogger(__name__)

_MAX_LINE = 65536


@dataclass(frozen=True)
class ReadyReport:
    ok: bool
    error: str = ""
    hint: str = ""
    # The error's class name in pykata.errors, so the parent raises the same kind.
    kind: str = ""
    # The exit status the failure stands for (127/126: the process could
    # not be executed; 1: anything else).
    status: int = 0
    qemu_pid: int = 0

    @classmethod
    def success(cls, qemu_pid: int = 0) -> ReadyReport:
        return cls(ok=True, qemu_pid=qemu_pid)

    @classmethod
    def failure(cls, exc: BaseException, doing: str) -> ReadyReport:
        """The report of `exc`, raised while `doing` ("creating the container")."""
        if isinstance(exc, PykataError):
            return cls(ok=False, error=exc.message, hint=exc.hint or "",
                       kind=type(exc).__name__, status=exit_status(exc))
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            return cls(ok=False, error=f"interrupted while {doing}", kind="PykataError",
                       status=1)
        log.error("internal error while %s", doing, exc_info=exc)
        return cls(ok=False, error=f"internal error while {doing}: {exc!r}",
                   kind="PykataError", status=1)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    def send(self, fd: int) -> None:
        """Write the report to `fd` and close it (a parent gone is no error)."""
        with contextlib.suppress(OSError):
            os.write(fd, self.encode())
        with contextlib.suppress(OSError):
            os.close(fd)

    @classmethod
    def decode(cls, line: bytes, who: str) -> ReadyReport:
        """Read a child's line; `who` names it in the error for a child that
        died before it reported or sent something else."""
        if not line:
            return cls(ok=False, error=f"{who} died while starting", status=1)
        try:
            data = json.loads(line[:_MAX_LINE])
            report = cls(**data)
        except (ValueError, TypeError):
            return cls(ok=False, error=f"{who} sent {line[:200]!r}", status=1)
        if not (isinstance(report.ok, bool) and isinstance(report.status, int)
                and isinstance(report.error, str) and isinstance(report.hint, str)):
            return cls(ok=False, error=f"{who} sent a malformed report", status=1)
        return report

    def raise_error(self) -> None:
        """Raise the error this report stands for (nothing when ok): of the
        kind the child raised, its exit status kept, and a process that could
        not be executed worded as runc words it (docker maps those words to
        127 and 126)."""
        if self.ok:
            return
        kind = getattr(errors, self.kind, PykataError)
        if not (isinstance(kind, type) and issubclass(kind, PykataError)):
            kind = PykataError
        text = self.error or "starting failed"
        words = RUNC_WORDS.get(self.status)
        if words and words not in text:
            text += f": {words}"
        error = kind(text, hint=self.hint or None)
        if self.status in (126, 127):
            error.exit_code = self.status
        raise error
