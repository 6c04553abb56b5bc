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
