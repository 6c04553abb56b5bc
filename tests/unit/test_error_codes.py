"""One table for every front end: pykata's errors as ttRPC codes (containerd,
the control socket), back again on a control socket's client, as exit
statuses and runc's words; and the ready report a forked owner sends."""

from __future__ import annotations

import pytest

from pykata.errors import (
    AgentError,
    AlreadyExistsError,
    ConfigError,
    InvalidStateError,
    NotFoundError,
    PykataError,
    SpecError,
)
from pykata.runtime.error_codes import exit_status, from_status, runc_message, to_status
from pykata.runtime.lifecycle import ExitedError
from pykata.runtime.ready import ReadyReport
from pykata.ttrpc import Code


@pytest.mark.parametrize(("error", "code", "comes_back_as"), [
    (NotFoundError("x"), Code.NOT_FOUND, NotFoundError),
    (ExitedError("x"), Code.NOT_FOUND, NotFoundError),
    (InvalidStateError("x"), Code.FAILED_PRECONDITION, InvalidStateError),
    (AlreadyExistsError("x"), Code.ALREADY_EXISTS, AlreadyExistsError),
    (SpecError("x"), Code.INVALID_ARGUMENT, SpecError),
    (ConfigError("x"), Code.INVALID_ARGUMENT, SpecError),
    (AgentError("x", code=int(Code.PERMISSION_DENIED)), Code.PERMISSION_DENIED, PykataError),
    (PykataError("x"), Code.UNKNOWN, PykataError),
])
def test_each_kind_has_one_code_and_comes_back_as_its_kind(
        error: PykataError, code: Code, comes_back_as: type[PykataError]) -> None:
    status = to_status(error)
    assert status.code == code
    back = from_status(status)
    assert type(back) is comes_back_as and back.message == str(error)


def test_exit_statuses_and_runc_words() -> None:
    missing = AgentError("exec: executable file not found", code=int(Code.NOT_FOUND))
    denied = AgentError("exec: no", code=int(Code.PERMISSION_DENIED))
    assert (exit_status(missing), exit_status(denied)) == (127, 126)
    assert exit_status(AgentError("no such container", code=int(Code.NOT_FOUND))) == 1
    assert exit_status(InvalidStateError("x")) == 1
    assert runc_message(denied).endswith(": permission denied")
    assert runc_message(InvalidStateError("busy")) == "busy"
    # Raised from the agent's refusal: the cause decides.
    try:
        try:
            raise missing
        except AgentError as exc:
            raise PykataError("creating the container failed") from exc
    except PykataError as wrapped:
        assert exit_status(wrapped) == 127


def test_the_ready_report_round_trips_and_keeps_the_kind_and_status() -> None:
    good = ReadyReport.success(qemu_pid=7)
    assert ReadyReport.decode(good.encode(), "the monitor") == good
    failed = ReadyReport.failure(
        AgentError("exec: executable file not found", code=int(Code.NOT_FOUND)), "creating")
    assert (failed.ok, failed.status, failed.kind) == (False, 127, "AgentError")
    with pytest.raises(AgentError) as raised:
        ReadyReport.decode(failed.encode(), "the monitor").raise_error()
    assert raised.value.exit_code == 127
    assert str(raised.value).endswith("executable file not found in $PATH")
    with pytest.raises(InvalidStateError):
        ReadyReport.failure(InvalidStateError("busy"), "x").raise_error()


@pytest.mark.parametrize("garbage", [b"", b"not json\n", b'{"ok": "yes"}\n',
                                     b'{"surprise": 1}\n', b"[1, 2]\n"])
def test_a_report_that_is_not_one_is_a_failure_naming_the_child(garbage: bytes) -> None:
    report = ReadyReport.decode(garbage, "the monitor")
    assert not report.ok and "the monitor" in report.error
    with pytest.raises(PykataError, match="the monitor"):
        report.raise_error()
