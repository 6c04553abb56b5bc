"""`pykata run` end to end, as a user runs it: a real VM per command."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from tests.functional.conftest import Cli, run_on_terminal


def test_guest_kernel_is_pykatas_own(cli: Cli) -> None:
    """The container runs on pykata's guest kernel, not on the host's."""
    result = cli("run", "--", "uname", "-r")
    assert result.returncode == 0, result.err
    release = result.out.strip()
    assert release.endswith("-pykata")
    assert release != platform.release()


def test_stdout_and_stderr_stay_separate(cli: Cli) -> None:
    """What the container writes to stdout and stderr arrives on the same streams."""
    result = cli("run", "--", "sh", "-c", "echo to-out; echo to-err >&2; echo more-out")
    assert result.returncode == 0, result.err
    assert result.out == "to-out\nmore-out\n"
    assert result.err.endswith("to-err\n")
    assert "to-out" not in result.err


def test_one_mebibyte_of_stdin_comes_back_byte_for_byte(cli: Cli) -> None:
    """1 MiB of random bytes piped through `cat` in the guest returns unchanged."""
    data = os.urandom(1 << 20)
    result = cli("run", "-i", "--", "cat", input=data)
    assert result.returncode == 0, result.err
    assert len(result.stdout) == len(data)
    assert result.stdout == data


def test_exit_code_comes_back(cli: Cli) -> None:
    """The command line exits with the container's exit code."""
    result = cli("run", "--", "sh", "-c", "exit 42")
    assert result.returncode == 42, result.err


def test_sigterm_to_run_stops_the_container_with_137(guest_assets: object) -> None:
    """SIGTERM to `pykata run` reaches the container; an init that does not handle
    it (PID 1 ignores it) is killed after the grace period, and the run exits
    128+9 like a killed container."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "--", "sh", "-c", "echo up; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 137
    finally:
        proc.kill()
        proc.wait()


def test_tty_run_gets_a_terminal_of_the_right_size(guest_assets: object) -> None:
    """`run -t` under a real terminal: the container sees a /dev/pts terminal
    with the host terminal's size."""
    text, code = run_on_terminal(
        [sys.executable, "-m", "pykata.cli.main", "run", "-t", "--",
         "sh", "-c", "tty; stty size; echo done"], 37, 111, until=b"done")
    assert "/dev/pts/" in text, text
    assert "37 111" in text, text
    assert code == 0, text


def test_volumes_share_host_paths_read_write_and_read_only(cli: Cli, tmp_path: Path) -> None:
    """`-v` shares a host directory (writable) and a file (read-only) into the
    container; writes reach the host, the read-only file stays as it was, and
    the host's files are still there after the container is gone."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in").write_text("from-host\n")
    note = tmp_path / "note"
    note.write_text("read-only\n")
    result = cli("run", "-v", f"{shared}:/data", "-v", f"{note}:/etc/note:ro", "--",
                 "sh", "-c", "cat /data/in /etc/note; echo from-guest > /data/out; "
                 "echo changed > /etc/note; echo write=$?")
    assert result.returncode == 0, result.err
    assert result.out == "from-host\nread-only\nwrite=1\n"
    assert "Read-only file system" in result.err
    assert (shared / "out").read_text() == "from-guest\n"
    assert (shared / "in").read_text() == "from-host\n"
    assert note.read_text() == "read-only\n"


def test_volume_whose_host_path_is_missing(cli: Cli, tmp_path: Path) -> None:
    """A `-v` host path that does not exist is named before any VM boots."""
    missing = tmp_path / "nowhere"
    result = cli("run", "-v", f"{missing}:/data", "--", "true")
    assert result.returncode == 1
    assert f"volume '/data': host path {missing}: No such file or directory" in result.err
    assert "TCG" not in result.err  # refused before QEMU was chosen, let alone started
