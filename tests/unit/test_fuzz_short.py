"""The fuzz targets (`fuzz/`, full length with `python -m fuzz`), short: each for
3000 inputs through the same entry point. Then regression tests for what the
fuzzers found, and checks that the harnesses' checks do bite."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from fuzz import TARGETS
from fuzz._bytes import Encoder
from fuzz._conn import MemoryConnection
from fuzz._harness import Violation
from fuzz._server import DELIVER_RECORDS, Method, drive, request_record
from fuzz.target_agent_client import (
    AFTER_EOF,
    AgentClientTarget,
    frame_part,
    lying_part,
    ok_part,
    oversized_part,
    process_list_part,
    raw_part,
    record,
    wrong_stream_part,
)
from fuzz.target_framing import FramingTarget
from pykata.agent import service as agent_service
from pykata.agent.console import ConsoleSocket
from pykata.agent.containers import Containers
from pykata.agent.crun import Crun
from pykata.agent.reaper import Reaper
from pykata.agent.service import AgentService
from pykata.errors import AgentError
from pykata.protocols import agent_pb2, health_pb2, oci_pb2
from pykata.runtime.agent_client import INVALID_EXIT_STATUS, AgentClient
from pykata.shim.fifo import FifoError, ProcessFifos
from pykata.ttrpc import Code, RequestContext, Server, StatusError, framing
from pykata.ttrpc.errors import MessageTooLargeError
from pykata.ttrpc.protocol import FrameStream

REPO = Path(__file__).resolve().parents[2]
SHORT_RUNS = 3000


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_short_run(target: str) -> None:
    """`python -m fuzz --runs 3000 --target X`: every input ran, no crash, no hang."""
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "--runs", str(SHORT_RUNS), "--target", target,
         "--seed", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"{target} "))
    assert int(line.split()[1]) >= SHORT_RUNS, output  # libFuzzer may add one or two
    assert line.endswith("no crash, no hang"), output


# --- the host's AgentClient against a hostile agent ------------------------------------

_WAIT_300 = agent_pb2.WaitProcessResponse(status=300).SerializeToString()
_WAIT_NEGATIVE = agent_pb2.WaitProcessResponse(status=-1).SerializeToString()
_DEEP_JSON = agent_pb2.ListProcessesResponse(process_list=b"[" * 5000).SerializeToString()
_BAD_UTF8_ID = b"\x0a\x02\xff\xfe"  # OOMEvent.container_id, not UTF-8


_LOST = "agent connection lost during "
_INVALID = ": the agent sent an invalid reply"
# id, the fake agent's reply, and how the call must end: the value it
# returns, or the words of the AgentError it raises.
_CLIENT_CASES: list[tuple[str, bytes, int | str]] = [
    ("wait-300", record("wait_process", ok_part(_WAIT_300)), INVALID_EXIT_STATUS),
    ("wait-negative", record("wait_process", ok_part(_WAIT_NEGATIVE)), INVALID_EXIT_STATUS),
    ("check-status", record("check", ok_part(code=14, message="unavailable")),
     "Check failed in the guest: unavailable"),
    ("check-eof", record("check", after=AFTER_EOF), _LOST + "Check"),
    ("check-garbage", record("check", frame_part(2, b"\xff\xff")), "Check" + _INVALID),
    ("pids-deep-json", record("list_processes", ok_part(_DEEP_JSON)),
     "unreadable process list"),
    ("pids-zero", record("list_processes", process_list_part(0, 3)),
     "unreadable process list"),
    ("pids-above-pid-max", record("list_processes", process_list_part(4194300, 10)),
     "unreadable process list"),
    ("pids-too-many", record("list_processes", process_list_part(1, 65536 + 1, step=0)),
     "unreadable process list"),
    ("oom-status", record("get_oom_event", ok_part(code=13, message="oops")),
     "GetOOMEvent failed in the guest: oops"),
    ("oom-bad-utf8", record("get_oom_event", ok_part(_BAD_UTF8_ID)),
     "GetOOMEvent" + _INVALID),
    ("oom-eof", record("get_oom_event", after=AFTER_EOF), _LOST + "GetOOMEvent"),
    ("read-lying-length", record("read_stream", lying_part(-3, b"\x0a\x02hi")),
     "ReadStdout" + _INVALID),
    ("stats-oversized", record("stats_container", oversized_part(whole=True)),
     "message of 4194305 bytes on stream 1 exceeds"),
    ("details-wrong-stream",
     record("guest_details", wrong_stream_part(2, b"\x0a\x00"), after=AFTER_EOF),
     _LOST + "GetGuestDetails"),
    ("create-garbage", record("create_container", raw_part(
        b"\x00\x00\x00\x03\x00\x00\x00\x01\x02\x00\xff\xff\xff")),
     "CreateContainer" + _INVALID),
]


@pytest.mark.parametrize(("script", "expected"),
                         [pytest.param(script, expected, id=name)
                          for name, script, expected in _CLIENT_CASES])
async def test_agent_client_keeps_its_contract(script: bytes, expected: int | str) -> None:
    """Replies the fuzzer made the earlier AgentClient fail on: each must now end
    in a checked value or an AgentError (the harness raises Violation otherwise),
    and in the one each reply calls for."""
    target = AgentClientTarget()
    await target.one_input(script)
    [(_call, outcome)] = target.outcomes
    if isinstance(expected, int):
        assert outcome == expected, outcome
    else:
        assert isinstance(outcome, AgentError) and expected in str(outcome), repr(outcome)


async def test_agent_client_harness_catches_a_broken_promise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract check is not vacuous: a wait_process passing 300 through fails it."""
    async def unchecked(self: AgentClient, cid: str, exec_id: str) -> int:
        return 300

    monkeypatch.setattr(AgentClient, "wait_process", unchecked)
    with pytest.raises(Violation, match="contract-wait_process-range"):
        await AgentClientTarget().one_input(record("wait_process", ok_part(_WAIT_300)))


