"""docker 20.10 and podman 4.3 (through conmon) run containers with the runtime
under test: one suite, run with each engine.

Each container under pykata boots a VM, so the tests that only need some
running container share one per engine (`sleeper`); it is stopped last, by
the test of `stop`'s SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.oci.conftest import SLEEPER_SCRIPT, TTY_SCRIPT, PtyRun
from tests.oci.docker_peer import RUNTIME_NAME, cgroup_dirs


@dataclass
class Engine:
    """docker or podman, through one interface: the CLI is the same where
    these tests use it."""

    name: str
    peer: Any  # DockerPeer or PodmanPeer
    # Containers that outlive a test on purpose (the sleeper).
    shared: set[str] = field(default_factory=set)

    @property
    def run(self) -> tuple[str, ...]:
        """`run` with the runtime under test and no network."""
        runtime = ("--runtime", RUNTIME_NAME) if self.name == "docker" else ()
        return ("run", *runtime, "--network", "none")

    @property
    def image(self) -> str:
        return str(self.peer.image)

    def __call__(self, *args: str, input: bytes | None = None
                 ) -> subprocess.CompletedProcess[bytes]:
        cli = self.peer.docker if self.name == "docker" else self.peer.podman
        result: subprocess.CompletedProcess[bytes] = cli(*args, input=input)
        return result

    def argv(self, *args: str) -> list[str]:
        return list(self.peer.argv(*args))

    def remove(self, *containers: str) -> None:
        """rm -f, at once (podman would wait 10 s to stop first)."""
        now = ("-t", "0") if self.name == "podman" else ()
        self("rm", "-f", *now, *containers)


@pytest.fixture(scope="module", params=["docker", "podman"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """Each engine in turn, its peer session-wide; when the module is done
    with it, it must have nothing left."""
    peer = request.getfixturevalue(f"{request.param}_peer")
    yield Engine(request.param, peer)
    left = peer.leftovers()
    assert not left, f"left behind by {__name__} through {request.param}: {left}"


@pytest.fixture(autouse=True)
def test_leaves_no_container(engine: Engine) -> Iterator[None]:
    yield
    extra = [c for c in engine.peer.container_ids() if c not in engine.shared]
    listing = ""
    if extra:
        listing = out(engine("ps", "-a", "--no-trunc", "--format",
                             "{{.ID}} {{.Status}} {{.Command}}"))
        engine.remove(*extra)  # so the next tests start clean
    assert not extra, f"containers left:\n{listing}"


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


def inspect(engine: Engine, container: str, template: str) -> str:
    result = engine("inspect", "-f", template, container)
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
def uname_release(engine: Engine) -> str:
    result = engine(*engine.run, "--rm", engine.image, "uname", "-r")
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
    (("sh", "-c", "echo hello; exit 7"), 7),
    (("no-such-command",), 127),
    (("/etc/passwd",), 126),  # exists, not executable
], ids=["exit-7", "missing-127", "not-executable-126"])
def test_exit_code_comes_back(engine: Engine, command: tuple[str, ...], code: int) -> None:
    result = engine(*engine.run, "--rm", engine.image, *command)
    assert result.returncode == code, err(result)
    if code == 7:
        assert out(result) == "hello\n"


def test_stdin_is_passed_byte_exact(engine: Engine) -> None:
    data = os.urandom(1 << 20)
    result = engine(*engine.run, "--rm", "-i", engine.image, "cat", input=data)
    assert result.returncode == 0, err(result)
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_run_tty_gets_a_pty_of_the_window_size(engine: Engine, pty_run: PtyRun) -> None:
    result = pty_run(engine.argv(*engine.run, "--rm", "-it", engine.image,
                                 "sh", "-c", TTY_SCRIPT),
                     engine.peer.env, rows=37, cols=111)
    assert result.returncode == 0, result.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in result.lines), result.lines
    assert "size 37 111" in result.lines


# -- one long-running container -----------------------------------------------------


@pytest.fixture(scope="module")
def sleeper(engine: Engine) -> Iterator[str]:
    result = engine(*engine.run, "-d", "--name", "pykata-sleeper", engine.image,
                    "sh", "-c", SLEEPER_SCRIPT)
    assert result.returncode == 0, err(result)
    container = out(result).strip()
    engine.shared.add(container)
    wait_for(lambda: "started" in out(engine("logs", container)),
             what="the sleeper's first output")
    yield container
    engine.remove(container)
    engine.shared.discard(container)


def test_ps_shows_it_running(engine: Engine, sleeper: str, runtime_is_pykata: bool) -> None:
    listed = engine("ps", "--no-trunc", "--format", "{{.ID}} {{.Status}}")
    assert f"{sleeper} Up" in out(listed), out(listed)
    assert inspect(engine, sleeper, "{{.State.Status}}") == "running"
    if engine.name == "docker":
        # `docker top` asks the runtime for pids (`ps --format json`), then shows
        # the host's `ps -ef` lines of those pids: a VM's processes are not among
        # them, so only runc and crun can show the container's own commands.
        top = engine("top", sleeper)
        assert top.returncode == 0, err(top)
        assert len(out(top).splitlines()) >= 2, out(top)
        if not runtime_is_pykata:
            assert "sleep" in out(top) or "sh -c" in out(top), out(top)


def test_logs_has_its_output(engine: Engine, sleeper: str) -> None:
    result = engine("logs", sleeper)
    assert result.returncode == 0, err(result)
    assert "started" in out(result).splitlines()


def test_exec(engine: Engine, sleeper: str) -> None:
    result = engine("exec", sleeper, "sh", "-c", "echo exec-out; echo exec-err >&2; exit 5")
    assert result.returncode == 5
    assert out(result) == "exec-out\n"
    assert err(result) == "exec-err\n"


def test_exec_stdin_is_byte_exact(engine: Engine, sleeper: str) -> None:
    data = os.urandom(256 << 10)
    result = engine("exec", "-i", sleeper, "cat", input=data)
    assert result.returncode == 0, err(result)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_exec_tty(engine: Engine, sleeper: str, pty_run: PtyRun) -> None:
    result = pty_run(engine.argv("exec", "-it", sleeper, "sh", "-c", TTY_SCRIPT),
                     engine.peer.env, rows=29, cols=97)
    assert result.returncode == 0, result.output
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in result.lines), result.lines
    assert "size 29 97" in result.lines


def test_pause_and_unpause(engine: Engine, sleeper: str) -> None:
    paused = engine("pause", sleeper)
    assert paused.returncode == 0, err(paused)
    try:
        assert inspect(engine, sleeper, "{{.State.Status}}") == "paused"
        assert inspect(engine, sleeper, "{{.State.Paused}}") == "true"
    finally:
        resumed = engine("unpause", sleeper)
    assert resumed.returncode == 0, err(resumed)
    assert inspect(engine, sleeper, "{{.State.Status}}") == "running"
    after = engine("exec", sleeper, "echo", "after-unpause")
    assert (after.returncode, out(after)) == (0, "after-unpause\n"), err(after)


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kKMGT]?i?B)\s*$")
_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def size_of(text: str) -> int:
    """A size as `stats` prints it (docker 201.3MiB, podman 211.1MB)."""
    match = _SIZE.match(text)
    assert match, f"not a size: {text!r}"
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_stats_count_the_pods_vm(engine: Engine, sleeper: str, runtime_is_pykata: bool
                                 ) -> None:
    """The engine reads the container's cgroup on the host; under pykata the
    pod's QEMU runs there, so the memory shown is the VM's."""
    result = engine("stats", "--no-stream", "--format", "{{.MemUsage}}", sleeper)
    assert result.returncode == 0, err(result)
    used = size_of(out(result).split("/")[0])
    assert used > 0, out(result)
    if not runtime_is_pykata:
        return
    mine = [d for d in cgroup_dirs(engine.peer.tag) if sleeper in d.name]
    assert mine, f"no cgroup of {sleeper} under /{engine.peer.tag}"
    qemu = {int(p) for d in mine for p in (d / "cgroup.procs").read_text().split()
            if Path(f"/proc/{p}/comm").read_text().startswith("qemu-system")}
    assert len(qemu) == 1, f"QEMU processes in the container's cgroups: {qemu}"
    rss = resident_bytes(qemu.pop())
    # The cgroup holds QEMU and the pod's owner process, less the page cache
    # the engines leave out: within a factor of QEMU's own resident memory.
    print(f"{engine.name} stats: {used} bytes; QEMU resident: {rss} bytes")
    assert rss / 2 < used < rss * 2, f"stats {used} bytes, QEMU resident {rss} bytes"


def test_kill_with_a_signal_reaches_the_process(engine: Engine, sleeper: str) -> None:
    result = engine("kill", "-s", "USR1", sleeper)
    assert result.returncode == 0, err(result)
    wait_for(lambda: "got-usr1" in out(engine("logs", sleeper)),
             what="the USR1 trap's output")
    assert inspect(engine, sleeper, "{{.State.Status}}") == "running"


def test_stop_sends_sigterm_first(engine: Engine, sleeper: str) -> None:
    """Last user of the sleeper: its TERM trap exits with 3."""
    result = engine("stop", "-t", "60", sleeper)
    assert result.returncode == 0, err(result)
    assert inspect(engine, sleeper, "{{.State.ExitCode}}") == "3"
    assert "got-term" in out(engine("logs", sleeper))


# -- more one-shot containers -------------------------------------------------------


def run_detached(engine: Engine, *command: str) -> str:
    result = engine(*engine.run, "-d", engine.image, *command)
    assert result.returncode == 0, err(result)
    return out(result).strip()


def test_stop_kills_after_the_timeout(engine: Engine) -> None:
    """sleep as PID 1 has no handler for SIGTERM, so it ignores it; SIGKILL follows."""
    container = run_detached(engine, "sleep", "1000")
    try:
        started = time.monotonic()
        result = engine("stop", "-t", "2", container)
        assert result.returncode == 0, err(result)
        assert time.monotonic() - started >= 2
        assert inspect(engine, container, "{{.State.ExitCode}}") == "137"
    finally:
        engine.remove(container)


def test_rm_force_removes_a_running_container(engine: Engine) -> None:
    container = run_detached(engine, "sleep", "1000")
    assert inspect(engine, container, "{{.State.Status}}") == "running"
    engine.remove(container)
    assert engine("inspect", container).returncode != 0
    assert container not in engine.peer.container_ids()
