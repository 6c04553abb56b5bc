"""QEMU command-line pieces: one small object per device or option.

Each piece renders its own arguments, so a VM's command line can be checked in
a unit test without starting QEMU, and a new device is one new class.
File descriptors handed to QEMU (`fd=N`) are numbers in QEMU's process: the
caller passes the same descriptors through `pass_fds`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pykata.channels import AGENT_PORT_NAME, SHARED_FS_TAG, TOKEN_PORT_NAME


class QemuOption(Protocol):
    def args(self) -> list[str]: ...


def _escape(value: str) -> str:
    # QEMU option values use ',' as separator; a literal comma is doubled.
    return value.replace(",", ",,")


# The id of the guest RAM's backend object, when it is a file (templates).
RAM_BACKEND_ID = "pykata-ram"


@dataclass(frozen=True)
class Machine:
    machine_type: str
    accel: str
    # The guest RAM is the object RAM_BACKEND_ID (see Memory.path).
    ram_backend: bool = False
    # Under TCG, MiB of translated code QEMU keeps before it starts over
    # (tb-size); 0 leaves QEMU's default, a 1 GiB buffer.
    tcg_code_cache: int = 0
    # The guest RAM is NUMA node 0's memory (Memory.numa), not the
    # machine's memory-backend: QEMU takes one or the other.
    numa_ram: bool = False

    def args(self) -> list[str]:
        if self.machine_type == "microvm":
            # The legacy PIT, PIC and RTC stay: without the PIC the guest's
            # timer interrupt never arrives under TCG, and the RTC gives the
            # guest its wall-clock time.
            # acpi=off: QEMU then lists the virtio-mmio devices on the
            # kernel command line itself (auto-kernel-cmdline), and the guest
            # kernel needs no ACPI.
            opts = "microvm,acpi=off,pit=on,pic=on,rtc=on,isa-serial=on"
        else:
            opts = self.machine_type
        if self.ram_backend and not self.numa_ram:
            opts += f",memory-backend={RAM_BACKEND_ID}"
        if self.accel == "tcg" and self.tcg_code_cache:
            # tb-size is an option of the accelerator object, and QEMU takes
            # -accel or -machine accel=, never both.
            return ["-machine", opts, "-accel", f"tcg,tb-size={self.tcg_code_cache}"]
        return ["-machine", f"{opts},accel={self.accel}"]


@dataclass(frozen=True)
class Cpu:
    vcpus: int
    accel: str

    def args(self) -> list[str]:
        model = "host" if self.accel == "kvm" else "max"
        return ["-cpu", model, "-smp", str(self.vcpus)]


@dataclass(frozen=True)
class Memory:
    """Guest RAM: anonymous memory, a file (`path`), or (`memfd`) a memfd
    mapped shared. A template VM maps its file shared, so the guest's pages
    end up in it; a clone maps the template's file private: it reads the
    template's pages from the page cache, shared with every other clone, and
    a page it writes becomes its own copy. virtio-fs needs the memfd:
    virtiofsd maps the guest's RAM to read and write its buffers."""

    mib: int
    path: Path | None = None
    shared: bool = True
    memfd: bool = False
    # MiB of guest memory after the RAM that NUMA node 1 fills (the root
    # image on microvm, RootPmem): the RAM is then node 0, always an object.
    numa_after_mib: int = 0

    @property
    def numa(self) -> bool:
        return self.numa_after_mib > 0

    @property
    def backend(self) -> bool:
        """Whether the RAM is the object RAM_BACKEND_ID (Machine's memory-backend)."""
        return self.path is not None or self.memfd

    def args(self) -> list[str]:
        out = ["-m", f"{self.mib + self.numa_after_mib}M", *self._backend_args()]
        if self.numa:
            out += ["-numa", f"node,memdev={RAM_BACKEND_ID}"]
        return out

    def _backend_args(self) -> list[str]:
        out: list[str] = []
        if self.path is not None:
            share = "on" if self.shared else "off"
            out += ["-object", f"memory-backend-file,id={RAM_BACKEND_ID},size={self.mib}M,"
                               f"mem-path={_escape(str(self.path))},share={share}"]
        elif self.memfd:
            out += ["-object",
                    f"memory-backend-memfd,id={RAM_BACKEND_ID},size={self.mib}M,share=on"]
        elif self.numa:
            out += ["-object", f"memory-backend-ram,id={RAM_BACKEND_ID},size={self.mib}M"]
        return out


