"""Exit statuses as shells and docker report them.

A container's process that ran reports its own status: its exit code, or
128+N when signal N killed it (the agent reports it so, and `pykata run`
exits with it). A process that never ran gets the status a shell gives a
command it cannot run, which is what docker 20.10 and podman 4.3 give such a
container: 127 when the executable does not exist, 126 when it exists but
cannot be executed.

The agent says which through the status code of its refusal (see
`pykata.agent.crun.launch_error`): NOT_FOUND or PERMISSION_DENIED, with
crun's message, which keeps the phrases docker and podman look for in a
runtime's error ("no such file or directory", "permission denied").
"""

from __future__ import annotations

import os
import signal

from pykata.errors import AgentError
from pykata.ttrpc import Code

__all__ = [
    "CANNOT_EXECUTE",
    "NOT_FOUND",
    "describe_returncode",
    "from_returncode",
    "from_wait_status",
    "signal_status",
    "start_failure_status",
]

#: The executable of the container's process does not exist.
NOT_FOUND = 127
#: The executable exists but cannot be executed (no x bit, a directory).
CANNOT_EXECUTE = 126

# Every exec failure the agent reports as NOT_FOUND names the executable so.
# The code alone would not do: NOT_FOUND also says "no such container".
_NOT_FOUND_PHRASE = "executable file"


def start_failure_status(exc: BaseException) -> int | None:
    """The exit status for a container whose create, start or exec failed
    with `exc`: 127 (`NOT_FOUND`) or 126 (`CANNOT_EXECUTE`) when its process's
    executable could not be run, None when the failure was anything else
    (then the error is pykata's, not the command's: exit 1 or what the front
    end does for its own errors).

    `exc` may be the AgentError itself or any error raised from one
    (its `__cause__` chain is followed).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AgentError):
            return _agent_status(current)
        current = current.__cause__
    return None


def _agent_status(exc: AgentError) -> int | None:
    if exc.code == Code.PERMISSION_DENIED:
        return CANNOT_EXECUTE
    if exc.code == Code.NOT_FOUND and _NOT_FOUND_PHRASE in exc.message:
        return NOT_FOUND
    return None


def signal_status(signum: int) -> int:
    """The status of a process killed by signal `signum`: 128+N."""
    return 128 + signum


def from_wait_status(status: int) -> int:
    """A wait status (os.waitpid) as a shell reports it: the exit code, or
    128+N when signal N killed the process."""
    if os.WIFSIGNALED(status):
        return signal_status(os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


def from_returncode(returncode: int) -> int:
    """A subprocess return code (negative: killed by that signal) as a shell
    reports it."""
    return signal_status(-returncode) if returncode < 0 else returncode


def describe_returncode(returncode: int) -> str:
    """"exit status 3" or "killed by SIGKILL", for messages."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"
