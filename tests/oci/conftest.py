"""Real docker and podman driving a runc-compatible runtime binary.

The runtime is pykata's `pykata-oci` next to the running interpreter, or the
binary PYKATA_OCI_RUNTIME names (for example /usr/sbin/runc, to check these
tests and their harness against the reference runtime). The tests assert
runc's semantics, so they pass with runc and must pass with pykata-oci.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.conftest import (  # noqa: F401 - pykata's session fixtures
    guest_assets,
    private_run_root,
    require_root,
    unexpected_leftovers,
)
from tests.oci import docker_peer as docker_mod
from tests.oci import podman_peer as podman_mod
from tests.oci.docker_peer import DockerPeer, reap_stale
from tests.oci.images import write_docker_archive
from tests.oci.podman_peer import PodmanPeer

RUNTIME_VAR = "PYKATA_OCI_RUNTIME"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "oci"
# For runc and crun only: the rlimits podman asks for by default (nofile
# 1048576, nproc 32768) fail here with EPERM in runc's init, as root lacks
# CAP_SYS_RESOURCE (the machine's hard nofile limit is 20000); lower limits
# are always allowed. pykata-oci sets rlimits inside its VM and gets the defaults.
HOST_RUNTIME_ULIMITS = ("nofile=1024:1024", "nproc=4096:4096")

# The shared long-running container of test_docker and test_podman: traps that
# show which signal arrived, and a TERM handler with an exit code of its own.
SLEEPER_SCRIPT = (
    "trap 'echo got-usr1' USR1; trap 'echo got-term; exit 3' TERM; "
    "echo started; while :; do sleep 1; done"
)
# docker 20.10 sets a new terminal's size only after the process started (the
# CLI's first resize), so a quick `stty size` can see 0 0: wait for the size.
TTY_SCRIPT = (
    "tty; i=0; while [ $i -lt 100 ]; do s=$(stty size 2>/dev/null); "
    "[ -n \"$s\" ] && [ \"$s\" != '0 0' ] && break; i=$((i+1)); sleep 0.1; done; "
    "echo \"size $s\""
)


def is_pykata(runtime: Path) -> bool:
    return runtime.name.endswith("pykata-oci")


@pytest.fixture(scope="session")
def oci_runtime(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The runtime binary docker and podman are given (pykata's guest assets
    built first). When the engines are gone, no QEMU, mount or state of pykata
    may remain."""
    request.getfixturevalue("guest_assets")
    yield _runtime_path()
    left = unexpected_leftovers()  # the session's shared VM may still run
    assert not left, "pykata left this behind:\n" + "\n".join(left)


def _runtime_path() -> Path:
    override = os.environ.get(RUNTIME_VAR)
    path = Path(override) if override else Path(sys.executable).with_name("pykata-oci")
    if not (path.is_file() and os.access(path, os.X_OK)):
        how = (f"{RUNTIME_VAR}={override} is not an executable file" if override else
               f"{path} is missing: install pykata into this virtualenv "
               f"(scripts/setup-venv), or set {RUNTIME_VAR} to a runc-compatible runtime")
        pytest.fail(how, pytrace=False)
    return path


@pytest.fixture(scope="session")
def runtime_is_pykata(oci_runtime: Path) -> bool:
    return is_pykata(oci_runtime)


@pytest.fixture(scope="session")
def oci_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the docker and podman tests start daemons and mount filesystems: "
                    "run them as root", pytrace=False)


@pytest.fixture(scope="session")
def stale_peers_reaped(oci_root: None) -> list[Path]:
    """Directories, mounts and processes of peers whose session was killed."""
    return reap_stale()


@pytest.fixture(scope="session")
def oci_image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_docker_archive(tmp_path_factory.mktemp("oci-image") / "busybox-docker.tar")


def _runtime_env() -> dict[str, str]:
    """pykata's settings (run root, config) pass through the engines to the runtime."""
    return {k: v for k, v in os.environ.items() if k.startswith("PYKATA_") and k != RUNTIME_VAR}


def _require(missing: list[str], engine: str) -> None:
    if missing:
        pytest.fail(f"{engine} tests need {', '.join(missing)}: run scripts/install-deps",
                    pytrace=False)


@pytest.fixture(scope="session")
def docker_peer(oci_runtime: Path, oci_image_archive: Path,
                stale_peers_reaped: list[Path]) -> Iterator[DockerPeer]:
    """A private dockerd with the runtime registered as `pykata`, the busybox
    image loaded. On the way out every trace of it must be gone."""
    _require(docker_mod.missing_tools(), "docker")
    peer = DockerPeer(oci_runtime, runtime_env=_runtime_env())
    try:
        peer.start()
        peer.load_image(oci_image_archive)
        yield peer
    finally:
        peer.stop(keep_logs=ARTIFACTS)
    left = peer.leftovers(settle=0)
    assert not left, f"docker peer left behind: {left}"


@pytest.fixture(scope="session")
def podman_peer(oci_runtime: Path, oci_image_archive: Path, stale_peers_reaped: list[Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanPeer]:
    """podman with storage, state and configuration of its own and the runtime
    under test; the busybox image loaded."""
    _require(podman_mod.missing_tools(), "podman")
    ulimits = () if is_pykata(oci_runtime) else HOST_RUNTIME_ULIMITS
    runtime = oci_runtime
    if is_pykata(oci_runtime) and _runtime_env():
        # podman runs the runtime's start, kill and delete with an environment
        # of its own, without the session's PYKATA_* settings (conmon's create
        # has them): a wrapper carries them, as a user moving pykata's state
        # root for podman would do.
        runtime = tmp_path_factory.mktemp("podman-runtime") / "pykata-oci"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in _runtime_env().items())
        runtime.write_text(f"#!/bin/sh\n{exports}exec {shlex.quote(str(oci_runtime))} \"$@\"\n")
        runtime.chmod(0o755)
    peer = PodmanPeer(runtime, default_ulimits=ulimits, runtime_env=_runtime_env())
    try:
        peer.load_image(oci_image_archive)
        yield peer
    finally:
        peer.stop(keep_logs=ARTIFACTS)
    left = peer.leftovers(settle=0)
    assert not left, f"podman peer left behind: {left}"


@pytest.fixture(scope="session")
def host_kernel_release() -> str:
    return os.uname().release


# -- a terminal for -t ------------------------------------------------------------


@dataclass
class PtyResult:
    returncode: int
    output: bytes

    @property
    def lines(self) -> list[str]:
        return self.output.decode(errors="replace").replace("\r", "").splitlines()


def run_in_pty(argv: Sequence[str], env: Mapping[str, str], *, rows: int = 24,
               cols: int = 80, timeout: float = 180) -> PtyResult:
    """Run a CLI with a new pseudo-terminal of rows x cols as its controlling
    terminal and stdio, the way a user's shell would, and collect what it writes."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave,
                                env=dict(env), start_new_session=True,
                                preexec_fn=take_terminal)
    finally:
        os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv} did not finish in {timeout} s; "
                                     f"output so far: {bytes(output)!r}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break  # exited, and whatever else holds the terminal is silent
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: every holder of the other end closed it
                    raise
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    return PtyResult(proc.wait(timeout=60), bytes(output))


PtyRun = Callable[..., PtyResult]


@pytest.fixture
def pty_run() -> PtyRun:
    return run_in_pty

