"""A sandbox: one VM, its agent connection and its resources (the shared
filesystem, the network), on the host.

`Sandbox.start()`: the network is checked (refused before anything is
made), then the VM comes from the sandbox's `VmSource`: one handed over
running (the VM cache; its directory moves to this sandbox's), or one booted
for it after its directory, share and network were prepared. The guest then
gets its CreateSandbox and its resources set up. `Sandbox.stop()`:
DestroySandbox, the VM quits, mounts and directories go. A start that fails
part-way undoes what it did: no QEMU, mount, tap or directory of the
sandbox is left behind. A sandbox removes only the state it created: a
start refused because the key is in use leaves the other sandbox's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pykata import tracing
from pykata.channels import TOKEN_SIZE
from pykata.config import Config
from pykata.errors import AgentError, HypervisorError, PykataError
from pykata.host import vsock
from pykata.host.cgroups import Limits
from pykata.host.mounts import remove_unmounted
from pykata.host.probes import probe_vsock, resolve_accel
from pykata.hypervisor import virtiofsd
from pykata.hypervisor.base import Hypervisor
from pykata.hypervisor.qemu import Handover, QemuVM, VmConfig
from pykata.network import tcfilter
from pykata.protocols import agent_pb2
from pykata.runtime import fs_choice
from pykata.runtime.agent_client import AgentClient, RpcObserver
from pykata.runtime.fs_choice import SharedFsChoice
from pykata.runtime.guest_files import guest_files
from pykata.runtime.paths import SandboxPaths, check_id, private_dir, rename_noreplace
from pykata.runtime.pod_cgroup import (
    NO_REQUEST,
    CgroupPlacement,
    ContainerRequest,
    PodCgroup,
    pod_limits,
    remove_recorded,
)
from pykata.runtime.pod_metrics import RpcTimes
from pykata.runtime.pod_network import PodNetwork
from pykata.runtime.resources import SandboxResource, SharedFilesystem
from pykata.runtime.share import SandboxShare
from pykata.runtime.staleness import GuestAssets
from pykata.runtime.state import (
    SandboxState,
    process_alive,
    process_start_time,
    read_state,
    write_state,
)
from pykata.runtime.vm_source import BootedVm, ColdBoot, VmSource, VmWant
from pykata.ttrpc import Code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxOptions:
    """Per-sandbox choices; unset fields take the configuration's defaults."""

    vcpus: int | None = None
    memory_mib: int | None = None
    hostname: str = "pykata"
    kernel_params: str = ""
    # A network namespace whose interfaces the VM mirrors (tcfilter); "" for
    # loopback only.
    netns: str = ""
    # The host cgroup the pod's processes run in (None: its owner's), and
    # what the container the pod is made for asks of its limits.
    cgroup: CgroupPlacement | None = None
    cgroup_request: ContainerRequest = NO_REQUEST
    # The debug console (`pykata exec`); None: the configuration's default.
    debug_console: bool | None = None


@dataclass
class PhaseTimes:
    """Seconds spent in each start phase (the benchmark reports them)."""

    vm_launch: float = 0.0
    agent_ready: float = 0.0
    sandbox_create: float = 0.0


@dataclass
class _PodRecord:
    """What the pod on top of this sandbox last said of itself."""

    status: str = ""
    containers: dict[str, dict[str, str]] = field(default_factory=dict)