@dataclass(frozen=True)
class Incoming:
    """Start paused, waiting for device state over QMP (migrate-incoming)."""

    def args(self) -> list[str]:
        return ["-incoming", "defer"]


@dataclass(frozen=True)
class KernelBoot:
    kernel: Path
    initrd: Path | None
    cmdline: str

    def args(self) -> list[str]:
        initrd = [] if self.initrd is None else ["-initrd", str(self.initrd)]
        return ["-kernel", str(self.kernel), *initrd, "-append", self.cmdline]


# The guest's name for the root image: it is the VM's only virtio-blk disk.
ROOT_IMAGE_DEVICE = "/dev/vda"


@dataclass(frozen=True)
class RootImage:
    """The read-only root image as a virtio-blk disk. readonly=on makes QEMU
    open the file read-only and the disk report itself read-only: a write
    from the guest fails in QEMU whatever its kernel does. The default cache
    mode reads through the host's page cache, so every VM booted from the
    image shares one copy of the blocks they read. No file locks: nobody
    writes the image, and QEMU's locks would let any host user who can read
    it hold a lock that stops every VM from starting."""

    path: Path
    machine_type: str

    def args(self) -> list[str]:
        bus = _bus_suffix(self.machine_type)
        return [
            "-drive", f"file={_escape(str(self.path))},if=none,id=root,format=raw,readonly=on,"
                      "file.locking=off",
            "-device", f"virtio-blk-{bus},drive=root",
        ]


# The guest's name for the root image as a DAX device: the VM's only pmem.
ROOT_PMEM_DEVICE = "/dev/pmem0"
# The image's size must be a multiple of this (a memory block the guest maps
# with struct pages); pykata's image builder pads to it.
PMEM_ALIGN = 2 << 20
# microvm puts guest memory below 4 GiB up to 3 GiB, the rest from 4 GiB on.
_MICROVM_LOW_MIB = 3072
_FOUR_GIB_MIB = 4096
ROOT_BACKEND_ID = "pykata-root"


@dataclass(frozen=True)
class PmemLayout:
    """Where the root image sits in a microvm's guest memory: NUMA node 1,
    right after the RAM (node 0), which the guest kernel is told is
    persistent memory (memmap=SIZE!START) and makes /dev/pmem0 of."""

    ram_mib: int
    image_mib: int
    start_mib: int

    @classmethod
    def for_microvm(cls, ram_mib: int, image_bytes: int) -> PmemLayout:
        image_mib = image_bytes >> 20
        # An odd MiB of RAM would leave the image off its 2 MiB alignment.
        ram = ram_mib + ram_mib % 2
        if ram < _MICROVM_LOW_MIB < ram + image_mib:
            # The image would straddle the hole below 4 GiB and be two
            # ranges; a little more RAM moves it whole above 4 GiB.
            ram = _MICROVM_LOW_MIB
        if ram + image_mib <= _MICROVM_LOW_MIB:
            start = ram
        else:
            start = _FOUR_GIB_MIB + ram - _MICROVM_LOW_MIB
        return cls(ram, image_mib, start)

    def kernel_param(self) -> str:
        return f"memmap={self.image_mib}M!{self.start_mib}M"


