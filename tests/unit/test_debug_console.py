"""The debug console's parts without a VM: the owner's gate and session
record over the real control socket and a fake agent, the agent's own
refusal and process start (real busybox on the host), the annotation, the
peer credentials the record names, and the command line's refusals."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.agent import debug_console as guest
from pykata.agent.reaper import Reaper
from pykata.channels import AGENT_SERVICE, DEBUG_CONSOLE_ID
from pykata.cli.main import main as cli_main
from pykata.errors import AgentError, ConfigError, NotFoundError, PykataError
from pykata.protocols import agent_pb2, pod_pb2
from pykata.runtime import debug_console as owner
from pykata.runtime import pod_options
from pykata.runtime.container import bind_rootfs
from pykata.runtime.control import control_socket, serve_control
from pykata.runtime.control_client import PodClient
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.pod import Pod, PodPolicy
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from pykata.ttrpc import Code, RequestContext, Server, StatusError
from tests.unit.pod_fakes import FakeAgent, FakeShare, FakeSource, fake_config, spec


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    yield root


class ConsoleAgent(FakeAgent):
    """The fake agent, with the console: refused unless CreateSandbox enabled it."""

    def __init__(self) -> None:
        super().__init__()
        self.console_enabled: bool | None = None

    def register(self, server: Server) -> None:
        super().register(server)
        server.register(AGENT_SERVICE, "StartDebugConsole", agent_pb2.StartDebugConsoleRequest,
                        self._logged("StartDebugConsole"))

    async def CreateSandbox(self, req: Any) -> Any:
        self.console_enabled = req.debug_console
        return await super().CreateSandbox(req)

    async def StartDebugConsole(self, req: agent_pb2.StartDebugConsoleRequest) -> Any:
        if not self.console_enabled:
            raise StatusError(Code.PERMISSION_DENIED, "not enabled for this sandbox")
        proc = self._new(list(req.args) or ["sh"])
        self.containers.setdefault(DEBUG_CONSOLE_ID, {})[req.exec_id] = proc
        self._run(proc)
        from google.protobuf import empty_pb2
        return empty_pb2.Empty()


async def _pod(tmp_path: Path, enabled: bool | None, *, default: bool = False
               ) -> tuple[Pod, ConsoleAgent, Server, Path]:
    source = FakeSource()
    agent = ConsoleAgent()
    source.agent = agent
    cfg = fake_config(tmp_path)
    cfg = config.Config(qemu=cfg.qemu, agent=config.AgentConfig(debug_console_enabled=default),
                        source="/etc/pykata/test.toml")
    sandbox = Sandbox("pod1", cfg, SandboxOptions(debug_console=enabled), front_end="run",
                      source=source, share=FakeShare(SandboxPaths.for_key("pod1")))  # type: ignore[arg-type]
    pod = Pod(sandbox, policy=PodPolicy())
    await pod.start()
    path = control_socket(sandbox.paths.run_dir)
    server = await serve_control(pod, path)
    return pod, agent, server, path


def _request(*args: str, exec_id: str = "console-1") -> pod_pb2.DebugConsoleRequest:
    return pod_pb2.DebugConsoleRequest(exec_id=exec_id, args=list(args))


async def _end(pod: Pod, server: Server) -> None:
    await server.aclose()
    await pod.stop()


async def test_refused_when_disabled_saying_how_to_enable(tmp_path: Path,
                                                          run_root: Path) -> None:
    """A pod without the console refuses the session, naming the setting and
    the annotation; the agent is never asked, and the refusal is recorded."""
    pod, agent, server, path = await _pod(tmp_path, None)
    assert agent.console_enabled is False
    async with await PodClient.connect(path, "pod1") as client:
        with pytest.raises(PykataError) as refused:
            await client.debug_console(_request("true"))
    text = str(refused.value)
    assert "debug_console_enabled = true" in text and "/etc/pykata/test.toml" in text
    assert owner.ANNOTATION in text
    assert "StartDebugConsole" not in agent.calls
    assert "refused: not enabled" in (run_root / owner.AUDIT_LOG).read_text()
    await _end(pod, server)


async def test_console_path_is_closed_when_disabled(tmp_path: Path) -> None:
    """With the console off, the console's pseudo-container is unreachable
    through the forwarded agent calls, even for a process the agent has."""
    pod, agent, server, path = await _pod(tmp_path, False)
    agent.containers[DEBUG_CONSOLE_ID] = {"planted": agent._new(["sh"])}
    async with await PodClient.connect(path, "pod1") as client:
        for call in (client.agent.read_stream("stdout", DEBUG_CONSOLE_ID, "planted", 10),
                     client.agent.write_stdin(DEBUG_CONSOLE_ID, "planted", b"id\n"),
                     client.agent.signal_process(DEBUG_CONSOLE_ID, "planted", 9)):
            with pytest.raises(AgentError) as refused:
                await call
            assert refused.value.code == Code.PERMISSION_DENIED
    assert not {"ReadStdout", "WriteStdin", "SignalProcess"} & set(agent.calls)
    await _end(pod, server)


async def test_a_session_runs_and_is_recorded_with_its_caller(tmp_path: Path,
                                                              run_root: Path) -> None:
    """Enabled by the pod's option: CreateSandbox carries it, the command's
    exit status comes back, its output is relayed, and the host's record
    names the caller (SO_PEERCRED), the command, the status and the time."""
    pod, agent, server, path = await _pod(tmp_path, True)
    assert agent.console_enabled is True
    async with await PodClient.connect(path, "pod1") as client:
        assert await client.debug_console(_request("exit", "7")) == 7
        assert await client.debug_console(_request("echo", "hi", exec_id="e2")) == 0
        assert await client.agent.read_stream("stdout", DEBUG_CONSOLE_ID, "e2", 10) == b"hi\n"
    record = (run_root / owner.AUDIT_LOG).read_text().splitlines()
    assert len(record) == 4, record
    assert f"uid={os.getuid()}" in record[1] and f"pid={os.getpid()}" in record[1]
    assert "command='exit 7'" in record[1] and "exited with status 7 after" in record[1]
    assert oct((run_root / owner.AUDIT_LOG).stat().st_mode & 0o777) == "0o600"
    await _end(pod, server)


async def test_the_configuration_default_enables_and_an_option_overrides(tmp_path: Path
                                                                         ) -> None:
    """[agent] debug_console_enabled turns it on for pods that do not say;
    a pod's own false wins over it."""
    pod, agent, server, _ = await _pod(tmp_path / "a", None, default=True)
    assert agent.console_enabled is True
    await _end(pod, server)
    pod, agent, server, _ = await _pod(tmp_path / "b", False, default=True)
    assert agent.console_enabled is False
    await _end(pod, server)


