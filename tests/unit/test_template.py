"""VM templates, without QEMU: what a template is keyed on, which VMs one can
stand in for, and which directories pykata trusts to hold one."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from pykata import config
from pykata.agent import clone
from pykata.errors import ConfigError
from pykata.factory import template
from pykata.hypervisor.base import NetworkInterface
from pykata.hypervisor.qemu import VmConfig
from pykata.ttrpc.client import Client


def _vm(tmp_path: Path, **kw: object) -> VmConfig:
    for name in ("vmlinux", "initrd", "qemu"):
        (tmp_path / name).touch()
    values: dict[str, object] = {
        "name": "s1", "run_dir": tmp_path / "run", "qemu_path": str(tmp_path / "qemu"),
        "kernel": tmp_path / "vmlinux", "initrd": tmp_path / "initrd",
        "shared_dir": tmp_path / "shared"}
    values.update(kw)
    return VmConfig(**values)  # type: ignore[arg-type]


def _fake_template(root: Path, vm: VmConfig, stream: int = 3) -> Path:
    ident = template.identity(vm)
    directory = root / template.template_key(ident)
    directory.mkdir(parents=True, mode=0o700)
    os.chmod(root, 0o700)
    (directory / "memory").touch()
    (directory / "state").touch()
    (directory / template.META).write_text(json.dumps(
        {"identity": ident, "next_stream_id": stream, "created": 1.0}))
    return directory


def test_key_follows_shape_and_assets_not_the_sandbox(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    key = template.template_key(template.identity(vm))
    # Per-sandbox values do not change the key: every sandbox of a shape shares it.
    other = dataclasses.replace(vm, name="s2", run_dir=tmp_path / "r2",
                                shared_dir=tmp_path / "sh2", console_limit=4096)
    assert template.template_key(template.identity(other)) == key
    for change in ({"memory_mib": 256}, {"vcpus": 2}, {"kernel_params": "quiet=0"},
                   {"machine_type": "q35"}, {"debug": True}):
        changed = dataclasses.replace(vm, **change)
        assert template.template_key(template.identity(changed)) != key, change
    # A rebuilt initrd (new file, same path) is another template.
    (tmp_path / "initrd").unlink()
    (tmp_path / "initrd").write_bytes(b"rebuilt")
    assert template.template_key(template.identity(vm)) != key


def test_vms_a_template_cannot_stand_in_for(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    assert template.unclonable(vm) == ""
    # A VM with NICs has a template of its own (as many NICs, on no tap).
    nic = NetworkInterface(5, "02:00:00:00:00:01", 1500)
    with_nic = dataclasses.replace(vm, network=(nic,))
    assert template.unclonable(with_nic) == ""
    keys = {template.template_key(template.identity(v)) for v in
            (vm, with_nic, dataclasses.replace(vm, network=(nic, nic)))}
    assert len(keys) == 3
    # ... but not which tap or MAC: every pod of the shape shares it.
    assert template.template_key(template.identity(dataclasses.replace(
        vm, network=(NetworkInterface(9, "02:00:00:00:00:07", 1400),)))) == \
        template.template_key(template.identity(with_nic))
    assert "vsock" in template.unclonable(dataclasses.replace(vm, vsock_cid=7))
    assert "shared" in template.unclonable(dataclasses.replace(vm, shared_dir=None))


def test_find_uses_only_a_template_for_the_same_settings(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    root = tmp_path / "templates"
    found, why = template.find(root, vm)
    assert found is None and "no VM template" in why
    directory = _fake_template(root, vm, stream=5)
    found, why = template.find(root, vm)
    assert found is not None and found.directory == directory and found.next_stream_id == 5
    # Another shape finds nothing, and the kernel changing makes this one stale.
    assert template.find(root, dataclasses.replace(vm, memory_mib=1024))[0] is None
    (tmp_path / "vmlinux").write_bytes(b"new kernel")
    assert template.find(root, vm)[0] is None
    assert template.prune(root) == [directory.name] and not directory.exists()


def test_a_tampered_or_incomplete_template_is_not_used(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    root = tmp_path / "templates"
    directory = _fake_template(root, vm)
    meta = json.loads((directory / template.META).read_text())
    meta["identity"]["memory_mib"] = 64  # settings that do not match its key
    (directory / template.META).write_text(json.dumps(meta))
    assert "other settings" in template.find(root, vm)[1]
    meta["identity"]["memory_mib"] = vm.memory_mib
    for bad in (2, 0, "3"):
        meta["next_stream_id"] = bad
        (directory / template.META).write_text(json.dumps(meta))
        assert "stream id" in template.find(root, vm)[1]
    meta["next_stream_id"] = 3
    (directory / template.META).write_text(json.dumps(meta))
    (directory / "state").unlink()
    assert "lacks state" in template.find(root, vm)[1]


def test_a_directory_others_can_write_holds_no_template(tmp_path: Path) -> None:
    """Every clone's QEMU parses a template's state: a template another user
    could have written is never used."""
    vm = _vm(tmp_path)
    root = tmp_path / "templates"
    directory = _fake_template(root, vm)
    assert template.find(root, vm)[0] is not None
    os.chmod(root, 0o777)
    assert "only it can write" in template.find(root, vm)[1]
    os.chmod(root, 0o700)
    os.chmod(directory, 0o722)
    assert template.find(root, vm)[0] is None
    os.chmod(directory, 0o700)
    link_root = tmp_path / "link"
    link_root.symlink_to(root)
    assert template.find(link_root, vm)[0] is None


def test_destroy_removes_only_templates(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    root = tmp_path / "templates"
    directory = _fake_template(root, vm)
    (root / f"{directory.name}.lock").touch()
    (root / "notes.txt").write_text("the user's")
    assert template.destroy(root).removed == [directory.name]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_factory_configuration(tmp_path: Path) -> None:
    cfg = config.parse({"factory": {"enable_template": True, "template_path": "/srv/t"}}, "f")
    assert cfg.factory.enable_template and cfg.factory.template_path == "/srv/t"
    assert template.template_root(cfg) == Path("/srv/t")
    assert not config.parse({}, "f").factory.enable_template  # off unless chosen
    with pytest.raises(ConfigError, match="template_path must be an absolute path"):
        config.parse({"factory": {"template_path": "t"}}, "f")
    with pytest.raises(ConfigError, match=r"unknown key factory\.vm_cache"):
        config.parse({"factory": {"vm_cache": 2}}, "f")


def test_guest_refuses_seeds_and_times_no_host_sends(tmp_path: Path) -> None:
    for size in (0, clone.MIN_SEED_BYTES - 1, clone.MAX_SEED_BYTES + 1):
        with pytest.raises(ValueError, match="reseed needs"):
            clone.reseed(b"x" * size, device=str(tmp_path / "none"))
    # A regular file takes the write but not the reseed ioctl: the error is the kernel's.
    target = tmp_path / "pool"
    target.touch()
    with pytest.raises(OSError):
        clone.reseed(b"s" * 32, device=str(target))
    for sec, usec in ((0, 0), (-5, 0), (1_800_000_000, -1), (1_800_000_000, 1_000_000)):
        with pytest.raises(ValueError, match="not a time"):
            clone.set_wall_clock(sec, usec)


async def test_client_continues_another_clients_stream_ids() -> None:
    import asyncio

    reader = asyncio.StreamReader()

    class _Writer:
        def write(self, data: bytes) -> None: ...
        async def drain(self) -> None: ...
        def close(self) -> None: ...
        async def wait_closed(self) -> None: ...
        def is_closing(self) -> bool:
            return False

    for bad in (0, 2, -1):
        with pytest.raises(ValueError, match="odd and positive"):
            Client(reader, _Writer(), first_stream_id=bad)  # type: ignore[arg-type]
    client = Client(reader, _Writer(), first_stream_id=7)  # type: ignore[arg-type]
    assert client.next_stream_id == 7
    reader.feed_eof()
    await client.aclose()
