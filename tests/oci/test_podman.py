"""podman 4.3 (through conmon) runs containers with the runtime under test.

As in test_docker, one long-running container (`sleeper`) serves the tests of
ps, exec, kill and logs, and `podman stop` ends it last.
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
from tests.oci.podman_peer import PodmanPeer

RUN = ("run", "--network", "none")
_shared: set[str] = set()


@pytest.fixture(scope="module", autouse=True)
def module_leaves_nothing(podman_peer: PodmanPeer) -> Iterator[None]:
    yield
    left = podman_peer.leftovers()
    assert not left, f"left behind by {__name__}: {left}"


@pytest.fixture(autouse=True)
def test_leaves_no_container(podman_peer: PodmanPeer) -> Iterator[None]:
    yield
    extra = [c for c in podman_peer.container_ids() if c not in _shared]
    listing = ""
    if extra:
        listing = out(podman_peer.podman("ps", "-a", "--no-trunc", "--format",
                                         "{{.ID}} {{.Status}} {{.Command}}"))
        podman_peer.podman("rm", "-f", "-t", "0", *extra)  # so the next tests start clean
    assert not extra, f"containers left:\n{listing}"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


def inspect(peer: PodmanPeer, container: str, template: str) -> str:
    result = peer.podman("inspect", "-f", template, container)
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
def run_rm(podman_peer: PodmanPeer,
           module_leaves_nothing: None) -> subprocess.CompletedProcess[bytes]:
    return podman_peer.podman(*RUN, "--rm", podman_peer.image, "sh", "-c",
                              "uname -r; echo hello-podman; exit 7")


def test_run_rm_output_and_exit_code(run_rm: subprocess.CompletedProcess[bytes]) -> None:
    assert run_rm.returncode == 7, err(run_rm)
    release, greeting = out(run_rm).splitlines()
    assert re.fullmatch(r"\d+\.\d+\S*", release), release
    assert greeting == "hello-podman"


def test_guest_kernel_is_not_the_host_kernel(run_rm: subprocess.CompletedProcess[bytes],
                                             runtime_is_pykata: bool,
                                             host_kernel_release: str) -> None:
    if not runtime_is_pykata:
        pytest.skip("runc and crun run on the host kernel; only pykata-oci has a guest")
    assert out(run_rm).splitlines()[0] != host_kernel_release


@pytest.mark.parametrize(("command", "code"), [
    (("no-such-command",), 127),
    (("/etc/passwd",), 126),  # exists, not executable
], ids=["missing-127", "not-executable-126"])
def test_exit_code_of_a_failed_exec(podman_peer: PodmanPeer, command: tuple[str, ...],
                                    code: int) -> None:
    result = podman_peer.podman(*RUN, "--rm", podman_peer.image, *command)
    assert result.returncode == code, err(result)


def test_run_stdin_is_byte_exact(podman_peer: PodmanPeer) -> None:
    data = os.urandom(1 << 20)
    result = podman_peer.podman(*RUN, "--rm", "-i", podman_peer.image, "cat", input=data)
    assert result.returncode == 0, err(result)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_run_tty(podman_peer: PodmanPeer, pty_run: PtyRun) -> None:
    result = pty_run(podman_peer.argv(*RUN, "--rm", "-it", podman_peer.image,
                                      "sh", "-c", TTY_SCRIPT),
                     podman_peer.env, rows=41, cols=123)
    assert result.returncode == 0, result.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in result.lines), result.lines
    assert "size 41 123" in result.lines


# -- one long-running container -----------------------------------------------------


@pytest.fixture(scope="module")
def sleeper(podman_peer: PodmanPeer, module_leaves_nothing: None) -> Iterator[str]:
    result = podman_peer.podman(*RUN, "-d", "--name", "pykata-sleeper", podman_peer.image,
                                "sh", "-c", SLEEPER_SCRIPT)
    assert result.returncode == 0, err(result)
    container = out(result).strip()
    _shared.add(container)
    wait_for(lambda: "started" in out(podman_peer.podman("logs", container)),
             what="the sleeper's first output")
    yield container
    podman_peer.podman("rm", "-f", "-t", "0", container)
    _shared.discard(container)


def test_ps_shows_it_running(podman_peer: PodmanPeer, sleeper: str) -> None:
    listed = podman_peer.podman("ps", "--no-trunc", "--format", "{{.ID}} {{.Status}}")
    assert f"{sleeper} Up" in out(listed), out(listed)
    assert inspect(podman_peer, sleeper, "{{.State.Status}}") == "running"


def test_exec(podman_peer: PodmanPeer, sleeper: str) -> None:
    result = podman_peer.podman("exec", sleeper, "sh", "-c",
                                "echo exec-out; echo exec-err >&2; exit 5")
    assert result.returncode == 5
    assert out(result) == "exec-out\n"
    assert err(result) == "exec-err\n"


def test_exec_tty(podman_peer: PodmanPeer, sleeper: str, pty_run: PtyRun) -> None:
    result = pty_run(podman_peer.argv("exec", "-it", sleeper, "sh", "-c", TTY_SCRIPT),
                     podman_peer.env, rows=33, cols=99)
    assert result.returncode == 0, result.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in result.lines), result.lines
    assert "size 33 99" in result.lines


def test_kill_with_a_signal_reaches_the_process(podman_peer: PodmanPeer, sleeper: str) -> None:
    result = podman_peer.podman("kill", "-s", "USR1", sleeper)
    assert result.returncode == 0, err(result)
    wait_for(lambda: "got-usr1" in out(podman_peer.podman("logs", sleeper)),
             what="the USR1 trap's output")
    assert inspect(podman_peer, sleeper, "{{.State.Status}}") == "running"


def test_stop_sends_sigterm_first(podman_peer: PodmanPeer, sleeper: str) -> None:
    """Last user of the sleeper: its TERM trap exits with 3."""
    result = podman_peer.podman("stop", "-t", "60", sleeper)
    assert result.returncode == 0, err(result)
    assert inspect(podman_peer, sleeper, "{{.State.ExitCode}}") == "3"
    assert "got-term" in out(podman_peer.podman("logs", sleeper))


# -- another one-shot container -----------------------------------------------------


def test_rm_force_removes_a_running_container(podman_peer: PodmanPeer) -> None:
    result = podman_peer.podman(*RUN, "-d", podman_peer.image, "sleep", "1000")
    assert result.returncode == 0, err(result)
    container = out(result).strip()
    assert inspect(podman_peer, container, "{{.State.Status}}") == "running"
    removed = podman_peer.podman("rm", "-f", container)
    assert removed.returncode == 0, err(removed)
    assert podman_peer.podman("inspect", container).returncode != 0
    assert container not in podman_peer.container_ids()