class Sandbox:
    def __init__(self, sandbox_id: str, config: Config, options: SandboxOptions,
                 key: str | None = None, *, front_end: str = "run",
                 source: VmSource | None = None, share: SandboxShare | None = None) -> None:
        """`key` names the sandbox's state on the host (unique per pod: see
        `paths`); it defaults to the id, which the guest sees. `front_end`
        ("run", "shim", "oci", "factory") is recorded in the saved state."""
        self.id = check_id("sandbox id", sandbox_id)
        self.front_end = front_end
        self.config = config
        self.options = options
        self.source: VmSource = source or ColdBoot(config.agent.dial_timeout)
        self.paths = SandboxPaths.for_key(key or sandbox_id)
        self.share = share or SandboxShare(self.paths, config.runtime.scratch_size)
        self.shared_fs = SharedFilesystem(self.share)
        # The namespace mirrored into the VM: options.netns, unless the
        # configuration's internetworking_model is "none".
        self.network = PodNetwork(
            options.netns if config.runtime.internetworking_model == "tcfilter" else "",
            vhost=not config.qemu.disable_vhost_net, sandboxes=self.paths.sandboxes,
            key=self.paths.key, record=self._write_state,
            live=lambda state: not owner_gone(state))
        self.resources: list[SandboxResource] = [self.shared_fs, self.network]
        self.host_cgroup = PodCgroup(
            options.cgroup, config.runtime,
            options.memory_mib or config.qemu.default_memory, record=self._record_cgroups)
        self.control_socket = ""
        self.vm: Hypervisor | None = None
        self.agent: AgentClient | None = None
        # How the VM started: "cold" (booted), "template" (restored), or
        # "cache" (kept warm by the VM cache before this pod took it).
        self.boot = ""
        self.vm_name = self.paths.key
        self.times = PhaseTimes()
        # What its VM booted (for `runtime.staleness`); None until it has one.
        self.guest_assets: GuestAssets | None = None
        # Every agent call's seconds, by method (`pykata monitor`).
        self.rpc_times = RpcTimes()
        # Told of every call on the agent connection once the VM has one
        # (the metrics above, the pod's event log): `AgentClient.observers`.
        self.agent_observers: list[RpcObserver] = [self.rpc_times.observe]
        self._created = time.time()
        self._pod = _PodRecord()
        self._stopped = False
        self._owns_state = False

    @property
    def debug_console_enabled(self) -> bool:
        if self.options.debug_console is not None:
            return self.options.debug_console
        return self.config.agent.debug_console_enabled

    @property
    def console_log(self) -> Path:
        return self.paths.run_dir / "console.log"

    def shared_fs_choice(self) -> SharedFsChoice:
        """The sandbox's shared filesystem (`runtime.fs_choice`); ConfigError
        when the configuration asks for one that cannot be honoured."""
        choice = fs_choice.require(self.config)
        self.shared_fs.use(choice.kind)
        return choice

    def vm_config(self) -> VmConfig:
        """The VM this sandbox would boot, from its configuration and options."""
        q = self.config.qemu
        fs = self.shared_fs_choice()
        files = guest_files(q)
        accel = resolve_accel(q.accel)
        use_vsock = probe_vsock().value == "vsock"
        return VmConfig(
            name=self.paths.key,
            run_dir=self.paths.run_dir,
            qemu_path=q.path,
            kernel=files.kernel,
            initrd=files.initrd,
            image=files.image,
            image_dax=not q.disable_image_nvdimm,
            machine_type=q.machine_type,
            accel=accel.value,
            vcpus=self.options.vcpus or q.default_vcpus,
            memory_mib=self.options.memory_mib or q.default_memory,
            kernel_params=" ".join(p for p in (q.kernel_params, self.options.kernel_params) if p),
            shared_dir=self.shared_fs.share.paths.shared_dir,
            debug=self.config.runtime.enable_debug,
            vsock_cid=vsock.pick_cid() if use_vsock else 0,
            vsock_token=secrets.token_bytes(TOKEN_SIZE) if use_vsock else b"",
            console_limit=self.config.runtime.console_log_size * 1024,
            shared_fs=fs.kind,
            virtiofsd=fs.daemon,
            virtio_fs_cache=q.virtio_fs_cache,
            tcg_code_cache_mib=q.tcg_code_cache,
        )

    async def start(self, *, create: bool = True) -> None:
        """Get the VM and bring the guest's sandbox up; undo everything if any
        step fails. With `create` false the guest gets no CreateSandbox: a VM
        kept warm for a pod not known yet (the VM cache)."""
        # Before anything is made: a shared_fs setting that cannot be
        # honoured is refused, never replaced by another filesystem.
        self.shared_fs_choice()
        await self.network.check()
        limits = pod_limits([self.options.cgroup_request], self.config.runtime)
        self.host_cgroup.check(limits)
        vm_config = self.vm_config()
        want = VmWant(self.id, self.paths.key, vm_config, needs_network=self.network.wanted)
        handed = await self.source.take(want) if create else None
        try:
            if handed is not None:
                await self._move_in(handed)
                self.host_cgroup.prepare(limits)
                self.host_cgroup.adopt(handed.vm.pid or 0)
            else:
                await self._prepare_and_boot(vm_config, limits)
            if create:
                t0 = time.monotonic()
                try:
                    await self._create_in_guest()
                except AgentError as exc:
                    raise self._stalled(exc) from exc
                self.times.sandbox_create = time.monotonic() - t0
        except BaseException as exc:
            # Read before the teardown removes the cgroup: a VM the host's
            # memory limit killed says only that its console stopped.
            note = self.host_cgroup.death_note()
            await self._teardown()
            if note and isinstance(exc, PykataError):
                raise HypervisorError(f"{exc.message}\n{note}", hint=exc.hint) from exc
            raise
        self._write_state()

    async def _prepare_and_boot(self, vm_config: VmConfig, limits: Limits) -> None:
        self._make_dirs()
        # Before anything the VM is made of: QEMU starts in the pod's cgroup.
        self.host_cgroup.prepare(limits)
        try:
            for resource in self.resources:
                with tracing.span(f"{self._phase(resource)}.prepare"):
                    await resource.prepare()
            with tracing.span("vm.boot"):
                self._take(await self.source.boot(
                    replace(vm_config, network=tuple(self.network.devices())), self.id))
        finally:
            self.network.close_taps()

    def _take(self, booted: BootedVm) -> None:
        self.vm, self.agent, self.boot = booted.vm, booted.agent, booted.boot
        self.vm_name = booted.vm_name or self.vm_name
        self.guest_assets = GuestAssets.of(booted.config.kernel, booted.config.guest_root)
        booted.agent.observers.extend(self.agent_observers)
        self.times.vm_launch, self.times.agent_ready = booted.vm_launch, booted.agent_ready

    async def _move_in(self, handed: BootedVm) -> None:
        """Make a VM handed over running (with its directory: its share,
        logs and QEMU's open files) this sandbox's: its directory moves to
        this sandbox's path (QEMU's export and open logs follow a rename)."""
        assert handed.run_dir is not None
        try:
            private_dir(self.paths.sandboxes)
            rename_noreplace(handed.run_dir, self.paths.run_dir)
        except BaseException as exc:
            await discard_handed(handed)
            if isinstance(exc, FileExistsError):
                raise PykataError(f"sandbox {self.id} already exists ({self.paths.run_dir})",
                                  hint="choose another id, or remove the sandbox first"
                                  ) from None
            raise
        self._owns_state = True
        self._take(handed)
        handed.vm.moved_to(self.paths.run_dir)
        self._write_state()

    async def _create_in_guest(self) -> None:
        assert self.agent is not None
        with tracing.span("sandbox.create"):
            await self.agent.create_sandbox(agent_pb2.CreateSandboxRequest(
                hostname=self.options.hostname, sandbox_id=self.id,
                storages=[s for r in self.resources for s in r.storages()],
                debug_console=self.debug_console_enabled))
        for resource in self.resources:
            with tracing.span(f"{self._phase(resource)}.setup"):
                await resource.setup_guest(self.agent, self.boot)

    def _phase(self, resource: SandboxResource) -> str:
        """A resource's name in traces."""
        return "share" if resource is self.shared_fs else "network"

    def _make_dirs(self) -> None:
        private_dir(self.paths.root)
        private_dir(self.paths.sandboxes)
        try:
            self.paths.run_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise PykataError(
                f"sandbox {self.id} already exists ({self.paths.run_dir})",
                hint="choose another id, or remove the sandbox first",
            ) from None
        self._owns_state = True
        # Written before anything can be left behind, so `pykata cleanup` can
        # tell an abandoned sandbox (owner dead) from one still starting.
        self._write_state()

    def _stalled(self, exc: AgentError) -> AgentError:
        """A guest that stopped answering while its sandbox was set up: the
        error names the phase and shows the console's last lines."""
        if exc.code != Code.DEADLINE_EXCEEDED or self.vm is None:
            return exc
        return AgentError(f"sandbox {self.id} stalled in sandbox create (the guest's "
                          f"CreateSandbox and network setup): {exc.message}\n"
                          f"{self.vm.failure_report(10)}", hint=exc.hint, code=exc.code)

    async def explain(self, exc: PykataError) -> PykataError:
        """`exc`, or, when the VM has stopped, an error saying so with its
        failure report: a VM that dies shows up first as a lost agent
        connection, which alone tells the user nothing."""
        if self.vm is None:
            return exc
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.vm.wait()), 2)
        if self.vm.running:
            return exc
        note = self.host_cgroup.death_note()
        return HypervisorError(
            f"the VM of sandbox {self.id} stopped ({exc}):\n{self.vm.failure_report()}"
            + (f"\n{note}" if note else ""))

    async def stop(self) -> None:
        """Destroy the sandbox in the guest, stop the VM, remove host state."""
        if self._stopped:
            return
        if self.agent is not None and self.vm is not None and self.vm.running:
            with contextlib.suppress(PykataError, asyncio.TimeoutError):
                await asyncio.wait_for(self.agent.destroy_sandbox(), 10)
        await self._teardown()

    async def kill(self) -> None:
        """Stop at once, without asking the guest."""
        await self._teardown()

    async def _teardown(self) -> None:
        self._stopped = True
        try:
            if self.agent is not None:
                await self.agent.close()
            if self.vm is not None:
                await self.vm.stop()
        finally:
            for resource in reversed(self.resources):
                resource.release()
            self.host_cgroup.release()
            # Host state goes even if stopping the VM failed: nothing mounted
            # for a sandbox outlives it. The redirects go by the state's record
            # of them, as for a dead owner's.
            if self._owns_state:
                # Not awaited: a cancelled teardown must still remove it all.
                cleanup_host_state(self.paths)
                self._owns_state = False

    async def hand_over(self) -> tuple[Handover, dict[str, object]]:
        """Give this sandbox's running VM (started without CreateSandbox) to
        another process: its descriptors, and what the new owner needs to take
        it in (`runtime.vm_source.BootedVm`): its directory, QEMU's pid and
        name, the agent channel's next stream id. Then `forget` it (sent), or
        `kill` it (not sent: nobody else may hold it)."""
        if not isinstance(self.vm, QemuVM) or self.agent is None or not self.vm.running:
            raise PykataError(f"sandbox {self.id} has no running VM to hand over")
        handover = await self.vm.handover()
        return handover, {"run_dir": str(self.paths.run_dir), "qemu_pid": handover.pid,
                          "vm_name": self.vm_name, "boot": self.boot,
                          "next_stream_id": self.agent.next_stream_id}

    async def forget(self, handover: Handover) -> None:
        """After `hand_over` was sent: this process's copies go, and with them
        everything this sandbox owned (the VM, its directory are another's)."""
        assert isinstance(self.vm, QemuVM)
        # The agent connection first: it is registered with the event loop on
        # the channel's descriptor, which must not be closed under it (the
        # new owner's copy keeps the socket open, and the loop would go on
        # watching a number this process reuses).
        if self.agent is not None:
            await self.agent.close()
        self.vm.forget(handover)
        self.vm = self.agent = None
        self._owns_state = False
        self._stopped = True

    def set_control_socket(self, path: Path) -> None:
        """Where the owner serves the pod's control socket (recorded for
        other pykata commands)."""
        self.control_socket = str(path)
        if self._owns_state:
            self._write_state()

    def record_pod(self, status: str, containers: dict[str, dict[str, str]]) -> None:
        """Save the pod's status and its containers' along with the sandbox."""
        self._pod = _PodRecord(status, containers)
        if self._owns_state and not self._stopped:
            self._write_state()

    def _write_state(self) -> None:
        booted = self.guest_assets or GuestAssets("", "")
        write_state(self.paths.state_file, SandboxState(
            id=self.id,
            key=self.paths.key,
            front_end=self.front_end,
            owner_pid=os.getpid(),
            owner_start=process_start_time(os.getpid()),
            console_log=str(self.console_log),
            created=self._created,
            qemu_pid=(self.vm.pid or 0) if self.vm is not None else 0,
            virtiofsd_pid=getattr(self.vm, "virtiofsd_pid", None) or 0,
            control_socket=self.control_socket,
            # Only once they exist: a start that fails before has none to undo,
            # and must not undo another sandbox's.
            netns=self.network.netns if self.network.mirroring else "",
            mirrored=self.network.mirrored,
            netns_dev=(self.network.identity.dev
                       if self.network.mirroring and self.network.identity else 0),
            netns_ino=(self.network.identity.ino
                       if self.network.mirroring and self.network.identity else 0),
            boot=self.boot,
            vm_name=self.vm_name,
            status=self._pod.status,
            containers=self._pod.containers,
            cgroups=self.host_cgroup.created,
            guest_kernel=booted.kernel, guest_initrd=booted.initrd,
            guest_kernel_stamp=booted.kernel_stamp, guest_initrd_stamp=booted.initrd_stamp,
        ))

    def _record_cgroups(self) -> None:
        if self._owns_state and not self._stopped:
            self._write_state()


