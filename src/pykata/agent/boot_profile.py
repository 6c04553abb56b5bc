"""Where the guest's boot went, for GetBootProfile: the times /init passes in
its environment and the steps the agent marks, all on CLOCK_BOOTTIME (what
/proc/uptime counts: 0 is the guest kernel's start). Imports nothing
beyond the interpreter's own: it runs before the agent's modules load."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

# /init's marks: the first field of /proc/uptime when it got there.
INIT_ENV = {"init_started": "PYKATA_BOOT_INIT", "python_started": "PYKATA_BOOT_PYTHON"}
_marks: dict[str, float] = {}
_waiting: dict[str, list[Callable[[], None]]] = {}


def mark(step: str) -> None:
    """Record `step` once: the first time counts."""
    if step in _marks:
        return
    _marks[step] = time.clock_gettime(time.CLOCK_BOOTTIME)
    for callback in _waiting.pop(step, ()):
        callback()


def when(step: str, callback: Callable[[], None]) -> None:
    """Call `callback` once `step` is marked (at once if it already is)."""
    if step in _marks:
        callback()
    else:
        _waiting.setdefault(step, []).append(callback)


def marks() -> dict[str, float]:
    """Every step recorded so far, /init's included."""
    found = dict(_marks)
    for step, name in INIT_ENV.items():
        try:
            found[step] = float(os.environ.get(name, ""))
        except ValueError:
            continue
    return found