async def test_console_path_reaches_no_other_process(tmp_path: Path) -> None:
    """Enabled, the console's pseudo-container reaches only sessions this
    owner started: not a container's process by its exec id, not a session
    id nobody opened, not the process list of the container."""
    pod, agent, server, path = await _pod(tmp_path, True)
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    mounts = bind_rootfs(rootfs)
    await pod.create_container("web", spec("sleep"), lambda _c: mounts, io=None)
    await pod.start_process("web")
    agent.containers[DEBUG_CONSOLE_ID] = {"web": agent._new(["sh"])}
    async with await PodClient.connect(path, "pod1") as client:
        for exec_id in ("web", "", "nobody-opened"):
            with pytest.raises(AgentError) as refused:
                await client.agent.signal_process(DEBUG_CONSOLE_ID, exec_id, 9)
            assert refused.value.code == Code.NOT_FOUND
        with pytest.raises(AgentError):
            await client.agent.list_processes(DEBUG_CONSOLE_ID)
    assert "SignalProcess" not in agent.calls and "ListProcesses" not in agent.calls
    assert agent.containers["web"]["web"].signals == []
    await _end(pod, server)


async def test_a_client_that_goes_away_ends_its_session(tmp_path: Path,
                                                        run_root: Path) -> None:
    """The session's process is killed when its client's connection closes,
    and the record says so: no shell is left running in the guest."""
    pod, agent, server, path = await _pod(tmp_path, True)
    client = await PodClient.connect(path, "pod1")
    call = asyncio.ensure_future(client.debug_console(_request()))
    for _ in range(100):
        if DEBUG_CONSOLE_ID in agent.containers:
            break
        await asyncio.sleep(0.02)
    shell = agent.containers[DEBUG_CONSOLE_ID]["console-1"]
    await client.close()
    await asyncio.gather(call, return_exceptions=True)
    await asyncio.wait_for(asyncio.shield(shell.exit), 5)
    assert shell.signals == [signal.SIGKILL]
    for _ in range(100):
        if "went away" in (run_root / owner.AUDIT_LOG).read_text():
            break
        await asyncio.sleep(0.02)
    assert "ended: its client went away after" in (run_root / owner.AUDIT_LOG).read_text()
    await _end(pod, server)


