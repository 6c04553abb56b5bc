"""docker 20.10 runs containers with the runtime under test (registered as `pykata`).

Each container under pykata boots a VM, so the tests that only need some
running container share one (`sleeper`); it is stopped last, by the test of
`docker stop`'s SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.oci.conftest import SLEEPER_SCRIPT, TTY_SCRIPT, PtyRun
from tests.oci.docker_peer import RUNTIME_NAME, DockerPeer

RUN = ("run", "--runtime", RUNTIME_NAME, "--network", "none")
_shared: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def module_leaves_nothing(docker_peer: DockerPeer) -> Iterator[None]:
    yield
    left = docker_peer.leftovers()
    assert not left, f"left behind by {__name__}: {left}"


@pytest.fixture(autouse=True)
def test_leaves_no_container(docker_peer: DockerPeer) -> Iterator[None]:
    yield
    extra = [c for c in docker_peer.container_ids() if c not in _shared]
    listing = ""
    if extra:
        listing = out(docker_peer.docker("ps", "-a", "--no-trunc", "--format",
                                         "{{.ID}} {{.Status}} {{.Command}}"))
        docker_peer.docker("rm", "-f", *extra)  # so the next tests start clean
    assert not extra, f"containers left:\n{listing}"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


def inspect(peer: DockerPeer, container: str, template: str) -> str:
    result = peer.docker("inspect", "-f", template, container)
    assert result.returncode == 0, err(result)
    return out(result).strip()


def wait_for(predicate: Callable[[], bool], timeout: float = 30,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


# -- one-shot containers ----------------------------------------------------------


@pytest.fixture(scope="module")
def uname_release(docker_peer: DockerPeer, module_leaves_nothing: None) -> str:
    result = docker_peer.docker(*RUN, "--rm", docker_peer.image, "uname", "-r")
    assert result.returncode == 0, err(result)
    return out(result).strip()


def test_run_uname_prints_a_kernel_release(uname_release: str) -> None:
    assert re.fullmatch(r"\d+\.\d+\S*", uname_release), uname_release


def test_guest_kernel_is_not_the_host_kernel(uname_release: str, runtime_is_pykata: bool,
                                             host_kernel_release: str) -> None:
    if not runtime_is_pykata:
        pytest.skip("runc and crun run on the host kernel; only pykata-oci has a guest")
    assert uname_release != host_kernel_release


@pytest.mark.parametrize(("command", "code"), [
    (("sh", "-c", "exit 7"), 7),
    (("no-such-command",), 127),
    (("/etc/passwd",), 126),  # exists, not executable
], ids=["exit-7", "missing-127", "not-executable-126"])
def test_exit_code_comes_back(docker_peer: DockerPeer, command: tuple[str, ...],
                              code: int) -> None:
    result = docker_peer.docker(*RUN, "--rm", docker_peer.image, *command)
    assert result.returncode == code, err(result)


def test_stdin_is_passed_byte_exact(docker_peer: DockerPeer) -> None:
    data = os.urandom(1 << 20)
    result = docker_peer.docker(*RUN, "--rm", "-i", docker_peer.image, "cat", input=data)
    assert result.returncode == 0, err(result)
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_run_tty_gets_a_pty_of_the_window_size(docker_peer: DockerPeer,
                                               pty_run: PtyRun) -> None:
    result = pty_run(docker_peer.argv(*RUN, "--rm", "-it", docker_peer.image,
                                      "sh", "-c", TTY_SCRIPT),
                     docker_peer.env, rows=37, cols=111)
    assert result.returncode == 0, result.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in result.lines), result.lines
    assert "size 37 111" in result.lines


# -- one long-running container -----------------------------------------------------


@pytest.fixture(scope="module")
def sleeper(docker_peer: DockerPeer, module_leaves_nothing: None) -> Iterator[str]:
    result = docker_peer.docker(*RUN, "-d", "--name", "pykata-sleeper", docker_peer.image,
                                "sh", "-c", SLEEPER_SCRIPT)
    assert result.returncode == 0, err(result)
    container = out(result).strip()
    _shared.add(container)
    wait_for(lambda: "started" in out(docker_peer.docker("logs", container)),
             what="the sleeper's first output")
    yield container
    docker_peer.docker("rm", "-f", container)
    _shared.discard(container)


def test_ps_shows_it_running(docker_peer: DockerPeer, sleeper: str,
                             runtime_is_pykata: bool) -> None:
    listed = docker_peer.docker("ps", "--no-trunc", "--format", "{{.ID}} {{.Status}}")
    assert f"{sleeper} Up" in out(listed), out(listed)
    assert inspect(docker_peer, sleeper, "{{.State.Running}}") == "true"
    # `docker top` asks the runtime for pids (`ps --format json`), then shows
    # the host's `ps -ef` lines of those pids: a VM's processes are not among
    # them, so only runc and crun can show the container's own commands.
    top = docker_peer.docker("top", sleeper)
    assert top.returncode == 0, err(top)
    assert len(out(top).splitlines()) >= 2, out(top)
    if not runtime_is_pykata:
        assert "sleep" in out(top) or "sh -c" in out(top), out(top)


def test_logs_has_its_output(docker_peer: DockerPeer, sleeper: str) -> None:
    result = docker_peer.docker("logs", sleeper)
    assert result.returncode == 0, err(result)
    assert "started" in out(result).splitlines()


def test_exec(docker_peer: DockerPeer, sleeper: str) -> None:
    result = docker_peer.docker("exec", sleeper, "sh", "-c",
                                "echo exec-out; echo exec-err >&2; exit 5")
    assert result.returncode == 5
    assert out(result) == "exec-out\n"
    assert err(result) == "exec-err\n"


def test_exec_stdin_is_byte_exact(docker_peer: DockerPeer, sleeper: str) -> None:
    data = os.urandom(256 << 10)
    result = docker_peer.docker("exec", "-i", sleeper, "cat", input=data)
    assert result.returncode == 0, err(result)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_exec_tty(docker_peer: DockerPeer, sleeper: str, pty_run: PtyRun) -> None:
    result = pty_run(docker_peer.argv("exec", "-it", sleeper, "sh", "-c", TTY_SCRIPT),
                     docker_peer.env, rows=29, cols=97)
    assert result.returncode == 0, result.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in result.lines), result.lines
    assert "size 29 97" in result.lines


def test_pause_and_unpause(docker_peer: DockerPeer, sleeper: str) -> None:
    paused = docker_peer.docker("pause", sleeper)
    assert paused.returncode == 0, err(paused)
    try:
        assert inspect(docker_peer, sleeper, "{{.State.Status}}") == "paused"
        assert inspect(docker_peer, sleeper, "{{.State.Paused}}") == "true"
    finally:
        resumed = docker_peer.docker("unpause", sleeper)
    assert resumed.returncode == 0, err(resumed)
    assert inspect(docker_peer, sleeper, "{{.State.Status}}") == "running"
    after = docker_peer.docker("exec", sleeper, "echo", "after-unpause")
    assert (after.returncode, out(after)) == (0, "after-unpause\n"), err(after)


def test_kill_with_a_signal_reaches_the_process(docker_peer: DockerPeer, sleeper: str) -> None:
    result = docker_peer.docker("kill", "-s", "USR1", sleeper)
    assert result.returncode == 0, err(result)
    wait_for(lambda: "got-usr1" in out(docker_peer.docker("logs", sleeper)),
             what="the USR1 trap's output")
    assert inspect(docker_peer, sleeper, "{{.State.Running}}") == "true"


def test_stop_sends_sigterm_first(docker_peer: DockerPeer, sleeper: str) -> None:
    """Last user of the sleeper: its TERM trap exits with 3."""
    result = docker_peer.docker("stop", "-t", "60", sleeper)
    assert result.returncode == 0, err(result)
    assert inspect(docker_peer, sleeper, "{{.State.ExitCode}}") == "3"
    assert "got-term" in out(docker_peer.docker("logs", sleeper))


# -- more one-shot containers -------------------------------------------------------


def run_detached(peer: DockerPeer, *command: str) -> str:
    result = peer.docker(*RUN, "-d", peer.image, *command)
    assert result.returncode == 0, err(result)
    return out(result).strip()


def test_stop_kills_after_the_timeout(docker_peer: DockerPeer) -> None:
    """sleep as PID 1 has no handler for SIGTERM, so it ignores it; SIGKILL follows."""
    container = run_detached(docker_peer, "sleep", "1000")
    try:
        started = time.monotonic()
        result = docker_peer.docker("stop", "-t", "2", container)
        assert result.returncode == 0, err(result)
        assert time.monotonic() - started >= 2
        assert inspect(docker_peer, container, "{{.State.ExitCode}}") == "137"
    finally:
        docker_peer.docker("rm", "-f", container)


def test_rm_force_removes_a_running_container(docker_peer: DockerPeer) -> None:
    container = run_detached(docker_peer, "sleep", "1000")
    assert inspect(docker_peer, container, "{{.State.Running}}") == "true"
    result = docker_peer.docker("rm", "-f", container)
    assert result.returncode == 0, err(result)
    assert docker_peer.docker("inspect", container).returncode != 0
    assert container not in docker_peer.container_ids()
