"""The lifecycle's rules and the saved state's checks, without a VM."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from pykata.errors import InvalidStateError
from pykata.runtime.lifecycle import Lifecycle, Status
from pykata.runtime.state import (
    ContainerState,
    SandboxState,
    StateFileError,
    process_alive,
    process_start_time,
    read_state,
    write_state,
)


def test_operations_are_checked_against_the_status() -> None:
    c = Lifecycle("container", "web", Status.CREATED)
    c.require("start")
    with pytest.raises(InvalidStateError, match="container web is created: cannot exec"):
        c.require("exec")
    c.move(Status.RUNNING)
    with pytest.raises(InvalidStateError, match="is running: cannot start") as info:
        c.require("start")
    assert info.value.hint is None
    with pytest.raises(InvalidStateError) as deleting:
        c.require("delete")
    assert "force" in str(deleting.value)
    c.move(Status.PAUSED)
    c.require("resume")
    with pytest.raises(InvalidStateError):
        c.move(Status.CREATED)  # no way back to created
    c.move(Status.STOPPED)
    c.move(Status.RUNNING)  # a late start loses to the exit: stopped stays
    assert c.stopped
    with pytest.raises(InvalidStateError, match="cannot start it: a stopped"):
        c.require("start")


def _container(**changes: object) -> ContainerState:
    record = ContainerState(id="c", bundle="/b", status="running", sandbox_key="k",
                            run_root="/run/pykata", created="2026-12-01T00:00:00Z",
                            owner="", rootfs="/b/rootfs", annotations={"a": "b"})
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def test_state_round_trips_and_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_state(path, _container())
    assert read_state(path, ContainerState) == _container()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
    sandbox = SandboxState(id="s", key="k", front_end="oci", owner_pid=1, owner_start=2,
                           console_log="/x", created=1.5)
    write_state(path, sandbox)
    assert read_state(path, SandboxState) == sandbox


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 1}, "state version 1"),
    ({"monitor_pid": "12"}, "'monitor_pid' has the wrong type"),
    ({"monitor_pid": True}, "'monitor_pid' has the wrong type"),
    ({"annotations": {"a": 1}}, "'annotations' has the wrong type"),
])
def test_a_record_of_another_version_or_type_is_refused(
        tmp_path: Path, change: dict[str, object], message: str) -> None:
    data = {**dataclasses.asdict(_container()), **change}
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match=message):
        read_state(path, ContainerState)


def test_missing_fields_and_garbage_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 2, "id": "c"}')
    with pytest.raises(StateFileError, match="is missing"):
        read_state(path, ContainerState)
    path.write_text("not json")
    with pytest.raises(StateFileError, match="not JSON"):
        read_state(path, ContainerState)
    with pytest.raises(StateFileError, match="no state"):
        read_state(tmp_path / "absent.json", ContainerState)


def test_process_identity_tells_pid_reuse() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start > 0 and process_alive(me, start)
    assert not process_alive(me, start + 1)  # same pid, another process
    assert not process_alive(0, start)