@dataclass(frozen=True)
class RootPmem:
    """The read-only root image as guest memory the guest's ext4 reads in
    DAX mode: QEMU maps the host file, so every VM maps the same host
    page-cache pages and no guest keeps a copy of its own. microvm has no
    memory devices, so it is NUMA node 1 after the RAM (PmemLayout), which
    the guest kernel is told is persistent memory.

    share=on: the mapping is the file's own pages (and a template's save
    skips it with x-ignore-shared, so it is never copied into a template).
    readonly=on: QEMU opens the file O_RDONLY, maps it PROT_READ and makes
    the region read-only to the guest, so a guest's store into it is dropped
    (under KVM the memory slot is read-only and the write exits to QEMU).

    Not virtio-pmem: QEMU answers each of its flush requests with an fsync
    of the image on the host, which a hostile guest could repeat without end
    (and QEMU 7.2's microvm never maps the device)."""

    path: Path
    size: int

    def args(self) -> list[str]:
        return ["-object", f"memory-backend-file,id={ROOT_BACKEND_ID},"
                           f"mem-path={_escape(str(self.path))},size={self.size},"
                           "share=on,readonly=on",
                "-numa", f"node,memdev={ROOT_BACKEND_ID}"]


@dataclass(frozen=True)
class Basics:
    """Options every pykata VM gets: no default devices, no display, no reboot."""

    name: str
    sandbox: bool = True

    def args(self) -> list[str]:
        out = [
            "-name", _escape(self.name),
            "-nodefaults", "-no-user-config", "-display", "none",
            # A guest reboot (panic, or the agent giving up) ends the VM
            # instead of booting it again.
            "-no-reboot",
        ]
        if self.sandbox:
            # QEMU's own seccomp filter: a compromised QEMU cannot exec, fork,
            # raise privileges or change resource limits on the host.
            out += [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]
        return out


@dataclass(frozen=True)
class QmpFd:
    """The QMP monitor on an already-connected socket."""

    fd: int

    def args(self) -> list[str]:
        return [
            "-chardev", f"socket,id=qmp,fd={self.fd}",
            "-mon", "chardev=qmp,mode=control",
        ]


@dataclass(frozen=True)
class SerialConsoleFd:
    """The guest's serial console on an already-connected socket (the host
    reads it into a bounded log)."""

    fd: int

    def args(self) -> list[str]:
        return [
            "-chardev", f"socket,id=console,fd={self.fd}",
            "-serial", "chardev:console",
        ]


def _bus_suffix(machine_type: str) -> str:
    return "device" if machine_type == "microvm" else "pci"


def _serial_port(name: str, fd: int, machine_type: str, port: str) -> list[str]:
    """A virtio-serial bus with one named port on an already-connected socket."""
    return [
        "-device", f"virtio-serial-{_bus_suffix(machine_type)},id={name}serial",
        "-chardev", f"socket,id={name},fd={fd}",
        "-device", f"virtserialport,bus={name}serial.0,chardev={name},name={port}",
    ]


@dataclass(frozen=True)
class VirtioSerialAgent:
    """The agent channel: a named virtio-serial port on an already-connected socket."""

    fd: int
    machine_type: str

    def args(self) -> list[str]:
        return _serial_port("agent", self.fd, self.machine_type, AGENT_PORT_NAME)


@dataclass(frozen=True)
class TokenPort:
    """The virtio-serial port that hands the agent its VM's vsock token."""

    fd: int
    machine_type: str

    def args(self) -> list[str]:
        return _serial_port("token", self.fd, self.machine_type, TOKEN_PORT_NAME)


@dataclass(frozen=True)
class VhostVsock:
    """The agent channel over AF_VSOCK, for hosts with /dev/vhost-vsock."""

    guest_cid: int
    machine_type: str

    def args(self) -> list[str]:
        bus = _bus_suffix(self.machine_type)
        return ["-device", f"vhost-vsock-{bus},id=vsock,guest-cid={self.guest_cid}"]


