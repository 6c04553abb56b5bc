"""The root image as a DAX device: on microvm, guest memory after the RAM
that the kernel is told is persistent (q35 keeps the disk). The command line
QEMU gets, the kernel command line, where the image lands in guest memory,
and the checks that fail before QEMU would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pykata import config as config_mod
from pykata.errors import HypervisorError
from pykata.factory import template
from pykata.hypervisor import kernel_config
from pykata.hypervisor import qemu_args as qa
from pykata.hypervisor.qemu import QemuVM, VmConfig

_MIB = 1 << 20
_GOOD_CONFIG = "".join(f"{name}=y\n" for name in kernel_config.DAX_ROOT_OPTIONS)
_MANIFEST = json.dumps({"inputs": {"patches": [
    ["0001-lapic-period-from-the-host.patch", "aa"], [kernel_config.DAX_ROOT_PATCH, "bb"]]}})


def _vm(tmp_path: Path, image_size: int = 40 * _MIB, kernel_config_text: str | None = _GOOD_CONFIG,
        manifest: str | None = _MANIFEST, **kw: object) -> VmConfig:
    kernel = tmp_path / "vmlinux"
    kernel.write_text("k")
    for name, text in (("config", kernel_config_text), ("manifest.json", manifest)):
        (tmp_path / name).unlink(missing_ok=True)
        if text is not None:
            (tmp_path / name).write_text(text)
    image = tmp_path / "ro,ot.img"
    with image.open("wb") as f:
        f.truncate(image_size)
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.0'\n")
    qemu.chmod(0o755)
    values: dict[str, object] = {"name": "s1", "run_dir": tmp_path, "qemu_path": str(qemu),
                                 "kernel": kernel, "image": image, "image_dax": True,
                                 "memory_mib": 256}
    values.update(kw)
    return VmConfig(**values)  # type: ignore[arg-type]


def _after(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, word in enumerate(cmd) if word == flag]


def test_microvm_maps_the_image_read_only_and_shared_after_the_ram(tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    vm.check()
    cmd = QemuVM(vm).command(7, 9, 11)
    assert "-drive" not in cmd and "-initrd" not in cmd
    assert _after(cmd, "-object") == [
        "memory-backend-ram,id=pykata-ram,size=256M",
        f"memory-backend-file,id=pykata-root,mem-path={tmp_path}/ro,,ot.img,"
        f"size={40 * _MIB},share=on,readonly=on",
    ]
    # Node 0 is the RAM, node 1 the image, in that order in guest memory.
    assert _after(cmd, "-numa") == ["node,memdev=pykata-ram", "node,memdev=pykata-root"]
    assert _after(cmd, "-m") == ["296M"]
    machine = _after(cmd, "-machine")[0]
    assert machine.startswith("microvm,acpi=off,") and "memory-backend" not in machine
    assert not any("virtio-pmem" in word for word in cmd)
    words = vm.kernel_cmdline().split()
    rooted = [w for w in words if w.startswith(("root", "init", "memmap")) or w == "ro"]
    assert rooted == ["memmap=40M!256M", "root=/dev/pmem0", "ro", "rootfstype=ext4",
                      "rootflags=dax", "rootwait", "init=/init"]


@pytest.mark.parametrize(("ram", "expected"), [
    (512, (512, 40, 512)),
    (511, (512, 40, 512)),            # odd MiB: the image stays 2 MiB aligned
    (3032, (3032, 40, 3032)),         # ends right at 3 GiB: below 4 GiB
    (3040, (3072, 40, 4096)),         # would straddle the hole: whole above 4 GiB
    (3072, (3072, 40, 4096)),
    (4096, (4096, 40, 5120)),         # RAM past 3 GiB continues at 4 GiB
])
def test_where_the_image_lands_in_microvm_memory(ram: int, expected: tuple[int, int, int]
                                                 ) -> None:
    layout = qa.PmemLayout.for_microvm(ram, 40 * _MIB)
    assert (layout.ram_mib, layout.image_mib, layout.start_mib) == expected
    assert layout.kernel_param() == f"memmap=40M!{expected[2]}M"


def test_a_template_and_its_clones_keep_the_ram_as_node_zero(tmp_path: Path) -> None:
    """A clone's RAM is the template's file mapped private, as NUMA node 0;
    the image stays share=on, which x-ignore-shared leaves out of every
    saved state."""
    for shared in (True, False):
        vm = _vm(tmp_path, memory_path=tmp_path / "ram", memory_shared=shared,
                 incoming=not shared)
        cmd = QemuVM(vm).command(7, 9, 11)
        share = "on" if shared else "off"
        assert _after(cmd, "-object")[0] == (
            f"memory-backend-file,id=pykata-ram,size=256M,mem-path={tmp_path}/ram,share={share}")
        assert "share=on,readonly=on" in _after(cmd, "-object")[1]
        assert _after(cmd, "-numa") == ["node,memdev=pykata-ram", "node,memdev=pykata-root"]
        assert "memory-backend" not in _after(cmd, "-machine")[0]


def test_the_virtio_blk_image_keeps_the_machines_own_ram(tmp_path: Path) -> None:
    vm = _vm(tmp_path, image_dax=False)
    cmd = QemuVM(vm).command(7, 9, 11)
    assert _after(cmd, "-m") == ["256M"]
    assert "-numa" not in cmd and "memmap" not in vm.kernel_cmdline()
    assert not any("pmem" in word for word in cmd)


def test_q35_keeps_the_read_only_disk(tmp_path: Path) -> None:
    """Not virtio-pmem: QEMU would fsync the image on the host for each of
    the guest's flush requests, which a hostile guest could send without end."""
    vm = _vm(tmp_path, machine_type="q35", accel="kvm")
    assert not vm.root_pmem
    cmd = QemuVM(vm).command(7, 9, 11)
    assert "virtio-blk-pci,drive=root" in cmd
    assert not any("pmem" in word for word in cmd)
    assert _after(cmd, "-m") == ["256M"]
    assert "root=/dev/vda" in vm.kernel_cmdline() and "memmap" not in vm.kernel_cmdline()


