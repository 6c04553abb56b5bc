"""The agent crosses each pod volume a spec binds before crun copies its
mount namespace (agent.containers.reach_pod_volumes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata.agent import containers


def test_only_pod_volume_directories_are_opened(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    volumes = tmp_path / "volumes"
    (volumes / "0").mkdir(parents=True)
    (volumes / "1").write_text("a file volume")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", volumes / "2")
    monkeypatch.setattr(containers, "POD_VOLUMES", f"{volumes}/")
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: str, flags: int, *args: int) -> int:
        fd = real_open(path, flags, *args)
        opened.append(path)
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    spec = {"mounts": [
        {"destination": "/a", "type": "bind", "source": f"{volumes}/0"},
        {"destination": "/b", "type": "bind", "source": f"{volumes}/1"},
        {"destination": "/c", "type": "bind", "source": f"{volumes}/2"},
        {"destination": "/d", "type": "bind", "source": f"{volumes}/9"},
        {"destination": "/e", "type": "bind", "source": str(tmp_path / "elsewhere")},
        {"destination": "/proc", "type": "proc", "source": "proc"},
        "not a mount",
    ]}
    containers.reach_pod_volumes(spec)
    # The directory only: not a file, not through a link, not a missing one
    # (crun reports those), nothing outside the pod volumes.
    assert opened == [f"{volumes}/0"]


def test_a_spec_without_mounts_is_fine() -> None:
    containers.reach_pod_volumes({})
    containers.reach_pod_volumes({"mounts": None})
