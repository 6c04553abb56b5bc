"""Which spec mounts are volumes, and how their host paths are checked."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from pykata.cli.run_cmd import _volume
from pykata.errors import SpecError
from pykata.runtime.volumes import plan_volumes


def test_only_bind_mounts_are_volumes(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/a", "type": "bind", "source": str(tmp_path), "options": ["rbind"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
        {"destination": "/b", "type": "none", "source": str(tmp_path / "file"),
         "options": ["bind", "ro"]},
    ]
    planned = plan_volumes(mounts, None)
    assert [index for index, _ in planned] == [1, 3]
    first, second = planned[0][1], planned[1][1]
    assert (first.recursive, first.readonly, first.is_dir) == (True, False, True)
    assert (second.recursive, second.readonly, second.is_dir) == (False, True, False)


def test_relative_source_is_relative_to_the_bundle(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    mounts = [{"destination": "/d", "type": "bind", "source": "data"}]
    assert plan_volumes(mounts, tmp_path)[0][1].source == tmp_path / "data"
    with pytest.raises(SpecError, match="relative source 'data'"):
        plan_volumes(mounts, None)


def test_missing_source_is_named(tmp_path: Path) -> None:
    mounts = [{"destination": "/d", "type": "bind", "source": str(tmp_path / "gone")}]
    with pytest.raises(SpecError, match=r"volume '/d': host path .*/gone: No such file"):
        plan_volumes(mounts, None)


def test_socket_cannot_be_shared(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        mounts = [{"destination": "/s", "type": "bind", "source": str(path)}]
        with pytest.raises(SpecError, match="neither a directory nor a regular file"):
            plan_volumes(mounts, None)


def test_volume_flag_parses_host_container_and_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _volume("data:/d:ro") == {"destination": "/d", "type": "bind",
                                     "source": str(tmp_path / "data"),
                                     "options": ["rbind", "ro"]}
    assert _volume("/x:/y")["options"] == ["rbind", "rw"]
    for bad in ("/x", "/x:y", ":/y", "/x:/y:rx"):
        with pytest.raises(argparse.ArgumentTypeError):
            _volume(bad)
