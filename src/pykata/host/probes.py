"""What the host offers a VM: acceleration, vsock, virtiofsd, the TSC rate.

Each probe returns a value and the reason for it, because `pykata check` shows
both and a user choosing between KVM and TCG wants to know why.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
KVM_DEVICE = Path("/dev/kvm")
VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")
VIRTIOFSD_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """A yes/no (or chosen value) together with the reason for it."""

    value: str
    reason: str


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def probe_accel(cpuinfo: str | None = None, kvm_device: Path = KVM_DEVICE) -> Probe:
    """KVM when the CPU has hardware virtualization and /dev/kvm opens; else TCG.

    A /dev/kvm without vmx/svm in the CPU flags is a paravirtual nested KVM that
    only boots specially patched guests (an ordinary kernel hangs right after
    decompression), so its presence alone is not enough.
    """
    flags = _cpu_flags(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    hw = {"vmx", "svm"} & flags
    if not hw:
        return Probe("tcg", "the CPU has no hardware virtualization (no vmx or svm flag)")
    if not kvm_device.exists():
        return Probe("tcg", f"{kvm_device} does not exist (is the kvm module loaded?)")
    try:
        fd = os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        why = "permission denied" if exc.errno == errno.EACCES else exc.strerror
        return Probe("tcg", f"cannot open {kvm_device}: {why}")
    os.close(fd)
    return Probe("kvm", f"{sorted(hw)[0]} flag present and {kvm_device} opens")


_warned_tcg = False


def resolve_accel(setting: str) -> Probe:
    """The acceleration a VM uses, given the configuration's `accel` value.

    Falling back to TCG is logged as a warning, once per process: the VM is
    still a real boundary, but everything in it runs many times slower.
    """
    global _warned_tcg
    probe = probe_accel() if setting == "auto" else Probe(
        setting, "set in the configuration (accel)")
    if probe.value == "tcg" and setting == "auto" and not _warned_tcg:
        _warned_tcg = True
        log.warning("using TCG (software emulation, slow): %s", probe.reason)
    return probe


def probe_vsock(device: Path = VHOST_VSOCK_DEVICE) -> Probe:
    if device.exists():
        return Probe("vsock", f"{device} exists")
    return Probe("virtio-serial", f"{device} does not exist (no vhost_vsock module)")


def find_virtiofsd() -> str | None:
    for candidate in VIRTIOFSD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("virtiofsd")


@functools.cache
def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host TSC rate in kHz when the host states it, else None.

    Under TCG the guest's TSC runs at the host's rate. Telling the guest kernel
    (tsc_early_khz=) spares it the calibration against the emulated PIT, which
    under host load sometimes fails and then hangs the boot. The value is only
    trusted when /proc/cpuinfo's "cpu MHz" is the TSC rate: an invariant TSC
    and no APERF/MPERF (with those, "cpu MHz" is the current clock instead).
    """
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = _cpu_flags(text)
    if "constant_tsc" not in flags or "aperfmperf" in flags:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return round(float(line.partition(":")[2]) * 1000)
            except ValueError:
                return None
    return None
