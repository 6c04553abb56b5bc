"""QEMU command lines and host probes, without starting QEMU."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pykata.errors import HypervisorError
from pykata.host import probes as host
from pykata.hypervisor import qemu_args as qa
from pykata.hypervisor.qemu import QemuVM, VmConfig

_CPUINFO = "processor : 0\ncpu MHz : 2445.412\nflags : fpu {flags}\n"


def _vm(tmp_path: Path, **kw: object) -> VmConfig:
    values: dict[str, object] = {"name": "s1", "run_dir": tmp_path, "qemu_path": "/bin/true",
                                 "kernel": tmp_path / "vmlinux", "initrd": tmp_path / "initrd"}
    values.update(kw)
    return VmConfig(**values)  # type: ignore[arg-type]


def test_microvm_command_line(tmp_path: Path) -> None:
    """The microvm VM: mmio devices, the agent port, the 9p share and the sandbox."""
    cmd = QemuVM(_vm(tmp_path, shared_dir=tmp_path / "sh,ared")).command(7, 9, 11)
    text = " ".join(cmd)
    assert "microvm,acpi=off" in text and "accel=tcg" in text
    assert "virtio-serial-device" in text and "name=agent.channel.0" in text
    assert "socket,id=qmp,fd=7" in text and "socket,id=agent,fd=9" in text
    assert "socket,id=console,fd=11" in text and "security_model=passthrough" in text
    assert f"path={tmp_path}/sh,,ared" in text  # commas doubled for QEMU
    assert "virtio-9p-device,fsdev=shared,mount_tag=kataShared" in text
    assert "-sandbox" in cmd and "-no-reboot" in cmd


def test_q35_uses_pci_devices() -> None:
    """On q35 the same devices come as their PCI variants."""
    args = qa.render([qa.Rng("q35"), qa.VirtioSerialAgent(3, "q35")])
    assert "virtio-rng-pci" in args and "virtio-serial-pci,id=agentserial" in args


def test_kernel_command_line(tmp_path: Path) -> None:
    """quiet unless debugging; TCG-only clock options only under TCG; user params last."""
    tcg = _vm(tmp_path, kernel_params="foo=bar").kernel_cmdline()
    assert "quiet" in tcg and "no_timer_check" in tcg and tcg.endswith("foo=bar")
    kvm = _vm(tmp_path, accel="kvm", debug=True).kernel_cmdline()
    assert "quiet" not in kvm and "no_timer_check" not in kvm and "pykata.debug=1" in kvm


def test_check_names_what_is_missing(tmp_path: Path) -> None:
    """Missing QEMU, kernel or initrd fail before launch, naming the path and the fix."""
    with pytest.raises(HypervisorError, match="QEMU not found at /no/qemu"):
        _vm(tmp_path, qemu_path="/no/qemu").check()
    with pytest.raises(HypervisorError) as kernel:
        _vm(tmp_path).check()
    assert f"guest kernel not found at {tmp_path / 'vmlinux'}" in str(kernel.value)
    assert "pykata assets build" in str(kernel.value)
    (tmp_path / "vmlinux").write_bytes(b"k")
    with pytest.raises(HypervisorError, match="guest initrd not found"):
        _vm(tmp_path).check()


def test_accel_needs_hardware_virtualization(tmp_path: Path) -> None:
    """No vmx/svm means TCG whatever /dev/kvm says; with vmx, KVM if it opens."""
    no_hw = host.probe_accel(_CPUINFO.format(flags="sse2 hypervisor"), tmp_path / "kvm")
    assert no_hw.value == "tcg" and "no vmx or svm" in no_hw.reason
    missing = host.probe_accel(_CPUINFO.format(flags="vmx"), tmp_path / "kvm")
    assert missing.value == "tcg" and "does not exist" in missing.reason
    (tmp_path / "kvm").write_bytes(b"")
    assert host.probe_accel(_CPUINFO.format(flags="vmx"), tmp_path / "kvm").value == "kvm"


def test_tsc_rate_trusted_only_when_cpuinfo_states_it() -> None:
    """An invariant TSC without APERF/MPERF: cpu MHz is the TSC rate; otherwise unknown."""
    assert host.host_tsc_khz(_CPUINFO.format(flags="constant_tsc")) == 2445412
    assert host.host_tsc_khz(_CPUINFO.format(flags="constant_tsc aperfmperf")) is None
    assert host.host_tsc_khz(_CPUINFO.format(flags="tsc")) is None


def test_nics_on_taps_the_caller_opened(tmp_path: Path) -> None:
    from pykata.hypervisor.base import NetworkInterface

    nics = (NetworkInterface(21, "02:00:00:00:00:01", 1400, vhost_fd=23),
            NetworkInterface(22, "02:00:00:00:00:02", 9000))
    cmd = " ".join(QemuVM(_vm(tmp_path, network=nics)).command(7, 9, 11))
    # With an open /dev/vhost-net the kernel carries the NIC's traffic.
    assert "-netdev tap,id=net0,fd=21,vhost=on,vhostfd=23" in cmd
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1400" in cmd
    assert "-netdev tap,id=net1,fd=22,vhost=off" in cmd
    assert "mac=02:00:00:00:00:02,host_mtu=9000" in cmd


def test_every_vm_reports_its_free_pages(tmp_path: Path) -> None:
    """A never-inflating balloon with free page reporting: pages the guest
    frees (its unpacked initrd's image) stop costing the host memory."""
    cmd = " ".join(QemuVM(_vm(tmp_path)).command(7, 9, 11))
    assert "-device virtio-balloon-device,free-page-reporting=on" in cmd


def test_template_memory_shared_and_a_clone_private_and_incoming(tmp_path: Path) -> None:
    """A template VM's RAM is its file, mapped shared; a clone maps the same
    file private and waits for its device state."""
    memory = tmp_path / "mem,ory"
    template = " ".join(QemuVM(_vm(tmp_path, memory_path=memory)).command(7, 9, 11))
    assert f"memory-backend-file,id=pykata-ram,size=512M,mem-path={tmp_path}/mem,,ory," \
           "share=on" in template
    assert "memory-backend=pykata-ram" in template and "-incoming" not in template
    clone = QemuVM(_vm(tmp_path, memory_path=memory, memory_shared=False, incoming=True))
    cmd = clone.command(7, 9, 11)
    assert "share=off" in " ".join(cmd)
    assert cmd[cmd.index("-incoming") + 1] == "defer"
    plain = " ".join(QemuVM(_vm(tmp_path)).command(7, 9, 11))
    assert "memory-backend" not in plain and "-incoming" not in plain


def test_a_template_nic_has_no_tap() -> None:
    """A template VM's NIC (no tap yet) is on a hub port of its own; a clone's
    is on the pod's tap, with the same netdev id."""
    template = " ".join(qa.TapNic(1, -1, "02:70:6b:74:00:01", 1500, "microvm").args())
    assert "hubport,id=net1,hubid=1" in template and "fd=" not in template
    clone = " ".join(qa.TapNic(1, 12, "02:aa:00:00:00:01", 1400, "microvm").args())
    assert "tap,id=net1,fd=12" in clone and "mac=02:aa:00:00:00:01" in clone


def test_no_free_page_reporting_with_ram_in_a_file(tmp_path: Path) -> None:
    """QEMU 7.2 punches holes in a RAM file for reported pages, even a private
    mapping's: a clone would zero the template's pages. VMs on a file have no
    balloon (templates and clones alike)."""
    on_file = " ".join(QemuVM(_vm(tmp_path, memory_path=tmp_path / "m",
                                  memory_shared=False)).command(7, 9, 11))
    assert "virtio-balloon" not in on_file
    assert "free-page-reporting=on" in " ".join(QemuVM(_vm(tmp_path)).command(7, 9, 11))


def test_virtio_fs_command_line(tmp_path: Path) -> None:
    """With virtio-fs: RAM from a shared memfd (virtiofsd maps it), modern
    virtio-mmio (libvhost-user refuses legacy), the vhost-user-fs device on
    the connected socket QEMU inherits, and no 9p."""
    vm = _vm(tmp_path, shared_dir=tmp_path, shared_fs="virtio-fs",
             virtiofsd="/usr/lib/qemu/virtiofsd")
    cmd = QemuVM(vm).command(7, 9, 11, 13)
    text = " ".join(cmd)
    assert "memory-backend-memfd,id=pykata-ram,size=512M,share=on" in text
    assert "memory-backend=pykata-ram" in text
    assert cmd[cmd.index("-global") + 1] == "virtio-mmio.force-legacy=false"
    assert "-chardev socket,id=virtiofs,fd=13" in text
    assert "vhost-user-fs-device,chardev=virtiofs,tag=kataShared" in text
    assert "9p" not in text and "fsdev" not in text
    q35 = " ".join(qa.render([qa.VirtioFs(5, "q35"), qa.ModernVirtioMmio("q35")]))
    assert "vhost-user-fs-pci" in q35 and "force-legacy" not in q35


def test_virtio_fs_command_line_on_q35(tmp_path: Path) -> None:
    """On q35 the whole VM's command line: the PCI vhost-user-fs device on the
    socket QEMU inherits, the machine's RAM the shared memfd virtiofsd maps,
    no virtio-mmio global (q35 has no virtio-mmio; its PCI devices are
    modern already) and no 9p."""
    vm = _vm(tmp_path, shared_dir=tmp_path, shared_fs="virtio-fs", machine_type="q35",
             virtiofsd="/usr/lib/qemu/virtiofsd")
    cmd = QemuVM(vm).command(7, 9, 11, 13)
    text = " ".join(cmd)
    assert cmd[cmd.index("-machine") + 1] == "q35,memory-backend=pykata-ram,accel=tcg"
    assert "memory-backend-memfd,id=pykata-ram,size=512M,share=on" in text
    assert "-chardev socket,id=virtiofs,fd=13" in text
    devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]
    assert "vhost-user-fs-pci,chardev=virtiofs,tag=kataShared,queue-size=1024" in devices
    assert not any(d.startswith("vhost-user-fs-device") for d in devices)
    assert "-global" not in cmd and "virtio-mmio" not in text
    assert "9p" not in text and "fsdev" not in text


