"""Agent parts that run anywhere: the guest spec rewrite, the reaper, crun's log,
process stdio over real pipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pykata.agent import guest_spec
from pykata.agent.crun import last_error
from pykata.agent.process import EndOfStream, Process, Stdio
from pykata.ttrpc import Code, StatusError


def _spec() -> dict[str, object]:
    return {
        "process": {"args": ["sh"], "apparmorProfile": "x", "selinuxLabel": "y"},
        "hooks": {"prestart": [{"path": "/host/hook"}]},
        "linux": {
            "cgroupsPath": "system.slice:cri:abc",
            "mountLabel": "z",
            "namespaces": [
                {"type": "pid", "path": "/proc/42/ns/pid"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ],
        },
    }


def test_guest_spec_drops_host_only_settings() -> None:
    """Hooks, LSM labels and the host network namespace do not reach crun."""
    spec = guest_spec.for_guest(_spec(), "c1", sandbox_pid=None, share_pid_ns=False)
    assert "hooks" not in spec
    assert "apparmorProfile" not in spec["process"] and "mountLabel" not in spec["linux"]
    assert spec["linux"]["cgroupsPath"] == "/pykata/c1"
    kinds = [ns["type"] for ns in spec["linux"]["namespaces"]]
    assert "network" not in kinds
    assert all("path" not in ns for ns in spec["linux"]["namespaces"])


def test_guest_spec_joins_the_sandbox_namespaces_it_names() -> None:
    """Namespaces the host named are the sandbox container's in the guest; the
    PID namespace only when the pod shares it."""
    shared = guest_spec.for_guest(_spec(), "c1", sandbox_pid=7, share_pid_ns=True)
    paths = {ns["type"]: ns.get("path") for ns in shared["linux"]["namespaces"]}
    assert paths == {"pid": "/proc/7/ns/pid", "ipc": "/proc/7/ns/ipc", "uts": None,
                     "mount": None}
    private = guest_spec.for_guest(_spec(), "c1", sandbox_pid=7, share_pid_ns=False)
    paths = {ns["type"]: ns.get("path") for ns in private["linux"]["namespaces"]}
    assert paths["pid"] is None and paths["ipc"] == "/proc/7/ns/ipc"


_REAPER_SCRIPT = r"""
import asyncio, os, signal, time
from pykata.agent.reaper import Reaper
from pykata.agent.spawn import run, spawn

async def main():
    reaper = Reaper()
    reaper.install()
    _, three = spawn(reaper, ["/bin/sh", "-c", "exit 3"])
    _, killed = spawn(reaper, ["/bin/sh", "-c", "kill -9 $$"])
    early = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 5"], os.environ)
    older = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 6"], os.environ)
    await asyncio.sleep(0.5)          # both reaped before anyone asked for them
    result = await run(reaper, ["/bin/sh", "-c", "echo out; echo err >&2; exit 4"])
    early_code = await reaper.watch(early)
    stale = reaper.watch(older, since=time.monotonic() + 100)
    print(await three, await killed, early_code, result.code,
          result.stdout.decode().strip(), result.stderr.decode().strip(), stale.done())

asyncio.run(main())
"""


def test_reaper_reports_codes_and_signals() -> None:
    """Exit codes, 128+signal, statuses reaped before being asked for, captured
    output; a status older than the process's start is not taken for its own.
    (Runs in a child process: the reaper takes every SIGCHLD of its process.)"""
    out = subprocess.run([sys.executable, "-c", _REAPER_SCRIPT], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "137", "5", "4", "out", "err", "False"]


def test_crun_last_error(tmp_path: Path) -> None:
    """crun's own message is taken from its JSON log, or a plain line, or nothing."""
    log = tmp_path / "crun.log"
    log.write_text(json.dumps({"msg": "first", "level": "error"}) + "\n" +
                   json.dumps({"msg": "pivot_root: Invalid argument", "level": "error"}) + "\n")
    assert last_error(log) == "pivot_root: Invalid argument"
    log.write_text("plain failure\n")
    assert last_error(log) == "plain failure"
    assert last_error(tmp_path / "missing.log") == ""


async def test_process_stdio_over_pipes() -> None:
    """stdin reaches the child's end; the child's output is read, then EOF as
    OUT_OF_RANGE; closed stdin and a missing terminal are FAILED_PRECONDITION."""
    import os

    stdio = Stdio.pipes()
    proc = Process("c", "e", stdio)
    child_in, child_out, child_err = stdio.child_fds
    assert child_in is not None and child_out is not None and child_err is not None
    await proc.open_streams()
    assert await proc.write_stdin(b"ping") == 4
    assert os.read(child_in, 10) == b"ping"
    os.write(child_out, b"pong")
    assert await proc.read("stdout", 100) == b"pong"
    stdio.close_child_ends()
    with pytest.raises(EndOfStream) as end:
        await proc.read("stdout", 100)
    assert end.value.code == Code.OUT_OF_RANGE
    proc.close_stdin()
    with pytest.raises(StatusError) as closed:
        await proc.write_stdin(b"more")
    assert closed.value.code == Code.FAILED_PRECONDITION
    with pytest.raises(StatusError) as no_tty:
        proc.resize(24, 80)
    assert no_tty.value.code == Code.FAILED_PRECONDITION
    proc.close()