async def test_oversized_or_nul_commands_are_refused(tmp_path: Path) -> None:
    """A command line is bounded in count and size, and has no NUL."""
    pod, agent, server, path = await _pod(tmp_path, True)
    async with await PodClient.connect(path, "pod1") as client:
        with pytest.raises(PykataError, match="too long"):
            await client.debug_console(_request(*["x"] * (owner.MAX_ARGS + 1)))
        with pytest.raises(PykataError, match="too long"):
            await client.debug_console(_request("x" * (owner.MAX_ARGS_BYTES + 1)))
        with pytest.raises(PykataError, match="NUL"):
            await client.debug_console(_request("a\0b"))
    assert "StartDebugConsole" not in agent.calls
    await _end(pod, server)


def test_audit_record_stays_bounded_and_follows_no_link(tmp_path: Path) -> None:
    """The session record rotates at its limit, and a symlink planted at its
    path is not written through."""
    (tmp_path / owner.AUDIT_LOG).write_text("x" * owner.AUDIT_LOG_LIMIT)
    owner.write_audit(tmp_path, "next")
    assert (tmp_path / owner.AUDIT_LOG).read_text().endswith(" next\n")
    assert (tmp_path / (owner.AUDIT_LOG + ".1")).stat().st_size == owner.AUDIT_LOG_LIMIT
    victim = tmp_path / "victim"
    victim.write_text("")
    other = tmp_path / "other"
    other.mkdir()
    (other / owner.AUDIT_LOG).symlink_to(victim)
    owner.write_audit(other, "line")
    assert victim.read_text() == ""


def _cfg(*allowed: str) -> config.Config:
    return config.parse({"agent": {"enable_annotations": list(allowed)}},
                        "/etc/pykata/test.toml")


def test_the_annotation_is_honoured_only_when_allowed() -> None:
    """io.katacontainers.config.agent.debug_console_enabled sets the pod's
    console only when [agent] enable_annotations allows it; its value is a
    boolean word."""
    key = owner.ANNOTATION
    with pytest.raises(ConfigError, match=r"\[agent\] enable_annotations"):
        pod_options.sandbox_options({key: "true"}, _cfg())
    assert pod_options.sandbox_options({key: "true"}, _cfg("debug_console.*")).debug_console
    assert pod_options.sandbox_options({key: "false"}, _cfg(".*")).debug_console is False
    assert pod_options.sandbox_options({}, _cfg(".*")).debug_console is None
    with pytest.raises(ConfigError, match="must be true or false"):
        pod_options.sandbox_options({key: "yes please"}, _cfg(".*"))
    with pytest.raises(ConfigError, match="not supported"):
        pod_options.sandbox_options({owner.ANNOTATION + "_x": "true"}, _cfg(".*"))


def test_the_guest_environment_is_minimal_and_term_is_checked() -> None:
    """The console's processes get PATH, HOME, TERM (the host's, when it is a
    plain name) and the prompt; a TERM with anything else becomes dumb."""
    env = guest.console_env("xterm-256color")
    assert env["TERM"] == "xterm-256color" and env["HOME"] == "/"
    assert set(env) == {"PATH", "HOME", "TERM", "PS1"}
    assert guest.console_env("x\x1b]0;evil\x07")["TERM"] == "dumb"
    assert guest.console_env("")["TERM"] == "dumb"
    assert guest.console_argv([], True) == [guest.BUSYBOX, "setsid", "-c", "sh"]
    assert guest.console_argv(["ls", "/"], False) == [guest.BUSYBOX, "setsid", "ls", "/"]


async def _guest_session(console: guest.DebugConsole, args: list[str],
                         terminal: bool) -> tuple[int, bytes]:
    await console.start(agent_pb2.StartDebugConsoleRequest(
        exec_id="s1", args=args, terminal=terminal, term="xterm", rows=33, columns=99))
    proc = console.process("s1")
    out = b""
    code = await console.wait("s1")
    while True:
        try:
            out += await proc.read("stdout", 4096)
        except StatusError:
            break
    console.close_all()
    return code, out