def test_virtio_fs_is_refused_on_a_templates_ram(tmp_path: Path) -> None:
    """A VM restored from a template maps its RAM private and QEMU 7.2 cannot
    save a vhost-user-fs device: such a VM is refused before anything starts."""
    for path in ("vmlinux", "initrd"):
        (tmp_path / path).write_bytes(b"")
    vm = _vm(tmp_path, shared_dir=tmp_path, shared_fs="virtio-fs", qemu_path="/bin/true",
             virtiofsd="/bin/true", memory_path=tmp_path / "memory", memory_shared=False)
    with pytest.raises(HypervisorError, match="template"):
        vm.check()


def test_virtiofsd_arguments_and_checks(tmp_path: Path) -> None:
    """virtiofsd's confinement and behaviour are on its command line; a
    missing binary names the fix; a path with a comma (fuse's option
    separator) is refused."""
    from pykata.hypervisor.virtiofsd import VirtiofsdConfig

    args = VirtiofsdConfig("/usr/lib/qemu/virtiofsd", tmp_path).args(5, 4096)
    assert args[:2] == ["/usr/lib/qemu/virtiofsd", "--fd=5"]
    options = {args[i + 1] for i, a in enumerate(args) if a == "-o"}
    assert {f"source={tmp_path}", "sandbox=namespace", "cache=auto", "xattr",
            "announce_submounts", "no_posix_lock", "no_flock",
            "modcaps=-mknod:-fsetid:-setfcap"} <= options
    assert "--thread-pool-size=0" in args and "--rlimit-nofile=4096" in args
    with pytest.raises(HypervisorError, match="qemu-system-common"):
        VirtiofsdConfig(str(tmp_path / "none"), tmp_path).check()
    with pytest.raises(HypervisorError, match="comma"):
        VirtiofsdConfig("/bin/true", tmp_path / "a,b").check()


