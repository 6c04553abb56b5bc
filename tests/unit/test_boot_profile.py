"""The boot profile: the guest's marks, and the host's check of them."""

from __future__ import annotations

import math

import pytest

from pykata.agent import boot_profile
from pykata.protocols import agent_pb2
from pykata.runtime.agent_client import boot_steps


def test_marks_keep_the_first_time_and_take_inits_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boot_profile, "_marks", {})
    monkeypatch.setenv("PYKATA_BOOT_INIT", "0.52")
    monkeypatch.setenv("PYKATA_BOOT_PYTHON", "not a time")
    boot_profile.mark("agent_started")
    first = boot_profile.marks()["agent_started"]
    boot_profile.mark("agent_started")
    marks = boot_profile.marks()
    assert marks["agent_started"] == first
    assert marks["init_started"] == 0.52 and "python_started" not in marks
    agent_pb2.BootProfile(**marks)  # every mark is a field of the reply


def test_the_host_drops_values_no_boot_has() -> None:
    reply = agent_pb2.BootProfile(init_started=0.5, python_started=-1.0,
                                  agent_started=math.inf, agent_imported=math.nan,
                                  agent_listening=1e9, first_request=1.25)
    assert boot_steps(reply) == {"init_started": 0.5, "first_request": 1.25}
