"""pykata's errors as each front end reports them, in one table.

containerd and the pod control socket speak ttRPC status codes (containerd
turns them into its error kinds: NOT_FOUND from Kill means "already gone",
FAILED_PRECONDITION a call in the wrong state); the runc-compatible command
line and `pykata run` report an exit status and, for a process that could
not be executed, the words docker and podman look for in runc's message.
Every front end translates through here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from pykata.errors import (
    AgentError,
    AlreadyExistsError,
    AssetsError,
    ConfigError,
    ContainerError,
    HostError,
    InvalidStateError,
    NetworkError,
    NotFoundError,
    PykataError,
    SpecError,
)
from pykata.runtime.exit_status import CANNOT_EXECUTE, NOT_FOUND, start_failure_status
from pykata.runtime.lifecycle import ExitedError
from pykata.ttrpc import Code, StatusError


@dataclass(frozen=True)
class ErrorKind:
    error: type[PykataError]
    code: Code


# Most specific first: the first kind an error is an instance of wins.
KINDS: tuple[ErrorKind, ...] = (
    ErrorKind(ExitedError, Code.NOT_FOUND),
    ErrorKind(NotFoundError, Code.NOT_FOUND),
    ErrorKind(InvalidStateError, Code.FAILED_PRECONDITION),
    ErrorKind(AlreadyExistsError, Code.ALREADY_EXISTS),
    ErrorKind(SpecError, Code.INVALID_ARGUMENT),
    ErrorKind(ConfigError, Code.INVALID_ARGUMENT),
    ErrorKind(AssetsError, Code.FAILED_PRECONDITION),
    ErrorKind(HostError, Code.FAILED_PRECONDITION),
    ErrorKind(NetworkError, Code.FAILED_PRECONDITION),
    ErrorKind(ContainerError, Code.FAILED_PRECONDITION),
)

# How a status code comes back as an error on the client's side of a
# control socket (the reverse of KINDS, one kind per code).
_FROM_CODE: dict[Code, type[PykataError]] = {
    Code.NOT_FOUND: NotFoundError,
    Code.FAILED_PRECONDITION: InvalidStateError,
    Code.ALREADY_EXISTS: AlreadyExistsError,
    Code.INVALID_ARGUMENT: SpecError,
}

# runc's words for a process that cannot be executed, which docker maps to
# its exit statuses 127 and 126.
RUNC_WORDS = {
    NOT_FOUND: "executable file not found in $PATH",
    CANNOT_EXECUTE: "permission denied",
}


def to_status(exc: PykataError) -> StatusError:
    """The ttRPC status an error is answered with. The agent's own code
    passes through (the guest said NOT_FOUND, the client sees NOT_FOUND)."""
    if isinstance(exc, AgentError) and exc.code is not None:
        try:
            return StatusError(Code(exc.code), str(exc))
        except ValueError:
            pass
    for kind in KINDS:
        if isinstance(exc, kind.error):
            return StatusError(kind.code, str(exc))
    return StatusError(Code.UNKNOWN, str(exc))


def from_status(exc: StatusError) -> PykataError:
    """The error a control socket's client raises for a status it got: the
    same kind the owner raised (as far as the code tells), its message."""
    kind = _FROM_CODE.get(exc.code, PykataError)
    return kind(exc.message)


def exit_status(exc: BaseException) -> int:
    """The exit status a command line reports for `exc`: 127 or 126 when a
    container's process could not be executed (as a shell and docker
    report it), 1 for anything else."""
    status = start_failure_status(exc)
    return status if status is not None else 1


def runc_message(exc: PykataError) -> str:
    """`exc` worded for runc's callers: a process that could not be executed
    carries runc's words, which docker maps to 127 and 126."""
    text = str(exc)
    words = RUNC_WORDS.get(exit_status(exc))
    if words and words not in text:
        text += f": {words}"
    return text
