"""The states of sandboxes, containers and processes, and the moves between them.

Every front end asks the same questions (may this container start? may it be
deleted without force?) and must give the same answers with the same error
types, so the rules live here once. A front end maps `InvalidStateError` to
its own error kind (FAILED_PRECONDITION for containerd, runc's messages and
exit status for the OCI command line).
"""

from __future__ import annotations

import enum
import signal

from pykata.errors import InvalidStateError

# The exit status every front end reports for a process whose VM died
# under it (or was stopped with it): what a process killed by SIGKILL gets.
VM_DIED_STATUS = 128 + signal.SIGKILL
# After a process exited, how long its output may still flow to the caller
# before its streams are closed anyway (a background child can hold them
# open forever).
OUTPUT_DRAIN_SECONDS = 10.0


class Status(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


_MOVES: dict[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.CREATED, Status.STOPPED}),
    Status.CREATED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.RUNNING: frozenset({Status.PAUSED, Status.STOPPED}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.STOPPED: frozenset(),
}

# What each operation needs. Kill of a created container is allowed, as runc
# allows it: it is how a container that will never start is cleared away.
REQUIRES: dict[str, frozenset[Status]] = {
    "start": frozenset({Status.CREATED}),
    "kill": frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED}),
    "exec": frozenset({Status.RUNNING}),
    "pause": frozenset({Status.RUNNING}),
    "resume": frozenset({Status.PAUSED}),
    "update": frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED}),
    "delete": frozenset({Status.CREATED, Status.STOPPED}),
    "stats": frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED}),
}


class Lifecycle:
    """The status of one thing ("container web"), moved only along `_MOVES`."""

    def __init__(self, kind: str, name: str, status: Status = Status.CREATING) -> None:
        self.kind = kind
        self.name = name
        self.status = status

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.status.value}>"

    def require(self, operation: str) -> None:
        """Raise InvalidStateError unless `operation` is allowed now."""
        allowed = REQUIRES[operation]
        if self.status not in allowed:
            raise InvalidStateError(
                f"{self.kind} {self.name} is {self.status.value}: cannot {operation} it",
                hint=_hint(operation, self.status),
            )

    def move(self, status: Status) -> None:
        """Change status. Stopped is final: a move out of it lost a race with
        the process's exit (a start answered after the process already
        ended) and is ignored. Any other move `_MOVES` does not allow is a
        bug, reported as InvalidStateError."""
        if status is self.status or self.status is Status.STOPPED:
            return
        if status not in _MOVES[self.status]:
            raise InvalidStateError(
                f"{self.kind} {self.name} is {self.status.value}: cannot become {status.value}")
        self.status = status

    @property
    def stopped(self) -> bool:
        return self.status is Status.STOPPED


def _hint(operation: str, status: Status) -> str | None:
    if operation == "delete" and status in (Status.RUNNING, Status.PAUSED):
        return "stop it first, or delete it with force"
    if operation == "start" and status is Status.STOPPED:
        return "a stopped container cannot start again: delete it and create a new one"
    if operation in ("exec", "pause", "kill") and status is Status.STOPPED:
        return "the container has exited"
    return None
