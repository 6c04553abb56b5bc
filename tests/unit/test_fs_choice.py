"""Which shared filesystem a sandbox gets (`runtime.fs_choice`), and that a
setting pykata cannot honour stops the start before anything is made."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.config import Config, QemuConfig
from pykata.errors import ConfigError
from pykata.runtime import fs_choice
from tests.unit.pod_fakes import fake_pod


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "run"
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(root))
    yield root


def _config(**qemu: object) -> Config:
    return Config(qemu=QemuConfig(**qemu), source="/etc/pykata/test.toml")  # type: ignore[arg-type]


def test_virtio_9p_is_taken_as_set() -> None:
    """shared_fs = "virtio-9p" gives 9p, saying it was configured."""
    choice = fs_choice.choose(_config(shared_fs="virtio-9p"))
    assert choice.kind == fs_choice.NINEP and "shared_fs" in choice.reason


def test_a_setting_that_cannot_be_honoured_is_refused_by_name() -> None:
    """shared_fs = "virtio-fs" that cannot be served (no virtiofsd) is refused,
    naming the setting, its file, what is missing and the fix; never turned
    into 9p."""
    config = _config(shared_fs="virtio-fs", virtio_fs_daemon="/nonexistent/virtiofsd")
    assert not fs_choice.choose(config).kind
    with pytest.raises(ConfigError) as info:
        fs_choice.require(config)
    assert 'shared_fs = "virtio-fs"' in str(info.value)
    assert "/nonexistent/virtiofsd" in str(info.value)
    assert "/etc/pykata/test.toml" in str(info.value)
    assert "virtio-9p" in str(info.value)


async def test_a_refused_shared_fs_stops_the_start_before_anything_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod core refuses it before a directory, mount or VM exists."""
    refusal = fs_choice.SharedFsChoice("", "", refusal="shared_fs = \"virtio-fs\" refused",
                                       hint="set shared_fs = \"virtio-9p\"")
    monkeypatch.setattr(fs_choice, "choose", lambda config: refusal)
    pod, source, _ = fake_pod(tmp_path)
    with pytest.raises(ConfigError, match="refused"):
        await pod.start()
    assert not source.vms
    assert not pod.sandbox.paths.run_dir.exists()


def _with(**kw: object) -> Config:
    from pykata.config import FactoryConfig

    factory = {k: kw.pop(k) for k in ("enable_template", "vm_cache_number") if k in kw}
    return Config(qemu=QemuConfig(**kw), factory=FactoryConfig(**factory),  # type: ignore[arg-type]
                  source="/etc/pykata/test.toml")


def test_auto_picks_virtio_fs_where_virtiofsd_is_and_says_why(tmp_path: Path) -> None:
    """auto: virtio-fs with a virtiofsd, else 9p, each with the reason."""
    daemon = tmp_path / "virtiofsd"
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    found = fs_choice.choose(_with(virtio_fs_daemon=str(daemon)))
    assert (found.kind, found.daemon) == (fs_choice.VIRTIO_FS, str(daemon))
    assert str(daemon) in found.reason
    missing = fs_choice.choose(_with(virtio_fs_daemon=str(tmp_path / "none")))
    assert missing.kind == fs_choice.NINEP and "not an executable" in missing.reason
    explicit = fs_choice.require(_with(shared_fs="virtio-fs", virtio_fs_daemon=str(daemon)))
    assert explicit.kind == fs_choice.VIRTIO_FS


def test_the_factory_gets_9p_said_so_or_a_refusal(tmp_path: Path) -> None:
    """VM templates and the VM cache cannot serve virtio-fs: auto chooses 9p
    and says why; an explicit virtio-fs is refused naming the factory key."""
    daemon = tmp_path / "virtiofsd"
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    for factory, key in (({"enable_template": True}, "enable_template"),
                         ({"vm_cache_number": 2}, "vm_cache_number")):
        auto = fs_choice.choose(_with(virtio_fs_daemon=str(daemon), **factory))
        assert auto.kind == fs_choice.NINEP and key in auto.reason
        with pytest.raises(ConfigError) as info:
            fs_choice.require(_with(shared_fs="virtio-fs", virtio_fs_daemon=str(daemon),
                                    **factory))
        assert key in str(info.value) and "virtio-9p" in str(info.value)


def test_env_and_check_say_what_a_start_chooses(tmp_path: Path) -> None:
    """`pykata env` and `pykata check` show the choice a start makes, with its
    reason, and check fails on a refusal."""
    from pykata.cli import check_cmd, env_cmd

    refused = _with(shared_fs="virtio-fs", virtio_fs_daemon=str(tmp_path / "none"))
    assert env_cmd.in_effect(refused)["shared_fs"] == "refused"
    item = next(i for i in check_cmd.gather(refused) if i.name == "shared filesystem")
    assert not item.ok and str(tmp_path / "none") in item.detail
    ninep = env_cmd.in_effect(_with(shared_fs="virtio-9p"))
    assert ninep == {"shared_fs": "virtio-9p",
                     "shared_fs_reason": "set in the configuration (shared_fs)"}
