"""The debug console (`pykata exec SANDBOX_ID`) on real VMs, from every front
end: a shell on a real pty in the VM's root environment (a prompt, a command
typed and its output, a resize the guest sees, ^C, the exit status), the
one-command form's status and streams, the host's session record, and the
refusal of a pod that did not enable it. The `pykata run` pod restores from
a VM template, so per-pod settings reaching a VM that booted before the pod
existed are tested there; the containerd pod enables the console with the
allowlisted annotation, the pykata-oci one with the configuration."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykata.runtime.debug_console import ANNOTATION, AUDIT_LOG
from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import read_sandbox_state
from tests.functional.conftest import (
    CliResult,
    _shared_ids,
    pykata_cli,
    session_config_text,
    unexpected_leftovers,
)
from tests.functional.containerd_peer import IMAGE, RUNTIME, PrivateContainerd
from tests.functional.oci_tools import Oci, Waiter, make_bundle

PROMPT = b"debug-console:/# "
PYKATA = [sys.executable, "-m", "pykata.cli.main"]


def _config_text(*, console: bool = False, annotation: bool = False,
                 template_root: Path | None = None) -> str:
    text = session_config_text()
    if console:
        text = _sub(text, "debug_console_enabled = false", "debug_console_enabled = true")
    if annotation:
        text = _sub(text, "enable_annotations = []\n\n[runtime]",
                    'enable_annotations = ["debug_console_enabled"]\n\n[runtime]')
    if template_root is not None:
        text = _sub(text, "enable_template = false", "enable_template = true")
        text = _sub(text, 'template_path = ""', f'template_path = "{template_root}"')
    return text


def _sub(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the packaged configuration has no single {old!r}"
    return text.replace(old, new)


def _exec(sid: str, *cmd: str, input: bytes | None = None) -> CliResult:
    return pykata_cli("exec", sid, "--", *cmd, input=input, timeout=120)


class Terminal:
    """`pykata exec SANDBOX_ID` on a new pty, typed into as a user would."""

    def __init__(self, sid: str, rows: int = 30, columns: int = 100) -> None:
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: pykata exec on the terminal
            os.environ["TERM"] = "xterm"
            os.execvp(PYKATA[0], [*PYKATA, "exec", sid])
        self.resize(rows, columns)
        self.seen = b""

    def resize(self, rows: int, columns: int) -> None:
        # As a terminal emulator does: the kernel sends the foreground
        # process (pykata exec) SIGWINCH.
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def expect(self, pattern: bytes, timeout: float = 60) -> bytes:
        """Read until `pattern` (a regular expression) shows; what came before it."""
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.seen)) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"the terminal closed before {pattern!r}: {self.seen[-500:]!r}"
                self.seen += chunk
        before, self.seen = self.seen[:match.start()], self.seen[match.end():]
        return before

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, "pykata exec did not end"
            with __import__("contextlib").suppress(OSError):
                os.read(self.master, 4096)
            time.sleep(0.05)

    def close(self) -> None:
        with __import__("contextlib").suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.master)


def _pod_of(owner_pid: int, timeout: float = 240) -> str:
    """The sandbox id of the pod `owner_pid` owns, once it serves its socket."""
    deadline = time.monotonic() + timeout
    sandboxes = run_root() / "sandboxes"
    while time.monotonic() < deadline:
        for entry in sandboxes.glob("*/state.json") if sandboxes.is_dir() else ():
            try:
                state = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue
            if state.get("owner_pid") == owner_pid and state.get("control_socket"):
                return str(state["id"])
        time.sleep(0.2)
    raise AssertionError(f"no pod of pid {owner_pid} came up")


def _start_run(*options: str) -> subprocess.Popen[bytes]:
    """`pykata run` of an idle container that ends on SIGTERM."""
    return subprocess.Popen([*PYKATA, *options, "run", "--", "sh", "-c",
                             "trap 'exit 0' TERM; sleep 600 & wait"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _stop_run(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def shared_run_pod(conf: Path, what: str) -> Iterator[str]:
    """An idle `pykata run` pod of configuration `conf`, shared by a module's
    tests as the session's shared VM is: its sandbox id. Ending it leaves
    nothing of it behind."""
    proc = _start_run("--config", str(conf))
    sid = ""
    try:
        sid = _pod_of(proc.pid)
        _shared_ids.add(sid)
        yield sid
    finally:
        _stop_run(proc)
        _shared_ids.discard(sid)
        left = [line for line in unexpected_leftovers() if sid and sid in line]
        assert not left, f"{what} left this behind:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def run_pod(guest_assets: object, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    """A `pykata run` pod with the console enabled, restored from a VM
    template (the first run builds it): its sandbox id."""
    base = tmp_path_factory.mktemp("console-run")
    conf = base / "pykata.toml"
    conf.write_text(_config_text(console=True, template_root=base / "templates"))
    try:
        with shared_run_pod(conf, "the console's pykata run pod") as sid:
            yield sid
    finally:
        if (base / "templates").exists():
            pykata_cli("--config", str(conf), "factory", "destroy")


def test_a_shell_on_a_real_terminal(run_pod: str) -> None:
    """`pykata exec ID` on a pty: the prompt, a command typed and its output,
    the terminal's size and a resize seen by the guest, ^C ending the
    foreground command, the VM's root environment (the agent's process and
    log, not a container's), and the shell's exit status as pykata exec's."""
    state = read_sandbox_state(SandboxPaths.for_key(run_pod))
    assert state.boot == "template"
    term = Terminal(run_pod, 30, 100)
    try:
        term.expect(re.escape(PROMPT))
        term.type(b"echo $((6*7))\r")
        term.expect(rb"\r\n42\r\n")
        term.type(b"stty size; echo $TERM; tty\r")
        term.expect(rb"30 100\r\nxterm\r\n/dev/pts/\d+")
        term.resize(41, 132)
        time.sleep(1)  # SIGWINCH, then TtyWinResize through the owner
        term.type(b"stty size\r")
        term.expect(rb"41 132")
        term.type(b"sleep 300; echo after-$((2+3))\r")
        time.sleep(1)
        term.type(b"\x03")
        assert b"after-5" not in term.expect(re.escape(PROMPT))
        term.type(b"ps -o pid,args | grep -c '[p]ykata.agent'; "
                  b"grep -c 'sandbox .* ready' /run/pykata/agent.log; echo done-$((1+1))\r")
        seen = term.expect(rb"done-2")
        assert re.search(rb"\r\n1\r\n1\r\n", seen), seen
        term.type(b"exit 3\r")
        assert term.exit_status() == 3
    finally:
        term.close()