@pytest.mark.skipif(not os.path.exists(guest.BUSYBOX), reason="needs /bin/busybox")
async def test_the_agent_refuses_unless_enabled_and_runs_in_a_session() -> None:
    """The agent's side: refused before CreateSandbox enabled it; then a
    command runs in its own session on a pty of the asked size, with its
    exit status."""
    reaper = Reaper()
    reaper.install()
    console = guest.DebugConsole(reaper)
    with pytest.raises(StatusError) as refused:
        await console.start(agent_pb2.StartDebugConsoleRequest(exec_id="s1"))
    assert refused.value.code == Code.PERMISSION_DENIED
    console.enabled = True  # enable() also starts the log copy in the guest's /run
    code, out = await _guest_session(
        console, ["sh", "-c", "stty size; echo $TERM; set -- $(cat /proc/$$/stat); "
                              # Its own session (field 6), with a controlling tty (7).
                              "[ $6 = $$ ] && [ $7 != 0 ] && exit 5; exit 9"], True)
    assert code == 5
    assert b"33 99" in out and b"xterm" in out
    with pytest.raises(StatusError) as bad:
        await console.start(agent_pb2.StartDebugConsoleRequest(exec_id="../x"))
    assert bad.value.code == Code.INVALID_ARGUMENT
    asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)


def test_peer_credentials_name_the_caller(tmp_path: Path) -> None:
    """A handler on a unix socket learns the caller's pid and uid."""
    seen: list[Any] = []

    async def handler(req: Any, ctx: RequestContext) -> Any:
        seen.append(ctx.peer)
        from google.protobuf import empty_pb2
        return empty_pb2.Empty()

    async def go() -> None:
        from google.protobuf import empty_pb2

        from pykata.ttrpc import Client
        server = Server()
        server.register("s", "m", empty_pb2.Empty, handler)
        await server.serve_unix(tmp_path / "s.sock")
        client = await Client.connect_unix(tmp_path / "s.sock")
        await client.call("s", "m", empty_pb2.Empty(), empty_pb2.Empty)
        await client.aclose()
        await server.aclose()

    asyncio.run(go())
    assert seen[0].pid == os.getpid() and seen[0].uid == os.getuid()


