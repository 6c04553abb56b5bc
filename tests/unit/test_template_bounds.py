"""Which VM shapes get a template, and how many templates, of how many bytes,
stay on the host: the decisions of `TemplateSource._template_for` and the template
store (find, build, evict), with the template VM faked by a builder that
writes a sparse memory file as QEMU does. tests/functional/test_templates.py
shows the same bounds with real VMs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.errors import ConfigError
from pykata.factory import template
from pykata.factory.sources import TemplateSource
from pykata.hypervisor.base import NetworkInterface
from pykata.hypervisor.qemu import VmConfig
from pykata.runtime.paths import private_dir
from pykata.runtime.vm_source import ColdBoot

MIB = 1024 * 1024


def _vm(tmp_path: Path, **kw: object) -> VmConfig:
    # Made once: the files' times are part of every template's key.
    for name in ("vmlinux", "initrd", "qemu"):
        if not (tmp_path / name).exists():
            (tmp_path / name).touch()
    values: dict[str, object] = {
        "name": "s1", "run_dir": tmp_path / "run", "qemu_path": str(tmp_path / "qemu"),
        "kernel": tmp_path / "vmlinux", "initrd": tmp_path / "initrd",
        "shared_dir": tmp_path / "shared"}
    values.update(kw)
    return VmConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Template builds without QEMU: each writes what a template VM leaves
    (its RAM file as large as the guest's memory but sparse, 1 MiB of it
    touched; a state; the record). Returns the keys built, in order."""
    built: list[str] = []

    async def build_in(work: Path, key: str, ident: dict[str, Any], vm: VmConfig,
                       dial_timeout: float) -> template.Template:
        private_dir(work)
        with open(work / "memory", "wb") as memory:
            memory.truncate(vm.memory_mib * MIB)
            memory.write(os.urandom(MIB))
        (work / "state").write_bytes(b"device state")
        created = time.time()
        (work / template.META).write_text(json.dumps(
            {"identity": ident, "next_stream_id": 3, "created": created}))
        built.append(key)
        return template.Template(work, key, 3, created)

    monkeypatch.setattr(template, "_build_in", build_in)
    return built


def _config(root: Path, **factory: object) -> config.Config:
    return config.parse({"factory": {"enable_template": True, "template_path": str(root),
                                     **factory}}, "/etc/pykata/configuration.toml")


