"""The read-only root image: how a VM boots from it, how the configuration
chooses it, and the image the build makes (mke2fs, as root)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pykata import config as config_mod
from pykata import kernel_params
from pykata.assets import root_image
from pykata.assets.buildlog import BuildLog
from pykata.assets.cpio import Archive
from pykata.errors import AssetsError, ConfigError, HypervisorError
from pykata.factory import template
from pykata.hypervisor import kernel_config
from pykata.hypervisor.qemu import QemuVM, VmConfig
from pykata.runtime import guest_files as gf


def _vm(tmp_path: Path, **kw: object) -> VmConfig:
    values: dict[str, object] = {"name": "s1", "run_dir": tmp_path, "qemu_path": "/bin/true",
                                 "kernel": tmp_path / "vmlinux"}
    values.update(kw)
    return VmConfig(**values)  # type: ignore[arg-type]


def test_microvm_boots_the_image_read_only_as_its_only_disk(tmp_path: Path) -> None:
    image = tmp_path / "ro,ot.img"
    vm = _vm(tmp_path, image=image)
    cmd = QemuVM(vm).command(7, 9, 11)
    assert "-initrd" not in cmd
    drive = cmd[cmd.index("-drive") + 1]
    assert drive == (f"file={tmp_path}/ro,,ot.img,if=none,id=root,format=raw,readonly=on,"
                     "file.locking=off")
    assert cmd.count("-drive") == 1
    assert "virtio-blk-device,drive=root" in cmd
    cmdline = vm.kernel_cmdline().split()
    rooted = [w for w in cmdline if w.startswith(("root", "init")) or w == "ro"]
    assert rooted == ["root=/dev/vda", "ro", "rootfstype=ext4", "init=/init"]
    assert vm.guest_root == image


def test_q35_gets_the_pci_disk(tmp_path: Path) -> None:
    cmd = QemuVM(_vm(tmp_path, image=tmp_path / "root.img", machine_type="q35")
                 ).command(7, 9, 11)
    assert "virtio-blk-pci,drive=root" in cmd


def test_initrd_boot_has_no_disk_and_no_root(tmp_path: Path) -> None:
    vm = _vm(tmp_path, initrd=tmp_path / "initrd")
    cmd = QemuVM(vm).command(7, 9, 11)
    assert cmd[cmd.index("-initrd") + 1] == str(tmp_path / "initrd")
    assert "-drive" not in cmd and "root=" not in vm.kernel_cmdline()


def test_exactly_one_guest_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        _vm(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        _vm(tmp_path, initrd=tmp_path / "i", image=tmp_path / "r")


def test_check_names_the_missing_image(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.0'\n")
    qemu.chmod(0o755)
    (tmp_path / "vmlinux").write_text("k")
    vm = _vm(tmp_path, image=tmp_path / "root.img", qemu_path=str(qemu))
    with pytest.raises(HypervisorError, match=r"guest root image not found at .*root\.img"):
        vm.check()


def test_template_identity_follows_the_guest_root(tmp_path: Path) -> None:
    """A template made from the initrd never serves a VM booting the image."""
    for name in ("vmlinux", "initrd", "root.img"):
        (tmp_path / name).write_text(name)
    from_initrd = template.identity(_vm(tmp_path, initrd=tmp_path / "initrd"))
    from_image = template.identity(_vm(tmp_path, image=tmp_path / "root.img"))
    assert template.template_key(from_initrd) != template.template_key(from_image)
    assert from_image["initrd"][0] == str(tmp_path / "root.img")


def _qemu_config(**kw: str) -> config_mod.QemuConfig:
    return config_mod.QemuConfig(**kw)  # type: ignore[arg-type]


def test_configuration_chooses_one_guest_root(tmp_path: Path) -> None:
    q = _qemu_config(kernel="/k", image="/img")
    assert gf.guest_files(q) == gf.GuestFiles(Path("/k"), Path("/img"), True)
    assert gf.guest_files(_qemu_config(kernel="/k", initrd="/i", guest_root="image")
                          ) == gf.GuestFiles(Path("/k"), Path("/i"), False)
    with pytest.raises(ConfigError, match=r"both initrd = '/i' and image = '/img'"):
        _qemu_config(initrd="/i", image="/img").validate("conf")
    with pytest.raises(ConfigError, match="guest_root"):
        _qemu_config(guest_root="disk").validate("conf")


def test_guest_root_image_from_the_cache_or_the_fix(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata import assets

    (tmp_path / "initrd.img").write_text("i")
    paths = assets.AssetPaths(kernel=tmp_path / "vmlinux", vmlinux=tmp_path / "vmlinux",
                              bzimage=tmp_path / "bz", initrd=tmp_path / "initrd.img",
                              kernel_release="6.1", image=tmp_path / "root.img")
    monkeypatch.setattr(assets, "locate", lambda: paths)
    with pytest.raises(AssetsError, match=r"guest root image not found .*as root"):
        gf.guest_files(_qemu_config(guest_root="image"))
    assert gf.guest_files(_qemu_config(guest_root="initrd")).root == tmp_path / "initrd.img"
    (tmp_path / "root.img").write_text("r")
    files = gf.guest_files(_qemu_config(guest_root="image"))
    assert files.image == tmp_path / "root.img" and files.initrd is None


@pytest.mark.parametrize("name", ["root", "rootfstype", "rootflags", "rw", "init", "rootwait",
                                  "memmap", "mem"])
def test_a_pod_cannot_choose_its_root(name: str) -> None:
    assert kernel_params.check_allowlist_entry(name) is not None


@pytest.mark.skipif(root_image.can_build() is not None, reason="needs root and mke2fs")
def test_the_built_image_is_read_only_and_holds_every_entry(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 10000)
    archive = Archive()
    archive.add_dir("etc", 0o755)
    archive.add_data("etc/hostname", b"pykata\n", 0o644)
    archive.add_file("usr/bin/tool", payload, 0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_char_device("dev/console", 5, 1, 0o600)
    out = tmp_path / "root.img"
    log = BuildLog(tmp_path / "build.log", lambda _line: None)
    size = root_image.write_root_image(archive, "0123456789abcdef", tmp_path / "work", out, log)
    log.close()
    assert size == out.stat().st_size
    # A whole number of 2 MiB: it can be a virtio-pmem device as it is.
    assert size > 0 and size % (2 << 20) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o444
    assert not (tmp_path / "work" / "root-tree").exists()
    listing = subprocess.run(["debugfs", "-R", "ls -l /dev", str(out)], capture_output=True,
                             text=True, check=True).stdout
    assert "console" in listing
    dump = subprocess.run(["debugfs", "-R", "stat /dev/console", str(out)],
                          capture_output=True, text=True, check=True).stdout
    assert "Type: character special" in dump and "User:     0" in dump
    dumped = tmp_path / "tool"
    subprocess.run(["debugfs", "-R", f"dump /usr/bin/tool {dumped}", str(out)],
                   capture_output=True, check=True)
    assert dumped.read_bytes() == payload.read_bytes()
    features = subprocess.run(["dumpe2fs", "-h", str(out)], capture_output=True, text=True,
                              check=True).stdout
    assert "has_journal" not in features
    # No time of the build is left in it: mke2fs copies each file's times.
    for path in ("/usr/bin/tool", "/etc/hostname", "/dev/console", "/bin/sh"):
        times = subprocess.run(["debugfs", "-R", f"stat {path}", str(out)],
                               capture_output=True, text=True, check=True).stdout
        for field in ("ctime", "atime", "mtime"):
            assert f" {field}: 0x00000000:" in times, (path, field, times)
    # One plan gives one image: a second build, in another second, is byte
    # for byte the same.
    time.sleep(1.1)
    again = tmp_path / "again.img"
    log = BuildLog(tmp_path / "build2.log", lambda _line: None)
    root_image.write_root_image(archive, "0123456789abcdef", tmp_path / "work", again, log)
    log.close()
    assert again.read_bytes() == out.read_bytes()


def test_the_image_is_not_built_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "as root" in (root_image.can_build() or "")


@pytest.mark.parametrize("key", ["kernel", "initrd", "image", "path"])
def test_configured_files_are_absolute_paths(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} = 'some/file' is not an absolute path"):
        _qemu_config(**{key: "some/file"}).validate("conf")
    _qemu_config(path="qemu-system-x86_64").validate("conf")  # found on PATH


def test_check_fails_an_image_others_could_change(tmp_path: Path) -> None:
    from pykata.cli import check_cmd

    image = tmp_path / "root.img"
    image.write_bytes(b"x")
    image.chmod(0o644)
    kernel = tmp_path / "vmlinux"
    item = check_cmd._root_image(image, "image", kernel, dax=False)
    assert not item.ok and "write permission" in item.detail
    image.chmod(0o444)
    item = check_cmd._root_image(image, "image", kernel, dax=False)
    assert item.ok and item.value == "image, read-only, virtio-blk disk", item
    # As a DAX device the one-byte image cannot be mapped: check says so.
    item = check_cmd._root_image(image, "image", kernel, dax=True)
    assert not item.ok and "not a multiple of 2 MiB" in item.detail, item
    assert "disable_image_nvdimm = true" in item.detail
    image.chmod(0o644)
    with image.open("r+b") as f:
        f.truncate(4 << 20)
    image.chmod(0o444)
    item = check_cmd._root_image(image, "image", kernel, dax=True)
    assert not item.ok and "has no config beside it" in item.detail, item
    (tmp_path / "config").write_text("".join(
        f"{name}=y\n" for name in kernel_config.DAX_ROOT_OPTIONS))
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"inputs": {"patches": [[kernel_config.DAX_ROOT_PATCH, "x"]]}}))
    item = check_cmd._root_image(image, "image", kernel, dax=True)
    assert item.ok and item.value == "image, read-only, DAX", item
