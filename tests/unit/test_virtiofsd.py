"""virtiofsd's records: cleanup ends the virtiofsd a dead owner recorded,
and only a process that still serves that sandbox's export."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.hypervisor import virtiofsd
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.sandbox import cleanup_host_state
from pykata.runtime.state import SandboxState, write_state


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    yield root


def _lookalike(source: Path) -> subprocess.Popen[bytes]:
    """A process whose command line is a virtiofsd's serving `source`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "virtiofsd", "--fd=3", "-o", f"source={source}"])


def _record(paths: SandboxPaths, pid: int) -> None:
    paths.run_dir.mkdir(parents=True)
    write_state(paths.state_file, SandboxState(
        id=paths.key, key=paths.key, front_end="run", owner_pid=1 << 22, owner_start=0,
        console_log=str(paths.run_dir / "console.log"), created=0.0, virtiofsd_pid=pid))


def _ended(proc: subprocess.Popen[bytes]) -> bool:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_cleanup_ends_the_recorded_virtiofsd() -> None:
    """The record's virtiofsd, still serving the sandbox's export, is killed
    before the sandbox's directory goes."""
    paths = SandboxPaths.for_key("dead-owner")
    proc = _lookalike(paths.shared_dir)
    try:
        time.sleep(0.2)
        assert virtiofsd.serves(proc.pid, paths.shared_dir)
        _record(paths, proc.pid)
        cleanup_host_state(paths)
        assert _ended(proc) and not paths.run_dir.exists()
    finally:
        proc.kill()


def test_a_reused_pid_is_left_alone() -> None:
    """A recorded pid that now belongs to a process serving something else
    (or not a virtiofsd at all) is not killed."""
    paths = SandboxPaths.for_key("reused")
    other = _lookalike(paths.root / "sandboxes" / "another" / "shared")
    try:
        time.sleep(0.2)
        _record(paths, other.pid)
        cleanup_host_state(paths)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
