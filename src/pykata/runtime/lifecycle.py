"""The states of pods, containers and processes, and the moves between them.

Every front end asks the same questions (may this container start? may it be
deleted without force?) and must give the same answers with the same error
kinds, so the rules live here once and the `Pod` asks them before it acts.
A front end only translates the error (`runtime.error_codes`).

A container's status is its init process's: created, running, paused
(containers only), stopped. An exec'd process is created by Exec and runs
once Start is called. A pod is creating while its VM boots, running while it
serves containers, and stopped for good once its VM is gone.
"""

from __future__ import annotations

import enum
import signal

from pykata.errors import InvalidStateError, NotFoundError

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
    Status.CREATING: frozenset({Status.CREATED, Status.RUNNING, Status.STOPPED}),
    Status.CREATED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.RUNNING: frozenset({Status.PAUSED, Status.STOPPED}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.STOPPED: frozenset(),
}

_ALIVE = frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED})

# What each operation needs, per kind of thing. Kill of a created container
# is allowed, as runc allows it: it is how a container that will never
# start is cleared away; an exec'd process that never started has nothing
# to signal. Exec into a paused container is allowed (containerd adds the
# process; it runs once the container resumes).
REQUIRES: dict[str, dict[str, frozenset[Status]]] = {
    "pod": {
        "create": frozenset({Status.RUNNING}),
        "use": frozenset({Status.RUNNING}),
    },
    "container": {
        "start": frozenset({Status.CREATED}),
        "kill": _ALIVE,
        "exec": frozenset({Status.RUNNING, Status.PAUSED}),
        "pause": frozenset({Status.RUNNING}),
        "resume": frozenset({Status.PAUSED}),
        "update": _ALIVE,
        "delete": frozenset({Status.CREATED, Status.STOPPED}),
        "stats": _ALIVE,
    },
    "process": {
        "start": frozenset({Status.CREATED}),
        "kill": frozenset({Status.RUNNING, Status.PAUSED}),
        "delete": frozenset({Status.CREATED, Status.STOPPED}),
    },
}


class ExitedError(NotFoundError):
    """A signal for a process that has already exited. A not-found kind:
    containerd takes NOT_FOUND from Kill as "already gone", which it is."""


class Lifecycle:
    """The status of one thing ("container web"), moved only along `_MOVES`."""

    def __init__(self, kind: str, name: str, status: Status = Status.CREATING) -> None:
        if kind not in REQUIRES:
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind
        self.name = name
        self.status = status

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} {self.status.value}>"

    def require(self, operation: str) -> None:
        """Raise InvalidStateError (ExitedError for a kill after the exit)
        unless `operation` is allowed now."""
        allowed = REQUIRES[self.kind][operation]
        if self.status in allowed:
            return
        if operation == "kill" and self.status is Status.STOPPED:
            raise ExitedError(f"{self.kind} {self.name} has already exited")
        raise InvalidStateError(
            f"{self.kind} {self.name} is {self._status_word()}: cannot {operation} it",
            hint=_hint(self.kind, operation, self.status),
        )

    def _status_word(self) -> str:
        if self.kind == "process" and self.status is Status.CREATED:
            return "created but was never started"
        return self.status.value

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


def _hint(kind: str, operation: str, status: Status) -> str | None:
    if operation == "delete" and status in (Status.RUNNING, Status.PAUSED):
        return "stop it first, or delete it with force"
    if operation == "start" and status is Status.STOPPED:
        return f"a stopped {kind} cannot start again: delete it and create a new one"
    if operation in ("exec", "pause", "resume", "update", "stats") and status is Status.STOPPED:
        return f"the {kind} has exited"
    if kind == "pod" and status is Status.STOPPED:
        return "its VM has stopped: delete its containers and start a new pod"
    return None
