"""Which phase of a boot stalled, read from what the guest printed.

"The agent did not answer within 60 s" says nothing of where the time went.
The guest's console (kept by the host, `console.log`) shows how far the boot
got: pykata's init prints one line before it starts the agent, and the agent
one line once it serves. The kernel runs `quiet`, so an empty console is a
kernel that never reached init. The console is the guest's: these marks are
only read to word an error, never acted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pykata.hypervisor.capped_log import read_tail

# Printed by the initrd's /init (assets/initrd/init) just before the agent starts.
INIT_MARK = "pykata-init: starting the agent"
# Logged by the agent (agent/main.py) once it serves its channel.
AGENT_MARK = "pykata.agent: serving on"
PANIC_MARK = "Kernel panic"

KERNEL_BOOT = "kernel boot"
AGENT_START = "agent start"
FIRST_CALL = "first agent call"


@dataclass(frozen=True)
class StalledPhase:
    name: str
    why: str

    def __str__(self) -> str:
        return f"stalled in {self.name}: {self.why}"


def stalled_phase(console_log: Path) -> StalledPhase:
    """The phase a boot that never answered stopped in, from the console's
    last 64 KiB (the marks come early; a flood after them cannot hide them
    all, and if it does the phase is only worded less precisely)."""
    text = read_tail(console_log, 65536).decode("utf-8", "replace")
    if AGENT_MARK in text:
        return StalledPhase(FIRST_CALL, "the agent serves its channel but did not answer "
                                        "its first call (Health.Check)")
    if INIT_MARK in text:
        return StalledPhase(AGENT_START, "pykata's init ran, but the agent never started "
                                         "serving")
    if PANIC_MARK in text:
        return StalledPhase(KERNEL_BOOT, "the guest kernel panicked before pykata's init ran")
    return StalledPhase(KERNEL_BOOT, "the guest kernel never started pykata's init "
                                     "(no init line on the console)")