def read_sandbox_state(paths: SandboxPaths) -> SandboxState:
    return read_state(paths.state_file, SandboxState)


def owner_gone(state: SandboxState) -> bool:
    """Whether the process that held the sandbox's VM, and the VM, are gone.
    A virtiofsd still serving it (it exits with QEMU and its owner, so only
    by some fault) does not keep the sandbox: cleanup ends it by its record."""
    return (not process_alive(state.owner_pid, state.owner_start)
            and not qemu_running(state))



def qemu_running(state: SandboxState) -> bool:
    """Whether `state.qemu_pid` is still this sandbox's QEMU (by its -name)."""
    if state.qemu_pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{state.qemu_pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"pykata-{state.vm_name or state.key}\0".encode() in cmdline


def cleanup_host_state(paths: SandboxPaths) -> None:
    """Unmount everything under the sandbox's directory and remove it.

    Safe to repeat, and usable on a sandbox whose owner died (`shim delete`):
    the tc redirects it recorded on its pod's interfaces go too (its taps
    went with its QEMU), in the namespace it recorded and no other.
    """
    with contextlib.suppress(PykataError):
        state = read_sandbox_state(paths)
        # Before the unmounts: a dead owner's virtiofsd (it dies with its
        # QEMU and its owner; this is for one that did not) must stop serving.
        virtiofsd.kill_recorded(state.virtiofsd_pid, paths.shared_dir)
        if state.cgroups:
            remove_recorded(state.cgroups)
        if state.netns and state.mirrored:
            recorded = (tcfilter.NetnsId(state.netns_dev, state.netns_ino)
                        if state.netns_ino else None)
            try:
                tcfilter.detach_recorded(Path(state.netns), state.mirrored, recorded)
            except PykataError as exc:
                log.error("sandbox %s: %s", paths.key, exc)
    try:
        remove_unmounted(paths.run_dir, lazy=True)
    except PykataError as exc:
        log.error("sandbox %s: %s", paths.key, exc)


async def discard_handed(handed: BootedVm) -> None:
    """End a VM handed over that no sandbox took: the VM, then its directory."""
    with contextlib.suppress(Exception):
        await handed.agent.close()
    await handed.vm.kill()
    if handed.run_dir is not None:
        cleanup_host_state(SandboxPaths(handed.run_dir.name, handed.run_dir.parent.parent))


