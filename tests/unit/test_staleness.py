"""Stale pods: a pod's recorded guest assets against the current ones."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.cli import check_cmd
from pykata.runtime.staleness import GuestAssets, Staleness, compare, staleness
from pykata.runtime.state import SandboxState, read_state
from tests.unit.pod_fakes import fake_pod


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    yield root


def _assets(tmp_path: Path, kernel: str = "k", initrd: str = "i") -> GuestAssets:
    for name in (kernel, initrd):
        (tmp_path / name).write_bytes(name.encode())
    return GuestAssets.of(tmp_path / kernel, tmp_path / initrd)


def test_the_same_files_are_current(tmp_path: Path) -> None:
    booted = _assets(tmp_path)
    assert compare(booted, GuestAssets.of(booted.kernel, booted.initrd)).state \
        is Staleness.CURRENT


def test_another_cache_key_is_stale_and_says_which(tmp_path: Path) -> None:
    """A rebuilt initrd lands in another keyed directory: the pod is stale,
    and the verdict names the old file and the new."""
    booted = _assets(tmp_path, "k", "initrd-old")
    (tmp_path / "initrd-new").write_bytes(b"new")
    now = GuestAssets.of(booted.kernel, tmp_path / "initrd-new")
    verdict = compare(booted, now)
    assert verdict.stale
    assert "initrd-old" in verdict.detail and "initrd-new" in verdict.detail
    assert "kernel" not in verdict.detail


def test_a_file_replaced_at_the_same_path_is_stale(tmp_path: Path) -> None:
    """A configured path rebuilt in place (a new inode) counts too."""
    booted = _assets(tmp_path)
    new = tmp_path / "k.new"
    new.write_bytes(b"another kernel")
    os.replace(new, tmp_path / "k")
    verdict = compare(booted, GuestAssets.of(tmp_path / "k", tmp_path / "i"))
    assert verdict.stale and "kernel" in verdict.detail


def test_no_record_or_nothing_current_is_unknown(tmp_path: Path) -> None:
    assert compare(None, _assets(tmp_path)).state is Staleness.UNKNOWN
    assert compare(_assets(tmp_path), None).state is Staleness.UNKNOWN


def test_a_record_of_an_older_pykata_is_unknown_not_stale(tmp_path: Path) -> None:
    """Pods started before the assets were recorded carry no paths."""
    state = SandboxState(id="p", key="p", front_end="run", owner_pid=1, owner_start=1,
                         console_log="", created=0.0)
    verdict = staleness(state, current=_assets(tmp_path))
    assert verdict.state is Staleness.UNKNOWN and not verdict.stale


async def test_a_pod_records_its_assets_and_check_warns_once_they_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sandbox's saved state names what its VM booted; after the initrd
    is replaced, `pykata check` lists the pod with the fix (a warning: the
    check still passes on that account)."""
    pod, _, _ = fake_pod(tmp_path)
    await pod.start()
    try:
        saved = read_state(pod.sandbox.paths.state_file, SandboxState)
        config = pod.sandbox.config
        assert saved.guest_initrd == config.qemu.initrd and saved.guest_initrd_stamp
        assert staleness(saved, config).state is Staleness.CURRENT
        assert check_cmd.stale_pods(config) == []
        new = tmp_path / "initrd.new"
        new.write_bytes(b"rebuilt")
        os.replace(new, config.qemu.initrd)
        assert staleness(saved, config).stale
        (item,) = check_cmd.stale_pods(config)
        assert item.name == "pod pod1" and item.value == "stale" and item.warn and item.ok
        assert "restart the pod" in item.detail
    finally:
        await pod.stop()
    assert check_cmd.stale_pods(config) == []
