"""The QEMU driver: configure (VmConfig), launch (QemuVM.start), control, stop.

QEMU is pykata's child. Its QMP monitor, the agent's virtio-serial port and
the guest console are each one end of a socketpair created here and inherited
by QEMU (`fd=N`), so there is no socket path to poll for, no race with QEMU
creating it, and a VM whose QEMU died shows up at once as end-of-file on all.
The console and QEMU's own output reach bounded files (`capped_log`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.errors import HypervisorError
from pykata.host.probes import host_tsc_khz
from pykata.hypervisor import kernel_config, migration
from pykata.hypervisor import qemu_args as qa
from pykata.hypervisor import virtiofsd as vfs
from pykata.hypervisor.base import (
    AgentChannel,
    Console,
    Device,
    EntropySource,
    FreePageReporting,
    NetworkInterface,
    SharedDirectory,
)
from pykata.hypervisor.capped_log import CappedLog, read_tail
from pykata.hypervisor.confine import confining_hook
from pykata.hypervisor.kernel_config import tick_rate
from pykata.hypervisor.qmp import QmpConnection
from pykata.untrusted import guest_text

log = logging.getLogger(__name__)

_STOP_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class VmConfig:
    """Everything a VM is made from, checked before QEMU starts."""

    name: str
    run_dir: Path
    qemu_path: str
    kernel: Path
    # The guest's root filesystem: an initrd, or (`image`) a read-only ext4
    # image, mapped into the guest or a disk (image_dax). Exactly one is set.
    initrd: Path | None = None
    machine_type: str = "microvm"
    accel: str = "tcg"
    vcpus: int = 1
    memory_mib: int = 512
    kernel_params: str = ""
    shared_dir: Path | None = None
    debug: bool = False
    # The agent channel: AF_VSOCK to this context id, or (0) virtio-serial.
    vsock_cid: int = 0
    # With vsock: the secret the agent wants first on every connection,
    # handed to it through a virtio-serial port only QEMU and we hold.
    vsock_token: bytes = field(default=b"", repr=False)
    # Bytes of guest console kept on the host (and a quarter of it for QEMU's stderr).
    console_limit: int = 1 << 20
    # NICs on taps the caller opened (tcfilter): their descriptors go to QEMU.
    network: tuple[NetworkInterface, ...] = ()
    # Guest RAM in this file (templates), mapped shared or private; else anonymous.
    memory_path: Path | None = None
    memory_shared: bool = True
    # Start paused, to be restored from a saved state (QemuVM.restore_state).
    incoming: bool = False
    # Not killed when the process that starts it dies: a VM the VM cache
    # keeps warm, which a pod's owner takes over and the cache may not outlive.
    outlives_owner: bool = False
    # How the guest gets shared_dir: "virtio-9p" (QEMU's 9p server) or
    # "virtio-fs" (a virtiofsd of its own, at `virtiofsd`, in that cache mode).
    shared_fs: str = "virtio-9p"
    virtiofsd: str = ""
    virtio_fs_cache: str = "auto"
    image: Path | None = None
    # On microvm, the image mapped into the guest (DAX: memory after the
    # RAM), whose pages every VM shares, rather than a virtio-blk disk each
    # guest caches its own copy of. q35 always gets the disk.
    image_dax: bool = False
    # Under TCG: MiB of translated guest code QEMU keeps (0: QEMU's default).
    tcg_code_cache_mib: int = 0

    def __post_init__(self) -> None:
        if (self.initrd is None) == (self.image is None):
            raise ValueError("a VM boots from exactly one of an initrd and a root image")

    @property
    def guest_root(self) -> Path:
        """The file the guest's root filesystem comes from."""
        root = self.image or self.initrd
        assert root is not None
        return root

    @property
    def root_pmem(self) -> bool:
        """Whether the root image is mapped into the guest (DAX): on microvm
        only. q35 could take a virtio-pmem device, but QEMU fsyncs the image
        on the host for each of its flush requests, which a hostile guest
        could send without end; it gets the read-only disk."""
        return self.image is not None and self.image_dax and self.machine_type == "microvm"

    def pmem_layout(self) -> qa.PmemLayout | None:
        """Where the image sits in the guest's memory (DAX)."""
        if not self.root_pmem:
            return None
        assert self.image is not None
        return qa.PmemLayout.for_microvm(self.memory_mib, self.image.stat().st_size)

    @property
    def uses_virtio_fs(self) -> bool:
        return self.shared_dir is not None and self.shared_fs == "virtio-fs"

    def virtiofsd_config(self) -> vfs.VirtiofsdConfig:
        assert self.shared_dir is not None
        return vfs.VirtiofsdConfig(self.virtiofsd, self.shared_dir, self.virtio_fs_cache)

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def stderr_log(self) -> Path:
        return self.run_dir / "qemu.stderr"

    def _lapic_period(self) -> str:
        """Under emulation, the local APIC timer's period for pykata's kernel
        (its patch 0001), which then skips measuring it: 0.2 s of every cold
        boot. QEMU's emulated APIC counts at 1 GHz, so a tick is 10^9 / HZ of
        its cycles; only with the kernel's HZ known from the config beside it,
        as a wrong period would skew every guest timer. Another kernel ignores
        the parameter. KVM guests use the TSC deadline timer where the host
        has one and are left to measure where it does not."""
        hz = tick_rate(self.kernel)
        return f"pykata.lapic_period={1_000_000_000 // hz}" if hz else ""

    def kernel_cmdline(self) -> str:
        parts = [
            "console=ttyS0",
            # A guest reboot or panic ends the VM (QEMU runs with -no-reboot).
            "reboot=t", "panic=-1",
            "" if self.debug else "quiet",
        ]
        if self.accel == "tcg":
            khz = host_tsc_khz()
            # Under emulation: skip TSC calibration against the PIT and the
            # IO-APIC timer check, both of which misjudge a vCPU thread the
            # host descheduled and can hang or panic the boot.
            parts += [f"tsc_early_khz={khz}" if khz else "", "tsc=reliable", "no_timer_check",
                      self._lapic_period()]
        if self.debug:
            parts.append("pykata.debug=1")
        if self.vsock_cid:
            parts.append("pykata.transport=vsock")
        if self.root_pmem:
            layout = self.pmem_layout()
            # The only pmem device; dax: ext4 maps its files' pages from the
            # device instead of copying them into the guest's page cache,
            # and fails the mount (not silently copies) if it cannot.
            # rootwait: the nvdimm bus finds the namespace asynchronously.
            assert layout is not None
            parts += [layout.kernel_param(), f"root={qa.ROOT_PMEM_DEVICE}", "ro",
                      "rootfstype=ext4", "rootflags=dax", "rootwait", "init=/init"]
        elif self.image is not None:
            # The image is the only virtio-blk disk, so it is vda whatever
            # else the VM has; the kernel mounts it read-only itself.
            parts += [f"root={qa.ROOT_IMAGE_DEVICE}", "ro", "rootfstype=ext4", "init=/init"]
        parts.append(self.kernel_params)
        return qa.join_cmdline(parts)

    def devices(self) -> tuple[Device, ...]:
        """The VM's devices, in the order QEMU gets them."""
        devices: list[Device] = [Console(self.console_limit), EntropySource(),
                                 AgentChannel(self.vsock_cid)]
        if self.shared_dir is not None:
            devices.append(SharedDirectory(self.shared_dir, kind=self.shared_fs))
        devices.extend(self.network)
        if self.memory_path is None:
            # Not with RAM in a file: QEMU 7.2 discards a reported page by
            # punching a hole in the file even when it is mapped private, so
            # a clone's guest would zero pages of the template every other
            # clone reads (tests/functional/test_templates.py shows it).
            devices.append(FreePageReporting())
        return tuple(devices)

    def _check_dax_root(self) -> None:
        assert self.image is not None
        problem = dax_root_problem(self.image, self.kernel)
        if problem is not None:
            raise HypervisorError(problem[0], hint=problem[1])

    def check(self) -> None:
        """Fail early, with the fix, on anything QEMU would fail on later."""
        check_qemu(self.qemu_path)
        root = "guest root image" if self.image is not None else "guest initrd"
        for what, path in (("guest kernel", self.kernel), (root, self.guest_root)):
            if not path.is_file():
                raise HypervisorError(
                    f"{what} not found at {path}", hint="run `pykata assets build`"
                )
        if self.root_pmem:
            self._check_dax_root()
        if self.shared_dir is not None and not self.shared_dir.is_dir():
            raise HypervisorError(f"shared directory {self.shared_dir} does not exist")
        if self.uses_virtio_fs:
            if self.memory_path is not None:
                # virtiofsd maps the guest's RAM shared; a template's clone
                # maps it private, and QEMU 7.2 cannot save a vhost-user-fs
                # device at all (see factory.template).
                raise HypervisorError("a VM whose RAM is a template's file cannot use virtio-fs")
            self.virtiofsd_config().check()


