"""Boot reliability: thirty VMs in a row reach their agent; none hangs.

Under TCG a guest kernel can hang calibrating its clock against the emulated
PIT when the host deschedules the vCPU thread; pykata's machine options and
kernel parameters exist to prevent that, and this test holds them to it. Two
VMs boot at a time, so each competes for the CPU as on a busy host.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import sys

import pytest

from pykata.config import Config
from pykata.host.probes import resolve_accel
from pykata.hypervisor.kernel_config import tick_rate
from pykata.runtime.guest_files import guest_files
from pykata.runtime.sandbox import Sandbox, SandboxOptions
from tests.functional.conftest import save_console

pytestmark = pytest.mark.asyncio(loop_scope="session")

BOOTS = 30
AT_ONCE = 2


async def _boot_once(config: Config, index: int) -> float:
    sandbox = Sandbox(f"boot-{index}", config, SandboxOptions())
    try:
        await sandbox.start()
    except BaseException:
        save_console(sandbox, f"boot-{index}")
        raise
    try:
        assert sandbox.agent is not None
        details = await sandbox.agent.guest_details()
        assert details.agent_details.version
        return sandbox.times.vm_launch + sandbox.times.agent_ready
    finally:
        await sandbox.stop()


async def test_thirty_boots_in_a_row_never_hang(pykata_config: Config) -> None:
    """30 boots, two at a time: every VM's agent answers within 30 s."""
    config = dataclasses.replace(
        pykata_config, agent=dataclasses.replace(pykata_config.agent, dial_timeout=30.0)
    )
    times: list[float] = []
    for first in range(0, BOOTS, AT_ONCE):
        batch = [_boot_once(config, i) for i in range(first, min(first + AT_ONCE, BOOTS))]
        times += await asyncio.gather(*batch)
    assert len(times) == BOOTS
    print(f"\n{BOOTS} boots to agent ready ({AT_ONCE} at once): median "
          f"{statistics.median(times):.2f} s, max {max(times):.2f} s", file=sys.stderr)


async def test_the_guest_takes_the_lapic_period_instead_of_measuring_it(
        pykata_config: Config) -> None:
    """Under TCG pykata's kernel is given its APIC timer period
    (pykata.lapic_period, patch 0001): the console of a verbose-APIC boot
    shows the period taken, and no calibration run."""
    if resolve_accel(pykata_config.qemu.accel).value != "tcg":
        pytest.skip("the period is given under TCG only")
    config = dataclasses.replace(
        pykata_config,
        runtime=dataclasses.replace(pykata_config.runtime, enable_debug=True),
        qemu=dataclasses.replace(pykata_config.qemu, kernel_params="apic=verbose"))
    sandbox = Sandbox("lapic-period", config, SandboxOptions())
    await sandbox.start()
    try:
        console = sandbox.console_log.read_text(errors="replace")
    finally:
        await sandbox.stop()
    hz = tick_rate(guest_files(config.qemu).kernel)
    assert hz, "pykata's built kernel has its config beside it"
    period = 1_000_000_000 // hz
    assert f"pykata.lapic_period={period}" in console
    assert f"lapic timer already calibrated {period}" in console
    assert "calibrating APIC timer" not in console