def _sandbox(cfg: config.Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> TemplateSource:
    """The VM source a pod gets with templates on (what it decides, not the boot)."""
    monkeypatch.setenv("PYKATA_RUN_ROOT", str(tmp_path / "run-root"))
    return TemplateSource(cfg, fallback=ColdBoot(cfg.agent.dial_timeout))


def _keys(root: Path) -> set[str]:
    return {info.key for info in template.list_templates(root)}


async def test_a_tenants_kernel_params_make_no_template_of_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Twenty pods each adding a kernel parameter of its own (an allowed
    kernel_params annotation: x0=1, x1=1, ...) build no template: each would
    cost a template VM's boot and a memory file under the run root. Each
    boots cold with a line that says why and names the key to change."""
    root = tmp_path / "templates"
    sandbox = _sandbox(_config(root), tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="pykata.factory.sources"):
        for i in range(20):
            assert await sandbox._template_for(
                _vm(tmp_path, kernel_params=f"x{i}=1"), "pod") is None
    assert builds == [] and not template.list_templates(root)
    lines = [r.getMessage() for r in caplog.records if "boots cold" in r.getMessage()]
    assert len(lines) == 20, caplog.text
    assert "'1:512:x0=1'" in lines[0] and "[factory] template_shapes" in lines[0]
    assert "/etc/pykata/configuration.toml" in lines[0]
    # Asking for other vCPUs or memory is refused alike; the configuration's
    # own shape (an annotation may repeat its values) gets its template.
    assert await sandbox._template_for(_vm(tmp_path, vcpus=2), "pod") is None
    assert await sandbox._template_for(_vm(tmp_path, memory_mib=1024), "pod") is None
    assert await sandbox._template_for(
        _vm(tmp_path, vcpus=1, memory_mib=512), "pod") is not None
    assert len(builds) == 1


def test_the_configuration_lists_the_shapes_that_get_templates(tmp_path: Path) -> None:
    cfg = config.parse({
        "hypervisor": {"qemu": {"kernel_params": "quiet", "default_memory": 256}},
        "factory": {"template_shapes": ["2:1024", "1:256:mitigations=off  nosmt"]}}, "f")
    refused = template.shape_refusal
    assert refused(cfg, _vm(tmp_path, memory_mib=256, kernel_params="quiet")) == ""
    assert refused(cfg, _vm(tmp_path, vcpus=2, memory_mib=1024, kernel_params="quiet")) == ""
    # Extra kernel parameters match exactly, after the configuration's own.
    assert refused(cfg, _vm(tmp_path, memory_mib=256,
                            kernel_params="quiet mitigations=off nosmt")) == ""
    for other in ({"memory_mib": 256, "kernel_params": "quiet mitigations=off"},
                  {"memory_mib": 256, "kernel_params": "quiet nosmt mitigations=off"},
                  {"memory_mib": 256, "kernel_params": "quiet mitigations=off nosmt x=1"},
                  {"vcpus": 2, "memory_mib": 1024, "kernel_params": "quiet x=1"},
                  {"vcpus": 1, "memory_mib": 1024, "kernel_params": "quiet"},
                  {"memory_mib": 256, "kernel_params": ""}):
        assert "template_shapes" in refused(cfg, _vm(tmp_path, **other)), other


@pytest.mark.parametrize(("factory", "expected"), [
    ({"template_shapes": ["2"]}, "'2' is not a VM shape"),
    ({"template_shapes": ["two:512"]}, "is not a VM shape"),
    ({"template_shapes": ["0:512"]}, "vCPUs outside 1-64"),
    ({"template_shapes": ["1:32"]}, "memory outside 64-1048576"),
    ({"template_shapes": "1:512"}, "must be a list of strings"),
    ({"template_max_count": 0}, "template_max_count must be between 1 and 1024"),
    ({"template_max_size": 0}, "template_max_size must be between 1 and 1048576"),
    ({"template_max_size": True}, "template_max_size must be a int"),
])
def test_bad_template_bounds_and_shapes_are_refused_by_name(
        factory: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        config.parse({"factory": factory}, "/etc/pykata/configuration.toml")
    assert "/etc/pykata/configuration.toml" in str(error.value)


def test_default_bounds() -> None:
    factory = config.load(config.DEFAULT_CONFIG).factory
    assert factory.template_shapes == ()
    assert (factory.template_max_count, factory.template_max_size) == (4, 1024)


async def test_twenty_shapes_leave_at_most_the_cap_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[str]) -> None:
    """Twenty shapes that do get templates (pods with 1 to 20 interfaces: a
    shape template_shapes does not police, since the pod's network makes it)
    build twenty; the default template_max_count keeps at most 4 on disk,
    the four used last."""
    root = tmp_path / "templates"
    sandbox = _sandbox(_config(root), tmp_path, monkeypatch)
    nic = NetworkInterface(-1, "02:00:00:00:00:01", 1500)
    for count in range(1, 21):
        made = await sandbox._template_for(_vm(tmp_path, network=(nic,) * count), "pod")
        assert made is not None and made.memory.is_file()
        on_disk = template.list_templates(root)
        assert len(on_disk) <= 4, f"{len(on_disk)} templates on disk after {count} shapes"
    assert len(builds) == 20
    assert _keys(root) == set(builds[-4:])
    assert not list(root.glob("*.new"))
    # An evicted template's lock file goes with it.
    assert {p.name for p in root.glob("*.lock")} <= {f"{k}.lock" for k in builds[-4:]}


async def test_the_least_recently_used_go_and_bytes_stay_under_the_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[str]) -> None:
    """Twenty allowed shapes under a 5 MiB bound on bytes: what counts is
    what the files take (each memory file is hundreds of MiB long but 1 MiB
    of it is allocated), and a template restored from between builds is
    the last to go."""
    root = tmp_path / "templates"
    shapes = [f"1:{64 + i}" for i in range(20)]
    sandbox = _sandbox(_config(root, template_shapes=shapes, template_max_count=100,
                               template_max_size=5), tmp_path, monkeypatch)
    first = await sandbox._template_for(_vm(tmp_path, memory_mib=64), "pod")
    assert first is not None
    for i in range(1, 20):
        assert await sandbox._template_for(_vm(tmp_path, memory_mib=64 + i), "pod") is not None
        async with template.in_use(first):  # a pod restored from the first one
            pass
        on_disk = template.list_templates(root)
        assert sum(info.size_bytes for info in on_disk) <= 5 * MIB
        assert first.key in {info.key for info in on_disk}
        assert all(info.memory_bytes < info.size_bytes for info in on_disk)
    # 1 MiB and a few KiB each: four fit under 5 MiB.
    assert _keys(root) == {first.key, *builds[-3:]}


async def test_a_template_being_restored_is_never_evicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """With room for one template, a start of another shape while a VM is
    restored from the first boots cold (the warning names the key to raise)
    and leaves the first whole; once the restore is done, the next start of
    that shape evicts it."""
    root = tmp_path / "templates"
    sandbox = _sandbox(_config(root, template_shapes=["2:512"], template_max_count=1),
                       tmp_path, monkeypatch)
    first = await sandbox._template_for(_vm(tmp_path), "pod")
    assert first is not None
    with caplog.at_level(logging.WARNING, logger="pykata.factory.sources"):
        async with template.in_use(first):
            assert await sandbox._template_for(_vm(tmp_path, vcpus=2), "pod") is None
            found, _ = template.find(root, _vm(tmp_path))
            assert found == first
    assert len(builds) == 1, "a build began with no room for its template"
    [line] = [r.getMessage() for r in caplog.records if "boots cold" in r.getMessage()]
    assert "template_max_count = 1" in line and "raise template_max_count" in line, line
    second = await sandbox._template_for(_vm(tmp_path, vcpus=2), "pod")
    assert second is not None and _keys(root) == {second.key}
    # A restore from the evicted one (found before it went) fails cleanly: the
    # sandbox boots cold.
    with pytest.raises(template.HypervisorError, match="removed or rebuilt"):
        async with template.in_use(first):
            pass


async def test_a_template_larger_than_the_byte_cap_is_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "templates"
    sandbox = _sandbox(_config(root, template_max_size=1), tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="pykata.factory.sources"):
        assert await sandbox._template_for(_vm(tmp_path), "pod") is None
    assert len(builds) == 1 and not template.list_templates(root)
    assert not list(root.glob("*.new"))
    [line] = [r.getMessage() for r in caplog.records if "boots cold" in r.getMessage()]
    assert "more than [factory] template_max_size = 1 (MiB)" in line, line
    assert "raise template_max_size to at least 2" in line, line