def test_one_command_exit_status_streams_and_the_record(run_pod: str) -> None:
    """`pykata exec ID -- CMD`: the command's exit status, its stdout and
    stderr apart, stdin passed through; each session is recorded on the host
    with its caller, command and duration."""
    result = _exec(run_pod, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7, result.err
    assert result.out == "out\n" and result.err == "err\n"
    piped = _exec(run_pod, "sh", "-c", "tr a-z A-Z", input=b"from host\n")
    assert (piped.returncode, piped.out) == (0, "FROM HOST\n"), piped.err
    record = (run_root() / AUDIT_LOG).read_text()
    line = next(line for line in record.splitlines()
                if f"pod={run_pod}" in line and "exited with status 7" in line)
    assert "uid=0" in line and "command=" in line and re.search(r"after \d+\.\ds", line)


def test_a_session_whose_client_is_killed_leaves_nothing_running(run_pod: str) -> None:
    """SIGKILL of `pykata exec` (no goodbye from it) ends its command in the
    guest, children included: no root shell or process is left behind."""
    client = subprocess.Popen([*PYKATA, "exec", run_pod, "--", "sh", "-c",
                               "sleep 301; echo after"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)

    def sleepers() -> int:
        listed = _exec(run_pod, "sh", "-c", "ps -o args | grep -c '^sleep 301' || true")
        return int(listed.out.strip() or 0)

    try:
        deadline = time.monotonic() + 60
        while sleepers() == 0:
            assert time.monotonic() < deadline, "the session's command never ran"
            time.sleep(0.5)
    finally:
        client.kill()
        out, _ = client.communicate()
    assert b"after" not in out
    deadline = time.monotonic() + 30
    while sleepers():
        assert time.monotonic() < deadline, "the session's process outlived its client"
        time.sleep(0.5)
    record = (run_root() / AUDIT_LOG).read_text()
    assert "its client went away" in record


def test_a_pod_without_the_console_refuses_and_says_how(
        guest_assets: object, tmp_path: Path) -> None:
    """The default configuration: refused, naming the setting and the
    annotation; nothing runs in the guest."""
    proc = _start_run()
    try:
        sid = _pod_of(proc.pid)
        result = _exec(sid, "sh", "-c", "echo ran")
        assert result.returncode == 1 and "ran" not in result.out
        assert "debug_console_enabled = true" in result.err and ANNOTATION in result.err
    finally:
        _stop_run(proc)


def test_a_containerd_pod_enabled_by_its_annotation(
        containerd: PrivateContainerd, shim_config: Callable[[str], None]) -> None:
    """A shim's pod with the allowlisted annotation: the console sees the
    container's processes from outside (the VM's whole process table) and
    answers with its status; without the annotation, the same shim refuses."""
    shim_config(_config_text(annotation=True))
    cid, plain = "console-ctr", "console-ctr-off"
    started = containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                             f"{ANNOTATION}=true", IMAGE, cid, "sleep", "601")
    assert started.returncode == 0, started.err
    try:
        result = _exec(cid, "sh", "-c", "ps -o args | grep -c '^sleep 601'; exit 4")
        assert (result.returncode, result.out) == (4, "1\n"), result.err
        started = containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, plain, "sleep", "600")
        assert started.returncode == 0, started.err
        refused = _exec(plain, "true")
        assert refused.returncode == 1 and "not enabled" in refused.err
    finally:
        containerd.remove(cid)
        containerd.remove(plain)


