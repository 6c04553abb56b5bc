"""A container process's I/O priority and scheduling (runtime-spec 1.1.0's
`process.ioPriority` and `process.scheduler`), which crun 1.8.1 ignores.

The agent applies them itself, in one of two ways that both take effect
before the process runs any of its own code:

* the container's init: to the process `crun create` made, which waits to be
  started and has run nothing of the container's yet (`apply`);
* an exec'd process: crun exec runs it at once, so the attributes are set on
  the agent's own thread for the moment of spawning `crun exec`, which
  inherits them and hands them down through its fork and exec
  (`inherited_by_spawns`). Attributes that do not survive a fork (a deadline
  policy, SCHED_FLAG_RESET_ON_FORK) are refused for exec'd processes.

Values are checked here again: the host checked them, but what the agent
applies it checks itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pykata.spec_fields import (
    IOPRIO_CLASSES,
    REALTIME_POLICIES,
    SCHED_FLAGS,
    SCHED_POLICIES,
)
from pykata.ttrpc import Code, StatusError

if TYPE_CHECKING:
    import ctypes

# x86_64 system call numbers (the guest is x86_64 only).
_SYS_IOPRIO_SET: Final = 251
_SYS_IOPRIO_GET: Final = 252
_SYS_SCHED_SETATTR: Final = 314
_SYS_SCHED_GETATTR: Final = 315
_IOPRIO_WHO_PROCESS: Final = 1
_IOPRIO_CLASS_SHIFT: Final = 13
_SCHED_FLAG_RESET_ON_FORK: Final = SCHED_FLAGS["SCHED_FLAG_RESET_ON_FORK"]


@dataclass(frozen=True)
class ProcessAttrs:
    """What to set; None leaves that attribute as the process inherits it."""

    ioprio: int | None = None  # ioprio_set's value: class << 13 | level
    sched: tuple[int, int, int, int, int, int, int] | None = None  # policy .. period

    def __bool__(self) -> bool:
        return self.ioprio is not None or self.sched is not None


#: Leaves every attribute as inherited.
INHERITED: Final = ProcessAttrs()


def take(process: dict[str, Any], *, exec_process: bool) -> ProcessAttrs:
    """Remove ioPriority and scheduler from an OCI process (crun is not to see
    what it would ignore) and return them checked; INVALID_ARGUMENT if not."""
    ioprio = process.pop("ioPriority", None)
    scheduler = process.pop("scheduler", None)
    return ProcessAttrs(
        ioprio=None if ioprio is None else _ioprio(ioprio),
        sched=None if scheduler is None else _sched(scheduler, exec_process),
    )


def _invalid(text: str) -> StatusError:
    return StatusError(Code.INVALID_ARGUMENT, f"process.{text}")


def _ioprio(value: Any) -> int:
    if not isinstance(value, dict) or value.get("class") not in IOPRIO_CLASSES:
        raise _invalid(f"ioPriority: class must be one of {', '.join(IOPRIO_CLASSES)}")
    level = value.get("priority", 0)
    if not isinstance(level, int) or not 0 <= level <= 7:
        raise _invalid("ioPriority.priority: a level from 0 to 7")
    return IOPRIO_CLASSES[value["class"]] << _IOPRIO_CLASS_SHIFT | level


def _sched(value: Any, exec_process: bool) -> tuple[int, int, int, int, int, int, int]:
    if not isinstance(value, dict) or value.get("policy") not in SCHED_POLICIES:
        raise _invalid(f"scheduler.policy: one of {', '.join(SCHED_POLICIES)}")
    policy = value["policy"]
    nice, priority = value.get("nice", 0), value.get("priority", 0)
    times = [value.get(key, 0) for key in ("runtime", "deadline", "period")]
    if not all(isinstance(n, int) for n in (nice, priority, *times)) or not -20 <= nice <= 19:
        raise _invalid("scheduler: nice from -20 to 19, integer priority and times")
    if (policy in REALTIME_POLICIES) != (1 <= priority <= 99) or not 0 <= priority <= 99:
        raise _invalid("scheduler.priority: 1 to 99 for SCHED_FIFO and SCHED_RR, else 0")
    flags = 0
    for flag in value.get("flags") or []:
        if flag not in SCHED_FLAGS:
            raise _invalid(f"scheduler.flags: {flag!r} is not one of {', '.join(SCHED_FLAGS)}")
        flags |= SCHED_FLAGS[flag]
    if exec_process and (flags or policy == "SCHED_DEADLINE"):
        raise _invalid("scheduler: an exec'd process takes neither SCHED_DEADLINE nor flags")
    runtime, deadline, period = times
    return (SCHED_POLICIES[policy], flags, nice, priority, runtime, deadline, period)


def apply(pid: int, attrs: ProcessAttrs) -> None:
    """Set `attrs` on the (single-threaded, not yet started) process `pid`."""
    try:
        if attrs.sched is not None:
            _sched_setattr(pid, attrs.sched)
        if attrs.ioprio is not None:
            _syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, pid, attrs.ioprio)
    except OSError as exc:
        raise StatusError(Code.FAILED_PRECONDITION,
                          f"cannot set the process's scheduling or I/O priority: {exc}") from exc


@contextlib.contextmanager
def inherited_by_spawns(attrs: ProcessAttrs) -> Iterator[None]:
    """Within the block, processes this thread spawns start with `attrs`.

    Scheduling and I/O priority are per thread and copied at fork: the
    agent's event-loop thread carries them only while it spawns, and gets
    its own back after (it is root: lowering and raising are allowed)."""
    if not attrs:
        yield
        return
    saved_sched = _sched_getattr(0)
    saved_ioprio = _syscall(_SYS_IOPRIO_GET, _IOPRIO_WHO_PROCESS, 0)
    try:
        apply(0, attrs)
        yield
    finally:
        _sched_setattr(0, saved_sched)
        # A thread that never had an I/O priority reads back class NONE,
        # which takes no level.
        if saved_ioprio >> _IOPRIO_CLASS_SHIFT == 0:
            saved_ioprio = 0
        _syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, 0, saved_ioprio)


# ctypes is imported on first use only: most containers set neither
# attribute, and its import costs the agent's start time under emulation.


@functools.cache
def _libc() -> ctypes.CDLL:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _sched_attr_type() -> type[ctypes.Structure]:
    import ctypes

    class SchedAttr(ctypes.Structure):
        """struct sched_attr, as of its first version (48 bytes)."""

        _fields_ = [
            ("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
            ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
            ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
            ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
        ]

    return SchedAttr


def _syscall(number: int, *args: int | ctypes.Structure) -> int:
    import ctypes

    # syscall(2) is variadic: integers go as full registers, structures by address.
    wide = [ctypes.c_long(a) if isinstance(a, int) else ctypes.byref(a) for a in args]
    result: int = _libc().syscall(ctypes.c_long(number), *wide)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def _sched_setattr(pid: int, sched: tuple[int, ...]) -> None:
    import ctypes

    kind = _sched_attr_type()
    _syscall(_SYS_SCHED_SETATTR, pid, kind(ctypes.sizeof(kind), *sched), 0)


def _sched_getattr(pid: int) -> tuple[int, int, int, int, int, int, int]:
    import ctypes

    attr: Any = _sched_attr_type()()
    _syscall(_SYS_SCHED_GETATTR, pid, attr, ctypes.sizeof(attr), 0)
    # The reset-on-fork flag reads back as set; the rest are request-only.
    return (attr.sched_policy, attr.sched_flags & _SCHED_FLAG_RESET_ON_FORK, attr.sched_nice,
            attr.sched_priority, attr.sched_runtime, attr.sched_deadline, attr.sched_period)
