"""Exit statuses: crun's exec failures as the agent reports them, and the
statuses the host makes of them (127, 126, 128+N)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from pykata.agent.crun import launch_error
from pykata.errors import AgentError, ContainerError, HypervisorError
from pykata.runtime.exit_status import (
    CANNOT_EXECUTE,
    NOT_FOUND,
    describe_returncode,
    from_returncode,
    from_wait_status,
    start_failure_status,
)
from pykata.ttrpc import Code

# What crun 1.8.1 in the guest logs at `crun create`, seen in a real VM.
_NOT_FOUND = "executable file `nonexistent` not found in $PATH: No such file or directory"
_NOT_FOUND_ABS = "executable file `/nonexistent` not found in $PATH: No such file or directory"
_NO_X_BIT = "open executable: Permission denied"
_DIRECTORY = "open executable: Operation not permitted"


def _as_host_sees_it(verb: str, message: str, executable: str) -> AgentError:
    """The agent's error as the host's AgentClient turns it into AgentError."""
    err = launch_error(verb, message, executable)
    return AgentError(f"CreateContainer failed in the guest: {err.message}", code=int(err.code))


@pytest.mark.parametrize(("message", "executable", "code", "status"), [
    (_NOT_FOUND, "nonexistent", Code.NOT_FOUND, NOT_FOUND),
    (_NOT_FOUND_ABS, "/nonexistent", Code.NOT_FOUND, NOT_FOUND),
    (_NO_X_BIT, "/etc/passwd", Code.PERMISSION_DENIED, CANNOT_EXECUTE),
    (_DIRECTORY, "/etc", Code.PERMISSION_DENIED, CANNOT_EXECUTE),
    ("pivot_root: Invalid argument", "sh", Code.INTERNAL, None),
    ("mount `/x` to `/y`: No such file or directory", "sh", Code.INTERNAL, None),
])
def test_exec_failures_become_127_and_126(
    message: str, executable: str, code: Code, status: int | None,
) -> None:
    """The agent's code says what failed; the host makes 127 or 126 of it, and
    nothing of any other failure (a missing mount source is no missing command)."""
    err = launch_error("create", message, executable)
    assert err.code == code
    assert start_failure_status(_as_host_sees_it("create", message, executable)) == status


@pytest.mark.parametrize(("message", "executable"), [
    (_NOT_FOUND, "nonexistent"), (_NO_X_BIT, "/etc/passwd"), (_DIRECTORY, "/etc"),
])
def test_messages_keep_the_phrases_docker_and_podman_look_for(
    message: str, executable: str,
) -> None:
    """docker 20.10 (daemon/start.go) gives 127 for a message naming the command
    with "no such file or directory", 126 for "permission denied"; podman 4.3
    checks "permission denied|operation not permitted" first, then "executable
    file not found in|no such file or directory"."""
    text = launch_error("create", message, executable).message.lower()
    if "not found" in message:
        assert executable in text and "no such file or directory" in text
        assert "permission denied" not in text and "operation not permitted" not in text
    else:
        assert "permission denied" in text and executable in text


def test_other_not_found_errors_are_not_127() -> None:
    """NOT_FOUND also says "no such container": only an executable's counts;
    an error raised from an AgentError is followed to it."""
    missing = AgentError("StartContainer failed in the guest: container 'x' does not exist",
                         code=int(Code.NOT_FOUND))
    assert start_failure_status(missing) is None
    assert start_failure_status(AgentError("connection lost")) is None
    assert start_failure_status(ContainerError("no")) is None
    inner = _as_host_sees_it("create", _DIRECTORY, "/etc")
    try:
        try:
            raise inner
        except AgentError as exc:
            raise HypervisorError("wrapped") from exc
    except HypervisorError as outer:
        assert start_failure_status(outer) == CANNOT_EXECUTE


def test_signal_deaths_are_128_plus_n() -> None:
    """Real wait statuses and return codes: an exit code, a signal death."""
    child = subprocess.Popen(["/bin/sh", "-c", "kill -USR1 $$"])
    _, status = os.waitpid(child.pid, 0)
    child.returncode = 0  # reaped above; keep Popen from waiting again
    assert from_wait_status(status) == 128 + signal.SIGUSR1
    child = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    _, status = os.waitpid(child.pid, 0)
    child.returncode = 0
    assert from_wait_status(status) == 3
    assert from_returncode(-9) == 137 and from_returncode(42) == 42
    assert describe_returncode(-9) == "killed by SIGKILL"
    assert describe_returncode(1) == "exit status 1"