def test_exec_without_a_terminal_or_a_command_says_what_to_do(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """No tty on stdin and no command: refused, naming the command form."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(os, "isatty", lambda fd: False)
    try:
        assert cli_main(["exec", "pod1"]) == 1
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "needs a terminal" in capsys.readouterr().err


def test_exec_of_an_unknown_pod_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """A sandbox id no running pod has is named in the error."""
    with pytest.raises(NotFoundError, match="no running pod has sandbox id 'nosuch'"):
        from pykata.runtime.console_client import find_pod
        find_pod("nosuch")
    assert cli_main(["exec", "nosuch", "--", "true"]) == 1
    assert "no running pod" in capsys.readouterr().err


async def test_an_exit_status_out_of_range_from_the_guest_is_not_passed_on(
        tmp_path: Path, run_root: Path) -> None:
    """A hostile agent's exit status for a session is clamped like any
    process's: pykata exec never exits with a number the guest made up."""
    from pykata.runtime.agent_client import INVALID_EXIT_STATUS

    pod, agent, server, path = await _pod(tmp_path, True)
    async with await PodClient.connect(path, "pod1") as client:
        call = asyncio.ensure_future(client.debug_console(_request("sleep")))
        for _ in range(100):
            if DEBUG_CONSOLE_ID in agent.containers:
                break
            await asyncio.sleep(0.02)
        agent.end(DEBUG_CONSOLE_ID, "console-1", 70000)
        assert await asyncio.wait_for(call, 5) == INVALID_EXIT_STATUS
    assert f"exited with status {INVALID_EXIT_STATUS}" in (run_root / owner.AUDIT_LOG).read_text()
    await _end(pod, server)


_FORGED = ("z" * 4000 + "boom\n2026-12-07T05:00:00+0000 debug console: pod=p "
           "session=console-x uid=0 exited with status 0\n\x1b]0;pwned\x07\x1b[2J")


class _RefusingAgent:
    """An agent whose refusal carries forged record lines and escapes."""

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise StatusError(Code.INTERNAL, _FORGED)


async def test_a_guest_refusal_is_escaped_in_the_record_and_the_reply(tmp_path: Path) -> None:
    """The agent's words reach the record, the log and root's terminal only
    escaped, on one bounded line: the guest cannot forge a record line or
    send a terminal escape."""
    sessions = owner.ConsoleSessions("p", True, "cfg", audit_dir=tmp_path)
    with pytest.raises(StatusError) as caught:
        await sessions.run(_RefusingAgent(), _request("id"), None)  # type: ignore[arg-type]
    assert caught.value.code == Code.INTERNAL
    assert "\n" not in caught.value.message and "\x1b" not in caught.value.message
    assert "\\x1b" in caught.value.message
    lines = (tmp_path / owner.AUDIT_LOG).read_text().splitlines()
    assert len(lines) == 1
    assert "\x1b" not in lines[0] and "\x07" not in lines[0]
    assert len(lines[0]) <= owner.AUDIT_LINE_LIMIT + 40  # the time stamp
    assert "failed to start" in lines[0]


async def test_a_session_name_that_is_not_a_name_is_refused(tmp_path: Path) -> None:
    """The exec id goes into the record as it is: only a plain name passes."""
    sessions = owner.ConsoleSessions("p", True, "cfg", audit_dir=tmp_path)
    for bad in ("", "a\nb", "x" * 200, "\x1b[2J", "../x"):
        with pytest.raises(StatusError) as caught:
            await sessions.run(_RefusingAgent(), pod_pb2.DebugConsoleRequest(  # type: ignore[arg-type]
                exec_id=bad, args=["id"]), None)
        assert caught.value.code == Code.INVALID_ARGUMENT
    assert not (tmp_path / owner.AUDIT_LOG).exists()


class _SlowStartAgent:
    """An agent that starts the shell but answers late; records its calls."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.answered = asyncio.Event()

    async def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(method)
        await asyncio.sleep(0.2)  # the guest runs the shell meanwhile
        self.answered.set()
        return None

    async def signal_process(self, container_id: str, exec_id: str, signum: int) -> None:
        self.calls.append(("SignalProcess", container_id, exec_id, signum))


async def test_a_shell_started_while_its_client_left_is_killed(tmp_path: Path) -> None:
    """A client that goes away while StartDebugConsole is in flight leaves
    no shell behind: the owner kills it once the start call is over, and
    the record says the start was interrupted."""
    sessions = owner.ConsoleSessions("p", True, "cfg", audit_dir=tmp_path)
    agent = _SlowStartAgent()
    task = asyncio.ensure_future(sessions.run(agent, _request(), None))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(agent.answered.wait(), 5)
    for _ in range(50):
        if len(agent.calls) > 1:
            break
        await asyncio.sleep(0.01)
    assert agent.calls == ["StartDebugConsole",
                           ("SignalProcess", DEBUG_CONSOLE_ID, "console-1", signal.SIGKILL)]
    record = (tmp_path / owner.AUDIT_LOG).read_text()
    assert "start interrupted (its client went away)" in record


async def test_a_refused_start_kills_nothing(tmp_path: Path) -> None:
    """A clean refusal from the agent started nothing: no signal is sent."""
    sessions = owner.ConsoleSessions("p", True, "cfg", audit_dir=tmp_path)
    agent = _RefusingAgent()
    agent_calls: list[Any] = []

    async def signal_process(*args: Any) -> None:
        agent_calls.append(args)
    agent.signal_process = signal_process  # type: ignore[attr-defined]
    with pytest.raises(StatusError):
        await sessions.run(agent, _request(), None)  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert agent_calls == []


def test_owners_rotating_the_record_at_once_lose_no_line(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Two owners writing as the record reaches its limit rotate it once:
    the second does not rotate the first's new record over the full one."""
    import threading
    old = "first-record " + "x" * owner.AUDIT_LOG_LIMIT + "\n"
    (tmp_path / owner.AUDIT_LOG).write_text(old)
    real_replace = os.replace

    def slow_replace(src: Any, dst: Any) -> None:
        time.sleep(0.2)  # both writers have seen the full record by now
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", slow_replace)
    writers = [threading.Thread(target=owner.write_audit, args=(tmp_path, f"w{n}"))
               for n in range(2)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(10)
    rotated = (tmp_path / (owner.AUDIT_LOG + ".1")).read_text()
    current = (tmp_path / owner.AUDIT_LOG).read_text()
    assert rotated == old
    assert current.endswith((" w0\n", " w1\n")) and current.count("\n") == 2
