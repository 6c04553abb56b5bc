"""One container in a fresh sandbox, start to finish: what `pykata run` does.

The phases are timed separately (VM boot to agent ready, container create and
start, teardown) because the benchmark reports each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pykata.config import Config
from pykata.errors import AgentError, PykataError
from pykata.runtime.container import Container, spec_readonly_root
from pykata.runtime.lifecycle import OUTPUT_DRAIN_SECONDS, VM_DIED_STATUS
from pykata.runtime.mount_points import spec_mount_points
from pykata.runtime.mounts import Mount
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from pykata.runtime.stdio import Sink, Source, StdioRelay
from pykata.runtime.volumes import Volume

log = logging.getLogger(__name__)



@dataclass
class OneShotIO:
    stdout: Sink | None
    stderr: Sink | None
    stdin: Source | None
    # Called with the container once it runs (terminal resize, signal relays).
    on_running: Callable[[Container], Awaitable[None]] | None = None


@dataclass
class OneShotResult:
    exit_code: int
    phases: dict[str, float] = field(default_factory=dict)


def new_id(prefix: str = "run") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def run_container(
    config: Config,
    spec: dict[str, Any],
    rootfs: Callable[[Container], Sequence[Mount]],
    io: OneShotIO,
    options: SandboxOptions | None = None,
    sandbox_id: str | None = None,
    volumes: Sequence[tuple[int, Volume]] | None = None,
    profile_boot: bool = False,
) -> OneShotResult:
    """Boot a sandbox, run `spec` in it, stream its stdio, tear everything down.
    With `profile_boot`, the phases include the guest's boot steps (guest_*).

    `rootfs` is called with the container to get the mounts of its rootfs (it
    may use the container's scratch directory, e.g. for an overlay). `volumes`
    is the plan of the spec's bind mounts, when the caller made one.
    """
    sandbox = Sandbox(sandbox_id or new_id(), config, options or SandboxOptions())
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    await sandbox.start()
    phases["vm_launch"] = sandbox.times.vm_launch
    phases["vm_boot_to_agent"] = sandbox.times.agent_ready
    phases["sandbox_create"] = sandbox.times.sandbox_create
    if profile_boot and sandbox.agent is not None:
        # The guest's own steps, on its clock: 0 is its kernel's start.
        for step, seconds in (await sandbox.agent.boot_profile()).items():
            phases[f"guest_{step}"] = seconds
    container = Container(sandbox, sandbox.id)
    relay: StdioRelay | None = None
    try:
        t1 = time.monotonic()
        container.share_rootfs(rootfs(container), readonly=spec_readonly_root(spec),
                              mount_points=spec_mount_points(spec))
        try:
            await container.create(spec, volumes=volumes)
            assert sandbox.agent is not None
            relay = StdioRelay(sandbox.agent, container.id, container.id)
            terminal = bool(spec.get("process", {}).get("terminal"))
            relay.start(io.stdout, io.stderr, io.stdin, terminal=terminal)
            await container.start()
        except AgentError as exc:
            raise await sandbox.explain(exc) from exc
        phases["container_create_start"] = time.monotonic() - t1
        if io.on_running is not None:
            await io.on_running(container)
        code = await _wait_or_vm_exit(sandbox, container)
        await relay.drain(OUTPUT_DRAIN_SECONDS)
        if sandbox.share.scratch_full():
            log.warning(
                "the container's writable layer reached its limit of %d MiB: its writes "
                "failed with 'No space left on device' (raise [runtime] scratch_size in %s)",
                config.runtime.scratch_size, config.source)
    finally:
        t2 = time.monotonic()
        if relay is not None:
            await relay.close()
        with contextlib.suppress(PykataError):
            await container.delete()
        await sandbox.stop()
        phases["teardown"] = time.monotonic() - t2
    phases["total_in_process"] = time.monotonic() - t0
    return OneShotResult(code, phases)


async def _wait_or_vm_exit(sandbox: Sandbox, container: Container) -> int:
    """The container's exit code; 128+SIGKILL if its VM died under it."""
    assert sandbox.vm is not None
    wait = asyncio.ensure_future(container.wait())
    vm_exit = asyncio.ensure_future(sandbox.vm.wait())
    try:
        done, _ = await asyncio.wait({wait, vm_exit}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        vm_exit.cancel()
    if wait in done:
        return wait.result()
    wait.cancel()
    log.error("the VM of %s stopped before its container exited:\n%s",
              sandbox.id, sandbox.vm.failure_report())
    return VM_DIED_STATUS