def test_tcg_code_cache_is_an_accelerator_option_and_only_under_tcg(tmp_path: Path) -> None:
    """tb-size reaches QEMU through -accel (never with -machine accel= too);
    KVM, which translates nothing, and 0 keep the single -machine form."""
    cmd = QemuVM(_vm(tmp_path, tcg_code_cache_mib=32)).command(7, 9, 11)
    assert cmd[cmd.index("-accel") + 1] == "tcg,tb-size=32"
    assert "accel=" not in cmd[cmd.index("-machine") + 1]
    for vm in (_vm(tmp_path, tcg_code_cache_mib=32, accel="kvm"),
               _vm(tmp_path, tcg_code_cache_mib=0)):
        cmd = QemuVM(vm).command(7, 9, 11)
        assert "-accel" not in cmd
        assert cmd[cmd.index("-machine") + 1].endswith(f",accel={vm.accel}")


@pytest.mark.parametrize(("config", "expected"), [
    ("CONFIG_HZ_250=y\nCONFIG_HZ=250\n", "pykata.lapic_period=4000000"),
    ("CONFIG_HZ=1000\n", "pykata.lapic_period=1000000"),
    ("CONFIG_HZ=1234\n", None),  # no x86 kernel ticks at that rate
    ("CONFIG_HZ=250 && reboot\n", None),
    (None, None),  # a kernel without its config beside it
])
def test_lapic_period_comes_from_the_kernels_own_tick_rate(
        tmp_path: Path, config: str | None, expected: str | None) -> None:
    """Under TCG the APIC timer's period is 10^9 / HZ of QEMU's 1 GHz APIC
    clock, given only when the kernel's HZ is known; never under KVM."""
    kernel = tmp_path / "k" / "vmlinux"
    kernel.parent.mkdir()
    if config is not None:
        (kernel.parent / "config").write_text(config)
    words = _vm(tmp_path, kernel=kernel).kernel_cmdline().split()
    periods = [w for w in words if w.startswith("pykata.lapic_period")]
    assert periods == ([expected] if expected else [])
    kvm = _vm(tmp_path, kernel=kernel, accel="kvm").kernel_cmdline()
    assert "lapic_period" not in kvm


def test_a_fifo_in_place_of_the_kernel_config_does_not_stall_a_start(tmp_path: Path) -> None:
    """Read in a thread: a blocking open would hang the test, not fail it."""
    kernel = tmp_path / "vmlinux"
    os.mkfifo(tmp_path / "config")
    found: list[str] = []
    reader = threading.Thread(
        target=lambda: found.append(_vm(tmp_path, kernel=kernel).kernel_cmdline()), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the stuck open so the thread can end
        with open(tmp_path / "config", "wb"):
            pass
        pytest.fail("reading a FIFO planted as the kernel's config blocked")
    assert found and "lapic_period" not in found[0]
