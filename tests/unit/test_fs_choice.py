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
    """shared_fs = "virtio-fs" that cannot be served is refused, naming the
    setting, its file and the fix; never turned into 9p."""
    choice = fs_choice.choose(_config(shared_fs="virtio-fs"))
    if choice.kind:
        pytest.skip("this host can serve virtio-fs")
    with pytest.raises(ConfigError) as info:
        fs_choice.require(_config(shared_fs="virtio-fs"))
    assert 'shared_fs = "virtio-fs"' in str(info.value)
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
