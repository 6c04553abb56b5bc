"""Facts about OCI runtime-spec fields that the host's checks
(pykata.runtime.spec_versions) and the guest's agent both use: the versions,
and the names runtime-spec gives to kernel values, with those values.

The host checks a spec before it is sent; the agent checks again what it
applies itself, against the same tables.
"""

from __future__ import annotations

import re
from typing import Final

#: The newest runtime-spec version whose fields pykata knows (`features`).
MAX_VERSION: Final = "1.3.0"
#: The version the guest's crun is handed: crun 1.8.1 accepts only versions
#: with "1.0" in them, and the spec it gets holds nothing it does not know.
GUEST_VERSION: Final = "1.0.2"

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")

#: ioprio_set(2) classes (include/uapi/linux/ioprio.h).
IOPRIO_CLASSES: Final = {"IOPRIO_CLASS_RT": 1, "IOPRIO_CLASS_BE": 2, "IOPRIO_CLASS_IDLE": 3}
#: sched_setattr(2) policies (include/uapi/linux/sched.h); Linux has no SCHED_ISO.
SCHED_POLICIES: Final = {"SCHED_OTHER": 0, "SCHED_FIFO": 1, "SCHED_RR": 2, "SCHED_BATCH": 3,
                         "SCHED_IDLE": 5, "SCHED_DEADLINE": 6}
REALTIME_POLICIES: Final = frozenset(("SCHED_FIFO", "SCHED_RR"))
#: sched_setattr(2) flags. The utilization clamps are left out: runtime-spec
#: carries no clamp values for them.
SCHED_FLAGS: Final = {"SCHED_FLAG_RESET_ON_FORK": 0x01, "SCHED_FLAG_RECLAIM": 0x02,
                      "SCHED_FLAG_DL_OVERRUN": 0x04, "SCHED_FLAG_KEEP_POLICY": 0x08,
                      "SCHED_FLAG_KEEP_PARAMS": 0x10}
PERSONALITY_DOMAINS: Final = ("LINUX", "LINUX32")
#: The seccomp architectures an x86_64 kernel can be entered with: a rule
#: for any other can never match in pykata's VMs.
GUEST_SECCOMP_ARCHES: Final = frozenset(("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"))

_UNIFIED_KEY = re.compile(r"[a-z][a-z0-9_]*\.[A-Za-z0-9_.]+")


def parse_version(text: str) -> tuple[int, int, int]:
    """A SemVer `ociVersion` as (major, minor, patch); ValueError otherwise."""
    match = _VERSION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a SemVer version such as {MAX_VERSION}")
    return int(match[1]), int(match[2]), int(match[3])


def unified_key_problem(key: str) -> str:
    """Why `key` is no file of a container's own cgroup v2 directory ('' if it is)."""
    if not _UNIFIED_KEY.fullmatch(key):
        return f"{key!r} is not a cgroup interface file name (controller.name, no slash)"
    if key.startswith("cgroup."):
        return f"{key} is one of the cgroup core files, not a resource setting"
    return ""
