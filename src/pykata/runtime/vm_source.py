"""Where a sandbox's VM comes from: the seam between the pod core and the
VM factory.

A sandbox asks its `VmSource` twice: `take` (a VM that is already running,
with its directory: the VM cache hands one over) and, when there is none,
`boot` (a VM started for this sandbox's configuration, which the sandbox
prepared the directory, share and network for). The core knows only cold
boots (`ColdBoot`); the factory (`pykata.factory.sources`) supplies VMs
restored from templates and VMs from the cache, each falling back to the
next. Every source returns a VM whose agent answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pykata import tracing
from pykata.errors import AgentError, HypervisorError
from pykata.host import vsock
from pykata.hypervisor.base import Hypervisor
from pykata.hypervisor.qemu import QemuVM, VmConfig
from pykata.runtime.agent_client import AgentClient
from pykata.runtime.boot_phase import stalled_phase
from pykata.ttrpc import Code

log = logging.getLogger(__name__)


@dataclass
class BootedVm:
    """A running VM and its agent connection, as a source hands it over."""

    vm: Hypervisor
    agent: AgentClient
    config: VmConfig
    # How it started: "cold" (booted), "template" (restored), "cache" (kept warm).
    boot: str
    vm_launch: float = 0.0
    agent_ready: float = 0.0
    # A VM the cache handed over comes with its directory (share, logs),
    # which the sandbox moves to its own path; None for a VM booted for it.
    run_dir: Path | None = None
    # QEMU's -name is pykata-<vm_name>.
    vm_name: str = ""


@dataclass(frozen=True)
class VmWant:
    """What a sandbox asks a source to `take`: a VM of this shape, for this pod."""

    sandbox_id: str
    key: str
    config: VmConfig
    # A VM kept warm has no NICs: a pod with interfaces needs its own boot.
    needs_network: bool


class VmSource(Protocol):
    async def take(self, want: VmWant) -> BootedVm | None:
        """A running VM for `want`, or None (with a log line saying why)."""

    async def boot(self, config: VmConfig, name: str) -> BootedVm:
        """Start a VM of `config` for sandbox `name`; on failure nothing of
        it is left running."""


class ColdBoot:
    """Boot every VM: QEMU starts the kernel, the agent comes up."""

    def __init__(self, dial_timeout: float) -> None:
        self.dial_timeout = dial_timeout

    async def take(self, want: VmWant) -> BootedVm | None:
        return None

    async def boot(self, config: VmConfig, name: str) -> BootedVm:
        t0 = time.monotonic()
        vm = QemuVM(config)
        with tracing.span("vm.launch"):
            await vm.start()
        t1 = time.monotonic()
        try:
            with tracing.span("agent.ready"):
                agent = await connect_agent(vm, config, self.dial_timeout, name)
            if tracing.enabled():
                await _set_clock(agent)
        except BaseException:
            await vm.kill()
            raise
        return BootedVm(vm, agent, config, "cold", t1 - t0, time.monotonic() - t1,
                        vm_name=config.name)


async def _set_clock(agent: AgentClient) -> None:
    """A cold guest's wall clock comes from its RTC, read in whole seconds
    while it boots (0.4-1.5 s behind the host's, measured under TCG): set it
    from the host's, so that its spans' times are the host's. A guest that
    refuses keeps its clock: its spans are then moved into the host's."""
    try:
        await agent.set_guest_time(time.time_ns())
    except AgentError as exc:
        log.warning("the guest's clock was not set for tracing: %s", exc)
    except BaseException:
        await agent.close()
        raise


async def connect_agent(vm: Hypervisor, config: VmConfig, timeout: float, name: str,
                        first_stream_id: int = 1) -> AgentClient:
    """Dial the agent until it answers Health.Check, QEMU exits, or
    `timeout` passes; the error says which, with QEMU's and the console's
    last words."""
    check = asyncio.ensure_future(_dial(vm, config, timeout, first_stream_id))
    exited = asyncio.ensure_future(vm.wait())
    try:
        done, _ = await asyncio.wait({check, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if exited not in done and check.exception() is not None:
        # A VM that dies closes the agent socket first; give QEMU's exit
        # a moment to be seen, so the error says what really happened.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(vm.wait()), 2)
        if not vm.running:
            done = {exited}
    if exited in done:
        check.cancel()
        with contextlib.suppress(BaseException):
            agent = await check
            await agent.close()
        raise HypervisorError(f"the VM of sandbox {name} stopped while booting, during "
                              f"{stalled_phase(config.console_log).name}:\n"
                              f"{vm.failure_report()}")
    try:
        return check.result()
    except (AgentError, TimeoutError) as exc:
        if isinstance(exc, AgentError) and exc.code != Code.DEADLINE_EXCEEDED:
            raise AgentError(f"the agent of sandbox {name} failed to answer: {exc}\n"
                             f"{vm.failure_report()}") from exc
        phase = stalled_phase(config.console_log)
        raise AgentError(
            f"the agent of sandbox {name} did not answer within {timeout:g} s "
            f"(dial_timeout), {phase}; the VM was stopped.\n{vm.failure_report(10)}",
            hint="raise [agent] dial_timeout if the host is slow; if the console stops "
                 "early, check the kernel_params in the configuration") from exc
    except Exception as exc:
        raise AgentError(f"the agent of sandbox {name} failed to answer: {exc}\n"
                         f"{vm.failure_report()}") from exc


async def _dial(vm: Hypervisor, config: VmConfig, timeout: float,
                first_stream_id: int) -> AgentClient:
    """Connect to the agent (vsock) or take the channel QEMU holds, then
    Health.Check until it answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if config.vsock_cid:
        sock = await vsock.connect(config.vsock_cid, timeout)
        # The agent serves only a connection that opens with the token.
        await loop.sock_sendall(sock, config.vsock_token)
    else:
        if vm.agent_socket is None:
            raise HypervisorError("the VM has no agent channel")
        sock = vm.agent_socket
    agent = await AgentClient.over_socket(sock, first_stream_id=first_stream_id)
    try:
        await agent.check(max(0.001, deadline - loop.time()))
    except BaseException:
        await agent.close()
        raise
    return agent