def dax_root_problem(image: Path, kernel: Path) -> tuple[str, str] | None:
    """Why `image` cannot be booted as a DAX device with `kernel`, and the
    fix; None when it can."""
    fallback = "or set [hypervisor.qemu] disable_image_nvdimm = true (a virtio-blk disk)"
    size = image.stat().st_size
    if size == 0 or size % qa.PMEM_ALIGN:
        return (f"guest root image {image} is {size} bytes, not a multiple of "
                f"{qa.PMEM_ALIGN >> 20} MiB, so it cannot be a DAX device",
                f"run `pykata assets build` (it pads the image it builds), {fallback}")
    missing = kernel_config.missing_for_dax_root(kernel)
    if missing is None:
        # Booted anyway, a kernel without pmem would wait for /dev/pmem0
        # until the agent's dial timeout.
        return (f"guest kernel {kernel} has no {kernel_config.CONFIG_NAME} beside it, so "
                "pykata cannot tell it can map the root image (DAX)",
                f"use the kernel `pykata assets build` makes, {fallback}")
    if missing:
        return (f"guest kernel {kernel} lacks {', '.join(missing)} (its config beside it), "
                "so it cannot boot from the root image as a DAX device",
                f"use the kernel `pykata assets build` makes, {fallback}")
    if not kernel_config.built_with_patch(kernel, kernel_config.DAX_ROOT_PATCH):
        return (f"guest kernel {kernel} was not built with pykata's patch "
                f"{kernel_config.DAX_ROOT_PATCH} (its {kernel_config.MANIFEST_NAME} "
                "beside it), without which a microvm guest never finds the root image",
                f"run `pykata assets build`, {fallback}")
    return None


