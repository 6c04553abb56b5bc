"""A sandbox: one VM, its agent connection, its shared directory, its containers.

Lifecycle: `Sandbox.start()` (directories → share → VM → agent →
CreateSandbox) and `Sandbox.stop()` (DestroySandbox → VM quits → mounts and
directories removed). A start that fails part-way undoes what it did: no QEMU,
mount or directory of the sandbox is left behind. A sandbox removes only the
state it created: a start refused because the key is in use leaves the other
sandbox's state alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pykata.channels import TOKEN_SIZE
from pykata.config import Config
from pykata.errors import AgentError, HypervisorError, NetworkError, PykataError
from pykata.hypervisor.base import Hypervisor, NetworkInterface
from pykata.hypervisor.host import probe_vsock, resolve_accel
from pykata.hypervisor.qemu import QemuVM, VmConfig
from pykata.network import tcfilter
from pykata.protocols import agent_pb2
from pykata.runtime import mirrors, vsock
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.mounts import remove_unmounted
from pykata.runtime.paths import SandboxPaths, check_id, private_dir, rename_noreplace
from pykata.runtime.resources import SharedFilesystem
from pykata.runtime.share import SandboxShare
from pykata.runtime.state import (
    SandboxState,
    process_alive,
    process_start_time,
    read_state,
    write_state,
)
from pykata.ttrpc import Code

if TYPE_CHECKING:
    from pykata.factory.template import Template

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@dataclass
class PhaseTimes:
    """Seconds spent in each start phase (the benchmark reports them)."""

    vm_launch: float = 0.0
    agent_ready: float = 0.0
    sandbox_create: float = 0.0


class Sandbox:
    def __init__(self, sandbox_id: str, config: Config, options: SandboxOptions,
                 key: str | None = None, *, front_end: str = "run") -> None:
        """`key` names the sandbox's state on the host (unique per pod: see
        `paths`); it defaults to the id, which the guest sees. `front_end`
        ("run", "shim", "oci") is recorded in the saved state."""
        self.id = sandbox_id
        self.front_end = front_end
        self.monitor_socket = ""
        self._created = time.time()
        self.config = config
        self.options = options
        self.paths = SandboxPaths.for_key(key or sandbox_id)
        self.share = SandboxShare(self.paths, config.runtime.scratch_size)
        self.shared_fs = SharedFilesystem(self.share)
        self.vm: Hypervisor | None = None
        self._vm_config_used: VmConfig | None = None
        self.agent: AgentClient | None = None
        self.times = PhaseTimes()
        self._stopped = False
        self._owns_state = False
        self._endpoints: list[tcfilter.Endpoint] = []
        # The namespace's identity, once checked; whether this sandbox's
        # taps and redirects exist (the state records them only then).
        self._netns_id: tcfilter.NetnsId | None = None
        self._mirroring = False
        # How the VM started: "cold" (booted) or "template" (restored), and
        # whether it was kept warm by the VM cache before this pod took it.
        self.boot = ""
        self.from_cache = False
        self._create_in_guest = True
        self._vm_name = self.paths.key
        # The namespace mirrored into the VM: options.netns, unless the
        # configuration's internetworking_model is "none".
        self._netns = (options.netns if config.runtime.internetworking_model == "tcfilter"
                       else "")

    @property
    def console_log(self) -> Path:
        return self.paths.run_dir / "console.log"

    def vm_config(self) -> VmConfig:
        """The VM this sandbox would boot, from its configuration and options."""
        q = self.config.qemu
        kernel, initrd = _guest_assets(q.kernel, q.initrd)
        accel = resolve_accel(q.accel)
        use_vsock = probe_vsock().value == "vsock"
        return VmConfig(
            name=self.paths.key,
            run_dir=self.paths.run_dir,
            qemu_path=q.path,
            kernel=kernel,
            initrd=initrd,
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
        )

    async def start(self, *, create: bool = True) -> None:
        """Boot the VM and bring its agent up; undo everything if any step fails.
        With `create` false the guest gets no CreateSandbox: a VM kept warm
        for a pod not known yet (`adopt`)."""
        self._create_in_guest = create
        if self._netns:
            # Refused before anything is made: a namespace another VM
            # mirrors, or one the VM cannot mirror. Netlink work runs on
            # threads that enter the namespace.
            self._netns_id = tcfilter.netns_identity(Path(self._netns))
            self._refuse_if_mirrored()
            self._endpoints = await asyncio.to_thread(tcfilter.scan, Path(self._netns))
        vm_config = self.vm_config()
        self._make_dirs()
        try:
            self.shared_fs.prepare()
            if self._endpoints:
                await _to_the_end(asyncio.to_thread(self._mirror))
                if not self.config.qemu.disable_vhost_net:
                    tcfilter.open_vhost(self._endpoints)
                vm_config = dataclasses.replace(vm_config, network=tuple(
                    NetworkInterface(e.tap_fd, e.mac, e.mtu, e.vhost_fd)
                    for e in self._endpoints))
            await self._boot(vm_config, await self._template_for(vm_config))
        except BaseException:
            await self._teardown()
            raise
        finally:
            # QEMU holds its own copies now: a tap lives exactly as long as it.
            tcfilter.close_taps(self._endpoints)
        self._write_state()

    def _refuse_if_mirrored(self) -> None:
        """Refuse this sandbox's namespace if a live sandbox mirrors it (a
        dead one's leftover redirects are refused by tcfilter, which names
        `pykata cleanup`)."""
        assert self._netns_id is not None
        others = (s for s in mirrors.sandbox_states(self.paths.sandboxes)
                  if s.key != self.paths.key)
        for holder in mirrors.holders(self._netns_id, others):
            if not owner_gone(holder):
                raise NetworkError(
                    f"network namespace {self._netns} is already mirrored into the VM of "
                    f"sandbox {holder.id} ({holder.front_end}, owner pid {holder.owner_pid}, "
                    f"as {holder.netns}): a VM's network cannot be joined by another VM",
                    hint="give this pod a network namespace of its own; containers that "
                         f"must share that network belong in the pod of {holder.id}")

    def _mirror(self) -> None:
        """Attach the taps and redirects and record them in the state, under
        the run root's mirror lock (a blocking call: run on a thread). The
        namespace is checked again under the lock: another start may have
        taken it since the first check."""
        path = Path(self._netns)
        with mirrors.exclusive(self.paths.sandboxes):
            self._refuse_if_mirrored()
            tcfilter.attach(path, self._endpoints, self._netns_id)
            self._mirroring = True
            try:
                self._write_state()
            except BaseException:
                # Unrecorded, they would outlive this sandbox: undo now.
                self._mirroring = False
                tcfilter.detach(path, self._endpoints, self._netns_id)
                raise

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

    async def _template_for(self, vm_config: VmConfig) -> Template | None:
        """The VM template to restore this sandbox's VM from, built now if
        its shape has none; None (and a log line saying why) for a cold boot."""
        if not self.config.factory.enable_template:
            return None
        from pykata.factory import template as templates

        reason = (templates.unclonable(vm_config)
                  or templates.shape_refusal(self.config, vm_config))
        if reason:
            log.info("sandbox %s boots cold: %s", self.id, reason)
            return None
        root = templates.template_root(self.config)
        found, why = templates.find(root, vm_config)
        if found is not None:
            return found
        log.warning("sandbox %s: %s; building one", self.id, why)
        try:
            return await templates.build(root, vm_config, self.config.agent.dial_timeout,
                                         bounds=templates.limits(self.config))
        except (templates.TemplateBusy, templates.TemplateCapReached) as exc:
            log.warning("sandbox %s boots cold: %s", self.id, exc)
        except (PykataError, OSError) as exc:
            log.warning("sandbox %s boots cold: building a VM template failed: %s",
                        self.id, exc)
        return None

    async def _boot(self, vm_config: VmConfig, template: Template | None = None) -> None:
        t0 = time.monotonic()
        if template is not None:
            try:
                t1 = await self._restore(vm_config, template)
            except (HypervisorError, AgentError) as exc:
                log.warning("sandbox %s boots cold: restoring VM template %s failed: %s",
                            self.id, template.key, exc)
                await self._drop_vm()
                template = None
        if template is None:
            self._vm_config_used = vm_config
            self.vm = QemuVM(vm_config)
            await self.vm.start()
            t1 = time.monotonic()
            await self._wait_for_agent()
            self.boot = "cold"
        else:
            self.boot = "template"
        assert self.agent is not None
        t2 = time.monotonic()
        if self._create_in_guest:
            await self._create_sandbox_in_guest()
        self.times = PhaseTimes(t1 - t0, t2 - t1, time.monotonic() - t2)

    async def _create_sandbox_in_guest(self) -> None:
        assert self.agent is not None
        await self.agent.create_sandbox(agent_pb2.CreateSandboxRequest(
            hostname=self.options.hostname, storages=[self.shared_fs.guest_storage()],
            sandbox_id=self.id,
        ))
        if self._endpoints:
            await self._configure_guest_network()

    async def adopt(self, sandbox_id: str, key: str, options: SandboxOptions) -> None:
        """Make this warm sandbox (started with `create` false) the pod
        `sandbox_id`: its directory, with the share QEMU exports, moves to
        the pod's key (a rename: QEMU's export and its open logs follow), and
        the guest gets its CreateSandbox. The VM must have the shape
        `options` asks for: the caller checks it."""
        if self._create_in_guest or self.vm is None:
            raise PykataError("only a warm sandbox can be adopted")
        new_paths = SandboxPaths.for_key(key)
        check_id("sandbox id", sandbox_id)
        try:
            rename_noreplace(self.paths.run_dir, new_paths.run_dir)
        except FileExistsError:
            raise PykataError(
                f"sandbox {sandbox_id} already exists ({new_paths.run_dir})",
                hint="choose another id, or remove the sandbox first") from None
        self.paths = new_paths
        if self.monitor_socket:
            self.monitor_socket = str(new_paths.run_dir / Path(self.monitor_socket).name)
        self.share = SandboxShare(self.paths, self.config.runtime.scratch_size)
        self.shared_fs = SharedFilesystem(self.share)
        if isinstance(self.vm, QemuVM):
            self.vm.config = dataclasses.replace(self.vm.config, run_dir=new_paths.run_dir)
        self.id = sandbox_id
        self.options = options
        self.front_end = "shim"
        self.from_cache = True
        self._create_in_guest = True
        self._write_state()
        t0 = time.monotonic()
        await self._create_sandbox_in_guest()
        self.times = dataclasses.replace(self.times, sandbox_create=time.monotonic() - t0)

    async def _restore(self, vm_config: VmConfig, template: Template) -> float:
        """Start this sandbox's VM from `template`: its memory mapped private,
        its device state loaded, then made its own (clock, randomness).
        Returns when (monotonic) the VM ran again."""
        from pykata.factory.template import in_use

        clone = dataclasses.replace(vm_config, memory_path=template.memory,
                                    memory_shared=False, incoming=True)
        async with in_use(template):
            self._vm_config_used = clone
            self.vm = QemuVM(clone)
            await self.vm.start()
            await self.vm.restore_state(template.state)
        restored = time.monotonic()
        await self._wait_for_agent(first_stream_id=template.next_stream_id)
        assert self.agent is not None
        # Before any container runs: every clone resumed with the same
        # random pool and a clock stopped at the template's save.
        await self.agent.set_guest_time(time.time_ns())
        await self.agent.reseed_random(os.urandom(64))
        return restored

    async def _drop_vm(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.vm is not None:
            await self.vm.kill()
            self.vm = None

    async def _configure_guest_network(self) -> None:
        """Give the guest the pod's addresses, MTU, routes and neighbours, on
        the NICs that carry the pod interfaces' MACs."""
        assert self.agent is not None
        # A clone's links still carry the template's MACs: each is named by
        # its template MAC's link and gets the pod interface's MAC.
        guest_links = (await self.agent.interface_names_by_mac()
                       if self.boot == "template" else {})
        from pykata.factory.template import template_mac

        for i, e in enumerate(self._endpoints):
            await self.agent.update_interface(agent_pb2.Interface(
                device=guest_links.get(template_mac(i), ""),
                name=e.name, hwAddr=e.mac, mtu=e.mtu, IPAddresses=[
                    agent_pb2.IPAddress(family=_family(a.family), address=a.address,
                                        mask=str(a.prefix_len))
                    for a in e.addresses if not a.address.startswith("fe80")]))
        routes, neighbors = await asyncio.to_thread(
            tcfilter.scan_routes_and_neighbors, Path(self._netns), self._endpoints)
        await self.agent.update_routes([agent_pb2.Route(
            dest=r.dest, gateway=r.gateway, device=r.device, source=r.source, scope=r.scope,
            family=_family(r.family)) for r in routes])
        if neighbors:
            await self.agent.add_arp_neighbors([agent_pb2.ARPNeighbor(
                toIPAddress=agent_pb2.IPAddress(family=_family(n.family), address=n.address),
                device=n.device, lladdr=n.mac, state=tcfilter.NUD_PERMANENT)
                for n in neighbors])

    async def _dial(self, timeout: float, first_stream_id: int = 1) -> None:
        """Connect to the agent (vsock) or take the channel QEMU holds, then
        Health.Check until it answers."""
        assert self.vm is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self._vm_config_used is not None
        cid = self._vm_config_used.vsock_cid
        if cid:
            sock = await vsock.connect(cid, timeout)
            # The agent serves only a connection that opens with the token.
            await loop.sock_sendall(sock, self._vm_config_used.vsock_token)
        else:
            assert self.vm.agent_socket is not None
            sock = self.vm.agent_socket
        self.agent = await AgentClient.over_socket(sock, first_stream_id=first_stream_id)
        await self.agent.check(max(0.001, deadline - loop.time()))

    async def _wait_for_agent(self, first_stream_id: int = 1) -> None:
        """Dial the agent until it answers, QEMU exits, or dial_timeout passes."""
        assert self.vm is not None
        timeout = self.config.agent.dial_timeout
        check = asyncio.ensure_future(self._dial(timeout, first_stream_id))
        exited = asyncio.ensure_future(self.vm.wait())
        try:
            done, _ = await asyncio.wait({check, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (check, exited):
                task.cancel()
        if exited not in done and check.exception() is not None:
            # A VM that dies closes the agent socket first; give QEMU's exit
            # a moment to be seen, so the error says what really happened.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.vm.wait()), 2)
            if not self.vm.running:
                done = {exited}
        if exited in done:
            raise HypervisorError(
                f"the VM of sandbox {self.id} stopped while booting:\n"
                f"{self.vm.failure_report()}"
            )
        try:
            check.result()
        except (AgentError, TimeoutError) as exc:
            if isinstance(exc, AgentError) and exc.code != Code.DEADLINE_EXCEEDED:
                raise AgentError(
                    f"the agent of sandbox {self.id} failed to answer: {exc}\n"
                    f"{self.vm.failure_report()}"
                ) from exc
            raise AgentError(
                f"the agent of sandbox {self.id} did not answer within {timeout:g} s "
                f"(dial_timeout); the VM was stopped.\n{self.vm.failure_report()}",
                hint="raise [agent] dial_timeout if the host is slow",
            ) from exc
        except Exception as exc:
            raise AgentError(
                f"the agent of sandbox {self.id} failed to answer: {exc}\n"
                f"{self.vm.failure_report()}"
            ) from exc

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
        return HypervisorError(
            f"the VM of sandbox {self.id} stopped ({exc}):\n{self.vm.failure_report()}")

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
            # Host state goes even if stopping the VM failed: nothing mounted
            # for a sandbox outlives it. The redirects go by the state's record
            # of them, as for a dead owner's (written right after the attach).
            if self._owns_state:
                # Not awaited: a cancelled teardown must still remove it all.
                cleanup_host_state(self.paths)
                self._owns_state = False
            self._endpoints = []
            self._mirroring = False

    def _write_state(self) -> None:
        write_state(self.paths.state_file, SandboxState(
            id=self.id,
            key=self.paths.key,
            front_end=self.front_end,
            owner_pid=os.getpid(),
            owner_start=process_start_time(os.getpid()),
            console_log=str(self.console_log),
            created=self._created,
            qemu_pid=(self.vm.pid or 0) if self.vm is not None else 0,
            monitor_socket=self.monitor_socket,
            # Only once they exist: a start that fails before has none to undo,
            # and must not undo another sandbox's.
            netns=self._netns if self._mirroring else "",
            mirrored={e.name: e.index for e in self._endpoints} if self._mirroring else {},
            netns_dev=self._netns_id.dev if self._mirroring and self._netns_id else 0,
            netns_ino=self._netns_id.ino if self._mirroring and self._netns_id else 0,
            boot=self.boot,
            from_cache=self.from_cache,
            vm_name=self._vm_name,
        ))


def read_sandbox_state(paths: SandboxPaths) -> SandboxState:
    return read_state(paths.state_file, SandboxState)


def owner_gone(state: SandboxState) -> bool:
    """Whether the process that held the sandbox's VM, and the VM, are gone."""
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


async def _to_the_end(work: Awaitable[T]) -> T:
    """`work`'s result, awaited to its end even if this task is cancelled
    meanwhile (the cancellation is raised after it). For a thread that
    changes host state: it cannot be stopped half-way, and the teardown that
    follows a cancellation must find what it made recorded."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if task.exception() is not None:  # undone by the thread itself
            log.info("cancelled while it failed: %s", task.exception())
        raise asyncio.CancelledError
    return task.result()


def _family(family: int) -> agent_pb2.IPFamily.ValueType:
    """The agent API's address family for a socket one."""
    return agent_pb2.v6 if family == socket.AF_INET6 else agent_pb2.v4


def _guest_assets(kernel: str, initrd: str) -> tuple[Path, Path]:
    if kernel and initrd:
        return Path(kernel), Path(initrd)
    from pykata.assets import locate

    paths = locate()
    return Path(kernel) if kernel else paths.kernel, Path(initrd) if initrd else paths.initrd