@dataclass(frozen=True)
class Share9p:
    """A host directory exported to the guest over virtio-9p."""

    path: Path
    machine_type: str
    tag: str = SHARED_FS_TAG

    def args(self) -> list[str]:
        bus = _bus_suffix(self.machine_type)
        # multidevs=remap: container rootfs bind mounts under the shared
        # directory live on other host filesystems; remapping keeps guest
        # inode numbers unique across them. security_model=passthrough: the
        # guest's owners and modes are the host files' own (mapped-xattr
        # would turn an image's symlinks unreadable), and a change QEMU may
        # not make (see hypervisor/confine.py) fails in the guest instead of
        # being silently dropped as with "none".
        return [
            "-fsdev",
            f"local,id=shared,path={_escape(str(self.path))},security_model=passthrough,"
            "multidevs=remap",
            "-device", f"virtio-9p-{bus},fsdev=shared,mount_tag={self.tag}",
        ]


@dataclass(frozen=True)
class VirtioFs:
    """The export over virtio-fs: a vhost-user device whose backend is
    virtiofsd, on an already-connected socket (`fd`, see
    hypervisor.virtiofsd)."""

    fd: int
    machine_type: str
    tag: str = SHARED_FS_TAG

    def args(self) -> list[str]:
        bus = _bus_suffix(self.machine_type)
        # queue-size 1024: Kata's; a request larger than the queue is split.
        return [
            "-chardev", f"socket,id=virtiofs,fd={self.fd}",
            "-device", f"vhost-user-fs-{bus},chardev=virtiofs,tag={self.tag},queue-size=1024",
        ]


@dataclass(frozen=True)
class ModernVirtioMmio:
    """virtio-mmio devices speak modern (1.0) virtio. `microvm` defaults to
    legacy virtio, which libvhost-user (virtiofsd) refuses: QEMU then fails
    with "vhost_set_mem_table failed: Input/output error"."""

    machine_type: str

    def args(self) -> list[str]:
        if self.machine_type != "microvm":
            return []
        return ["-global", "virtio-mmio.force-legacy=false"]


@dataclass(frozen=True)
class TapNic:
    """A virtio-net NIC on an already-open tap (`fd`), with the kernel's
    vhost-net datapath when given an open /dev/vhost-net (`vhost_fd`)."""

    index: int
    fd: int
    mac: str
    mtu: int
    machine_type: str
    vhost_fd: int = -1

    def args(self) -> list[str]:
        bus = _bus_suffix(self.machine_type)
        vhost = f"vhost=on,vhostfd={self.vhost_fd}" if self.vhost_fd >= 0 else "vhost=off"
        # No tap (fd -1): a template VM's NIC, on a hub port nothing else is on.
        backend = (f"tap,id=net{self.index},fd={self.fd},{vhost}" if self.fd >= 0
                   else f"hubport,id=net{self.index},hubid={self.index}")
        # host_mtu: the guest's driver takes the pod interface's MTU itself.
        return [
            "-netdev", backend,
            "-device", f"virtio-net-{bus},netdev=net{self.index},mac={self.mac},"
                       f"host_mtu={self.mtu}",
        ]


@dataclass(frozen=True)
class Rng:
    """A virtio entropy source: the guest's getrandom() must not block at boot."""

    machine_type: str

    def args(self) -> list[str]:
        return ["-device", f"virtio-rng-{_bus_suffix(self.machine_type)}"]


@dataclass(frozen=True)
class FreePageBalloon:
    """virtio-balloon with free page reporting on: the guest's freed pages
    are discarded from QEMU's memory (madvise DONTNEED)."""

    machine_type: str

    def args(self) -> list[str]:
        return ["-device",
                f"virtio-balloon-{_bus_suffix(self.machine_type)},free-page-reporting=on"]


def render(options: Iterable[QemuOption]) -> list[str]:
    out: list[str] = []
    for option in options:
        out.extend(option.args())
    return out


def join_cmdline(parts: Sequence[str]) -> str:
    return " ".join(p for p in parts if p)