# --- the server harness ------------------------------------------------------------------


async def test_server_harness_reports_a_request_never_answered() -> None:
    """A handler that waits for nothing is a hang, seen at once (no timer pending)."""
    async def never(request: health_pb2.CheckRequest, ctx: RequestContext
                    ) -> health_pb2.HealthCheckResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    server = Server()
    server.register("t.S", "Never", health_pb2.CheckRequest, never)
    methods = [Method("t.S", "Never", health_pb2.CheckRequest, health_pb2.HealthCheckResponse)]
    script = request_record(Encoder().u8(DELIVER_RECORDS), methods, "Never",
                            health_pb2.CheckRequest()).getvalue()
    try:
        with pytest.raises(Violation, match="hang"):
            await drive(server, script, methods, lambda service, method: False)
    finally:
        await server.aclose()


async def test_framing_target_reads_past_an_oversized_payload(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The framing seeds, and mode 0xFF (a whole 4 MiB+ payload skipped in stream):
    the reader reports the payload on its stream and reads the frame after it
    whole; the target checks it (a reader that skips one byte short fails it)."""
    conn = MemoryConnection()
    size = (4 << 20) + 1
    conn.send(struct.pack(">IIBB", size, 7, 1, 0) + b"\xff" * size
              + framing.encode_frame(9, framing.MessageType.DATA, b"after"))
    conn.send_eof()
    frames = FrameStream(conn.reader, conn.writer)
    with pytest.raises(MessageTooLargeError) as too_large:
        await frames.read_frame()
    assert (too_large.value.size, too_large.value.stream_id) == (size, 7)
    after = await frames.read_frame()
    assert after is not None and (after.header.stream_id, after.payload) == (9, b"after")
    assert await frames.read_frame() is None

    target = FramingTarget()
    for seed in target.seeds():
        await target.one_input(seed)
        await target.one_input(b"\xff" + seed[1:])

    discard = FrameStream._discard

    async def one_short(self: FrameStream, size: int) -> None:
        await discard(self, size - 1)

    monkeypatch.setattr(FrameStream, "_discard", one_short)
    with pytest.raises(Violation, match="read-oversized"):
        await target.one_input(b"\xff" + target.seeds()[1][1:])


# --- bugs the fuzzers found (fixed; each test failed before its fix) -------------------------


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class _FailingCrun:
    def __getattr__(self, name: str) -> object:
        async def fail(*args: object, **kwargs: object) -> None:
            raise StatusError(Code.INTERNAL, f"crun {name}: not here")

        return fail


async def test_failed_create_container_closes_its_stdio(tmp_path: Path) -> None:
    """A CreateContainer that crun refused leaked the read ends of its stdout and
    stderr pipes, two fds each time (found by the agent target)."""
    containers = Containers(Reaper(), tmp_path / "state")
    containers._crun = cast(Crun, _FailingCrun())
    spec = oci_pb2.Spec(Version="1.0.2", Process=oci_pb2.Process(Args=["true"], Cwd="/"),
                        Root=oci_pb2.Root(Path=str(tmp_path)))
    before = _fd_count()
    with pytest.raises(StatusError):
        await containers.create(agent_pb2.CreateContainerRequest(container_id="c1", OCI=spec))
    assert _fd_count() == before


def test_process_fifos_close_what_they_opened_when_one_fails(tmp_path: Path) -> None:
    """A stderr FIFO that cannot be opened leaked the stdout FIFO's fd (shim target)."""
    for name in ("stdin", "stdout"):
        os.mkfifo(tmp_path / name)
    before = _fd_count()
    with pytest.raises(FifoError):
        ProcessFifos(str(tmp_path / "stdin"), str(tmp_path / "stdout"), str(tmp_path / "none"))
    assert _fd_count() == before


def test_fifo_path_with_a_nul_byte_is_a_fifo_error() -> None:
    """A NUL byte in a FIFO path raised ValueError, so Create answered UNKNOWN with a
    traceback in the shim's log (shim target)."""
    with pytest.raises(FifoError):
        ProcessFifos("/run/x\0y", "", "")


async def test_console_receive_master_cancelled_ends_cancelled(tmp_path: Path) -> None:
    """receive_master, cancelled as its socket closed (crun refusing a terminal
    process), ended with OSError(EBADF), which nobody retrieved: the agent logged
    'Task exception was never retrieved' (agent target)."""
    console = ConsoleSocket(tmp_path / "c.console")
    receiving = asyncio.ensure_future(console.receive_master())
    await asyncio.sleep(0)  # it is waiting for crun to connect
    receiving.cancel()
    console.close()
    await asyncio.wait([receiving])
    assert receiving.cancelled(), receiving.exception()


async def test_concurrent_create_sandbox_creates_one_sandbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CreateSandbox in flight at once both succeeded, and the first one's OOM
    watcher task was orphaned, polling forever (agent target)."""
    async def mounted(reaper: Reaper, storage: agent_pb2.Storage) -> Path:
        await asyncio.sleep(0)
        return Path(storage.mount_point)

    monkeypatch.setattr(agent_service, "mount_storage", mounted)
    reaper = Reaper()
    agent = AgentService(reaper, Containers(reaper, tmp_path / "state"))
    ctx = cast(RequestContext, None)
    storage = agent_pb2.Storage(driver="9p", source="kataShared", mount_point="/run/shared")
    try:
        results = await asyncio.gather(
            agent.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="a",
                                                               storages=[storage]), ctx),
            agent.CreateSandbox(agent_pb2.CreateSandboxRequest(sandbox_id="b"), ctx),
            return_exceptions=True)
    finally:
        watchers = [t for t in asyncio.all_tasks()
                    if getattr(t.get_coro(), "__qualname__", "") == "AgentService._watch_oom"]
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    refused = [r for r in results if isinstance(r, StatusError)]
    assert len(refused) == 1 and refused[0].code == Code.ALREADY_EXISTS, results