def test_a_pykata_oci_container_enabled_by_the_configuration(
        guest_assets: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pykata-oci's pod (its monitor owns it): `pykata exec` by the
    container's id, a command's output and status."""
    conf = tmp_path / "pykata.toml"
    conf.write_text(_config_text(console=True))
    monkeypatch.setenv("PYKATA_CONFIG", str(conf))
    oci = Oci(tmp_path / "root", log=tmp_path / "oci-log.json")
    bundle = make_bundle(tmp_path / "bundle", ["sleep", "600"])
    waiter = Waiter(oci, "create", "--bundle", str(bundle), "--pid-file",
                    str(tmp_path / "pid"), "oci-console")
    try:
        assert waiter.wait_created().get("rc") == 0, oci.log and oci.log.read_text()
        assert oci("start", "oci-console").returncode == 0
        result = _exec("oci-console", "sh", "-c", "cat /proc/1/comm; exit 6")
        assert result.returncode == 6, result.err
        assert result.out.strip() != "sleep"  # the VM's init, not the container's
    finally:
        oci("kill", "oci-console", "KILL")
        waiter.finish()
        oci("delete", "--force", "oci-console")


def test_a_pod_on_a_vm_from_the_cache(
        containerd: PrivateContainerd, shim_config: Callable[[str], None],
        tmp_path: Path) -> None:
    """A containerd pod that took a warm VM from the VM cache (booted before
    the pod existed) gets its console setting at CreateSandbox: the console
    works there, with the annotation."""
    from pykata.runtime.keys import pod_key
    from tests.functional.cache_peer import running_cache
    from tests.functional.containerd_peer import NAMESPACE

    with running_cache(tmp_path / "cache", count=1, template=True,
                       base_text=_config_text(annotation=True)) as cache:
        shim_config(cache.config_file.read_text())
        cid = "console-cached"
        started = containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                                 f"{ANNOTATION}=true", IMAGE, cid, "sleep", "600")
        assert started.returncode == 0, started.err
        try:
            state = read_sandbox_state(SandboxPaths.for_key(
                pod_key(str(containerd.socket), NAMESPACE, cid)))
            assert state.boot == "cache"
            result = _exec(cid, "sh", "-c", "hostname; exit 8")
            assert result.returncode == 8, result.err
        finally:
            containerd.remove(cid)