def test_an_image_of_the_wrong_size_is_refused_with_the_fix(tmp_path: Path) -> None:
    vm = _vm(tmp_path, image_size=41672704)
    with pytest.raises(HypervisorError, match="not a multiple of 2 MiB") as err:
        vm.check()
    assert "disable_image_nvdimm = true" in (err.value.hint or "")
    with pytest.raises(HypervisorError, match="not a multiple of 2 MiB"):
        _vm(tmp_path, image_size=0).check()


def test_a_kernel_without_dax_is_refused_with_what_it_lacks(tmp_path: Path) -> None:
    text = _GOOD_CONFIG.replace("CONFIG_FS_DAX=y\n", "# CONFIG_FS_DAX is not set\n").replace(
        "CONFIG_X86_PMEM_LEGACY=y", "CONFIG_X86_PMEM_LEGACY=m")
    vm = _vm(tmp_path, kernel_config_text=text)
    with pytest.raises(HypervisorError, match="lacks CONFIG_X86_PMEM_LEGACY, CONFIG_FS_DAX") as err:
        vm.check()
    assert "assets build" in (err.value.hint or "")
    assert "disable_image_nvdimm = true" in (err.value.hint or "")


@pytest.mark.parametrize("manifest", [
    None,
    "{not json",
    json.dumps({"inputs": {"patches": [["0001-lapic-period-from-the-host.patch", "aa"]]}}),
    json.dumps(["a list"]),
])
def test_a_kernel_without_pykatas_pmem_patch_is_refused(tmp_path: Path,
                                                        manifest: str | None) -> None:
    """A stock kernel on microvm has every option yet never registers the
    image's memory: booted, it would wait for /dev/pmem0 until the agent's
    dial timeout. Refused before QEMU starts instead."""
    with pytest.raises(HypervisorError, match=kernel_config.DAX_ROOT_PATCH) as err:
        _vm(tmp_path, manifest=manifest).check()
    assert "disable_image_nvdimm = true" in (err.value.hint or "")


def test_a_kernel_of_unknown_config_is_refused(tmp_path: Path) -> None:
    """A kernel the user names may have no config beside it: pykata cannot
    tell whether it can map the image, and one that cannot would hang."""
    with pytest.raises(HypervisorError, match="has no config beside it"):
        _vm(tmp_path, kernel_config_text=None).check()
    assert kernel_config.missing_for_dax_root(tmp_path / "vmlinux") is None
    # As a disk the same kernel is let boot.
    _vm(tmp_path, kernel_config_text=None, image_dax=False).check()


def test_template_identity_tells_dax_from_the_disk(tmp_path: Path) -> None:
    dax = template.identity(_vm(tmp_path))
    disk = template.identity(_vm(tmp_path, image_dax=False))
    assert template.template_key(dax) != template.template_key(disk)


def test_configuration_defaults_to_dax_and_can_turn_it_off() -> None:
    assert config_mod.QemuConfig().disable_image_nvdimm is False
    off = config_mod.QemuConfig(disable_image_nvdimm=True)
    assert off.disable_image_nvdimm is True