@dataclass
class Handover:
    """A running QEMU's descriptors, as one process hands the VM to another
    (the VM cache to a pod's owner). QMP stays behind: the new owner stops
    the VM with signals."""

    pid: int
    pidfd: int
    agent: int
    console: int
    output: int  # QEMU's stdout and stderr
    token: int = -1  # the vsock token's port, kept open with the VM

    def fds(self) -> list[int]:
        return [fd for fd in (self.pidfd, self.agent, self.console, self.output, self.token)
                if fd >= 0]


class _HandedProcess:
    """A QEMU this process did not start, watched and signalled through its
    pidfd (what asyncio's Process is for a child)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._exited = asyncio.Event()
        self._watching = False

    @property
    def returncode(self) -> int | None:
        if (not self._exited.is_set() and self._pidfd >= 0
                and select.select([self._pidfd], [], [], 0)[0]):
            self._exited.set()
        # Not this process's child: its exit status is its parent's to know.
        return 0 if self._exited.is_set() else None

    async def wait(self) -> int:
        if self.returncode is None and not self._watching and self._pidfd >= 0:
            # One reader for every waiter, removed by `close`.
            asyncio.get_running_loop().add_reader(self._pidfd, self._exited.set)
            self._watching = True
        await self._exited.wait()
        return 0

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, signum)

    def close(self) -> None:
        if self._pidfd >= 0:
            if self._watching:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self._exited.set()


class QemuVM:
    """One running QEMU process and the channels pykata holds to it."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self._proc: asyncio.subprocess.Process | _HandedProcess | None = None
        self._qmp: QmpConnection | None = None
        self.agent_socket: socket.socket | None = None
        self._logs: list[CappedLog] = []
        # The host ends of the console and of QEMU's output pipe (their copies
        # are read by the log copiers).
        self._console: socket.socket | None = None
        self._output = -1
        # What reads those copies; a StreamWriter closes its transport when
        # it is collected, so it is kept here too.
        self._readers: list[asyncio.BaseTransport | asyncio.StreamWriter] = []
        self._token_socket: socket.socket | None = None
        self._virtiofsd: vfs.Virtiofsd | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def virtiofsd_pid(self) -> int | None:
        """The VM's virtiofsd (None on 9p): it lives and ends with QEMU."""
        return self._virtiofsd.pid if self._virtiofsd is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _options(self, qmp_fd: int, agent_fd: int, console_fd: int, virtiofs_fd: int = -1
                 ) -> list[qa.QemuOption]:
        c = self.config
        layout = c.pmem_layout()
        pmem = qa.RootPmem(c.image, layout.image_mib << 20) if layout and c.image else None
        memory = qa.Memory(layout.ram_mib if layout else c.memory_mib, c.memory_path,
                           c.memory_shared, memfd=c.uses_virtio_fs and c.memory_path is None,
                           numa_after_mib=layout.image_mib if layout else 0)
        opts: list[qa.QemuOption] = [
            qa.Basics(name=f"pykata-{c.name}"),
            qa.Machine(c.machine_type, c.accel, ram_backend=memory.backend,
                       tcg_code_cache=c.tcg_code_cache_mib, numa_ram=memory.numa),
            qa.Cpu(c.vcpus, c.accel),
            memory,
            qa.KernelBoot(c.kernel, c.initrd, c.kernel_cmdline()),
            qa.QmpFd(qmp_fd),
        ]
        if pmem is not None:
            opts.append(pmem)
        elif c.image is not None:
            opts.append(qa.RootImage(c.image, c.machine_type))
        if c.uses_virtio_fs:
            opts.append(qa.ModernVirtioMmio(c.machine_type))
        nics = 0
        for device in c.devices():
            if isinstance(device, NetworkInterface):
                opts.append(qa.TapNic(nics, device.tap_fd, device.mac, device.mtu,
                                      c.machine_type, device.vhost_fd))
                nics += 1
                continue
            opts += _render(device, c.machine_type, agent_fd=agent_fd, console_fd=console_fd,
                            virtiofs_fd=virtiofs_fd)
        if c.incoming:
            opts.append(qa.Incoming())
        return opts

    def command(self, qmp_fd: int, agent_fd: int, console_fd: int, virtiofs_fd: int = -1
                ) -> list[str]:
        return [self.config.qemu_path,
                *qa.render(self._options(qmp_fd, agent_fd, console_fd, virtiofs_fd))]

    async def start(self) -> None:
        """Launch virtiofsd (with virtio-fs), then QEMU, and connect QMP; on
        any failure nothing is left running."""
        self.config.check()
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        virtiofs: socket.socket | None = None
        qmp_host, qmp_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        agent_host, agent_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        console_host, console_vm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        output_r, output_w = os.pipe2(os.O_CLOEXEC)
        self._console, self._output = console_host, output_r
        try:
            if self.config.uses_virtio_fs:
                # Before QEMU: its vhost-user device talks to virtiofsd at once.
                self._virtiofsd = vfs.Virtiofsd(
                    self.config.virtiofsd_config(), self.config.run_dir,
                    die_with_parent=not self.config.outlives_owner)
                virtiofs = await self._virtiofsd.start()
            await self._launch(qmp_vm.fileno(), agent_vm.fileno(), console_vm.fileno(),
                               output_w, virtiofs.fileno() if virtiofs is not None else -1)
            await self._capture_output(append=False)
        except BaseException:
            qmp_host.close()
            agent_host.close()
            await self.kill()
            raise
        finally:
            qmp_vm.close()
            agent_vm.close()
            console_vm.close()
            os.close(output_w)
            if virtiofs is not None:
                virtiofs.close()
        if self.config.vsock_cid:
            # The token waits in the socket until the agent reads its port;
            # the socket stays open with the VM (QEMU's end would see a hangup).
            agent_host.sendall(self.config.vsock_token)
            self._token_socket = agent_host
        else:
            self.agent_socket = agent_host
        try:
            self._qmp = await QmpConnection.open(qmp_host)
        except BaseException as exc:
            await self.kill()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise HypervisorError(f"QEMU failed to start: {self.failure_report()}") from exc

    async def _launch(self, qmp_fd: int, agent_fd: int, console_fd: int, output_fd: int,
                      virtiofs_fd: int = -1) -> None:
        cmd = self.command(qmp_fd, agent_fd, console_fd, virtiofs_fd)
        log.debug("starting %s", " ".join(cmd))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output_fd,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(qmp_fd, agent_fd, console_fd,
                          *((virtiofs_fd,) if virtiofs_fd >= 0 else ()),
                          *(nic.tap_fd for nic in self.config.network if nic.tap_fd >= 0),
                          *(nic.vhost_fd for nic in self.config.network if nic.vhost_fd >= 0)),
                start_new_session=True,
                preexec_fn=confining_hook(
                    os.getpid(), die_with_parent=not self.config.outlives_owner),
            )
        except OSError as exc:
            raise HypervisorError(
                f"cannot run QEMU at {self.config.qemu_path}: {exc.strerror}"
            ) from exc

    async def _capture_output(self, *, append: bool) -> None:
        """Copy QEMU's output and the guest console into their bounded files,
        each from a copy of our descriptor (ours can be handed over)."""
        assert self._console is not None and self._output >= 0
        loop = asyncio.get_running_loop()
        limit = self.config.console_limit
        output = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(output),
            os.fdopen(os.dup(self._output), "rb", buffering=0))
        self._readers.append(transport)
        console, writer = await asyncio.open_connection(sock=self._console.dup())
        self._readers.append(writer)
        self._logs = [CappedLog(self.config.stderr_log, max(16384, limit // 4), append=append),
                      CappedLog(self.config.console_log, limit, append=append)]
        self._logs[0].start(output)
        self._logs[1].start(console)

    @classmethod
    async def take_over(cls, config: VmConfig, handed: Handover) -> QemuVM:
        """The VM another process started and handed over (`handover`): this
        process owns it from now on, and closes `handed`'s descriptors."""
        vm = cls(config)
        vm._proc = _HandedProcess(handed.pid, handed.pidfd)
        vm.agent_socket = socket.socket(fileno=handed.agent)
        vm._console = socket.socket(fileno=handed.console)
        vm._output = handed.output
        if handed.token >= 0:
            vm._token_socket = socket.socket(fileno=handed.token)
        try:
            await vm._capture_output(append=True)
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def handover(self) -> Handover:
        """Stop reading the VM's output and give up QMP: its descriptors, for
        another process to `take_over` (sent as SCM_RIGHTS, which copies
        them). `forget` closes ours afterwards; until then `kill` still works."""
        if self._proc is None or self._console is None or self.agent_socket is None:
            raise HypervisorError("only a running VM can be handed over")
        if self._virtiofsd is not None:
            # Its virtiofsd is this process's child and dies with it.
            raise HypervisorError("a VM on virtio-fs cannot be handed over")
        await self._stop_copiers(wait=0.0)
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        return Handover(
            pid=self._proc.pid, pidfd=os.pidfd_open(self._proc.pid),
            agent=self.agent_socket.fileno(), console=self._console.fileno(),
            output=self._output,
            token=self._token_socket.fileno() if self._token_socket is not None else -1)

    def forget(self, handed: Handover) -> None:
        """After a handover: close this process's copies, leave QEMU running."""
        os.close(handed.pidfd)
        self._proc = None
        self._close_channels()

    async def save_state(self, state_file: Path, timeout: float = 60.0) -> None:
        """Pause the VM and save its device state (its RAM stays in its
        memory file): the VM can only be stopped afterwards."""
        await self._migration(migration.save_state, state_file, timeout)

    async def restore_state(self, state_file: Path, timeout: float = 60.0) -> None:
        """Resume a VM started with `incoming` from a saved state."""
        await self._migration(migration.restore_state, state_file, timeout)

    async def _migration(self, step: Any, state_file: Path, timeout: float) -> None:
        if self._qmp is None:
            raise HypervisorError("the VM is not running")
        try:
            await step(self._qmp, state_file, timeout)
        except HypervisorError as exc:
            raise HypervisorError(f"{exc.message}\n{self.failure_report()}") from exc
        except (OSError, EOFError) as exc:
            raise HypervisorError(f"QEMU failed: {exc}\n{self.failure_report()}") from exc
        except Exception as exc:  # qemu.qmp's ExecuteError and connection errors
            raise HypervisorError(f"QEMU refused: {exc}\n{self.failure_report()}") from exc

    def failure_report(self, lines: int = 15) -> str:
        report = failure_report(self.config.stderr_log, self.config.console_log, lines)
        said = self._virtiofsd.failure_report() if self._virtiofsd is not None else ""
        return f"{said}\n{report}" if said else report

    def moved_to(self, run_dir: Path) -> None:
        """Its directory was renamed: reports read the logs at the new path
        (QEMU's own open files and the log copiers follow the rename)."""
        self.config = dataclasses.replace(self.config, run_dir=run_dir)

    async def wait(self) -> int:
        """Wait until QEMU exits and what it and the guest wrote last is in
        their logs (for `failure_report`); return its exit status."""
        assert self._proc is not None, "VM not started"
        status = await self._proc.wait()
        for capped in self._logs:
            await capped.wait(2.0)
        return status

    async def stop(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        """Ask QEMU to quit (QMP, or SIGTERM for a VM taken over); kill it if
        it has not exited within `grace` seconds."""
        if self.running and self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.execute("quit"), grace)
        elif self.running and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
        if self.running:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait(), grace)
        await self.kill()

    async def kill(self) -> None:
        """Kill QEMU at once and release every channel; safe to call twice."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
        if isinstance(proc, _HandedProcess):
            proc.close()
        if self._virtiofsd is not None:
            # After QEMU: virtiofsd exits by itself once QEMU's end closes.
            await self._virtiofsd.stop()
        # What QEMU wrote before it died is what an error report shows.
        await self._stop_copiers(wait=2.0)
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None
        self._close_channels()

    async def _stop_copiers(self, wait: float) -> None:
        for capped in self._logs:
            await capped.wait(wait)
            capped.stop()
        self._logs = []
        for transport in self._readers:
            transport.close()
        self._readers = []

    def _close_channels(self) -> None:
        for sock in (self._console, self.agent_socket, self._token_socket):
            if sock is not None:
                sock.close()
        self._console = self.agent_socket = self._token_socket = None
        if self._output >= 0:
            os.close(self._output)
            self._output = -1


def _render(device: Device, machine_type: str, *, agent_fd: int, console_fd: int,
            virtiofs_fd: int = -1) -> list[qa.QemuOption]:
    """QEMU's pieces for one device; descriptors are the ones QEMU inherits."""
    if isinstance(device, Console):
        return [qa.SerialConsoleFd(console_fd)]
    if isinstance(device, EntropySource):
        return [qa.Rng(machine_type)]
    if isinstance(device, FreePageReporting):
        return [qa.FreePageBalloon(machine_type)]
    if isinstance(device, AgentChannel):
        if device.vsock_cid:
            # agent_fd then carries the token port: the agent wants the
            # token first on every vsock connection.
            return [qa.VhostVsock(device.vsock_cid, machine_type),
                    qa.TokenPort(agent_fd, machine_type)]
        return [qa.VirtioSerialAgent(agent_fd, machine_type)]
    if isinstance(device, SharedDirectory):
        if device.kind == "virtio-fs":
            return [qa.VirtioFs(virtiofs_fd, machine_type, device.tag)]
        return [qa.Share9p(device.path, machine_type, device.tag)]
    raise HypervisorError(f"QEMU cannot provide a {type(device).__name__}")


def check_qemu(path: str) -> None:
    if not os.access(path, os.X_OK):
        raise HypervisorError(
            f"QEMU not found at {path}",
            hint="install qemu-system-x86 or set [hypervisor.qemu] path",
        )


def failure_report(stderr_log: Path, console_log: Path, lines: int = 15) -> str:
    """QEMU's stderr and the end of the guest console, for error messages
    (guest text escaped: a hostile guest writes its console). Read from the
    files, so a process other than QEMU's parent can report too."""
    parts = []
    stderr = _tail(stderr_log, lines)
    if stderr:
        parts.append(f"QEMU said:\n{stderr}")
    console = _tail(console_log, lines)
    panic = _panic_line(console_log)
    if panic and panic not in console:
        parts.append(f"the guest kernel panicked: {panic}")
    parts.append(
        f"last console lines ({console_log}):\n{console}"
        if console else "the guest console is empty"
    )
    return "\n".join(parts)


def _panic_line(path: Path) -> str:
    for line in read_tail(path, 65536).decode("utf-8", "replace").splitlines():
        if "Kernel panic" in line:
            return guest_text(line.strip(), 512)
    return ""


def _tail(path: Path, lines: int) -> str:
    data = read_tail(path, 16384).decode("utf-8", "replace")
    return guest_text("\n".join(data.rstrip().splitlines()[-lines:]))
