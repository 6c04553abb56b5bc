"""A container's resource usage, read from its cgroup v2 files in the guest."""

from __future__ import annotations

from pathlib import Path

from pykata.agent.guest_spec import CGROUP_PARENT, CGROUP_ROOT
from pykata.protocols import agent_pb2

_NO_LIMIT = 0  # proto3 cannot say "max"; 0 means unlimited here.


def cgroup_dir(container_id: str) -> Path:
    return CGROUP_ROOT / CGROUP_PARENT.lstrip("/") / container_id


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _int(text: str) -> int:
    text = text.strip()
    if not text or text == "max":
        return _NO_LIMIT
    try:
        return int(text)
    except ValueError:
        return 0


def _flat(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value:
            out[key] = _int(value)
    return out


def container_stats(container_id: str) -> agent_pb2.StatsContainerResponse:
    base = cgroup_dir(container_id)
    cpu = _flat(_read(base / "cpu.stat"))
    mem = _flat(_read(base / "memory.stat"))
    events = _flat(_read(base / "memory.events"))
    stats = agent_pb2.CgroupStats()
    usage = stats.cpu_stats.cpu_usage
    # cgroup v2 reports microseconds; the message carries nanoseconds.
    usage.total_usage = cpu.get("usage_usec", 0) * 1000
    usage.usage_in_usermode = cpu.get("user_usec", 0) * 1000
    usage.usage_in_kernelmode = cpu.get("system_usec", 0) * 1000
    throttle = stats.cpu_stats.throttling_data
    throttle.periods = cpu.get("nr_periods", 0)
    throttle.throttled_periods = cpu.get("nr_throttled", 0)
    throttle.throttled_time = cpu.get("throttled_usec", 0) * 1000
    memory = stats.memory_stats
    memory.cache = mem.get("file", 0)
    memory.usage.usage = _int(_read(base / "memory.current"))
    memory.usage.max_usage = _int(_read(base / "memory.peak"))
    memory.usage.limit = _int(_read(base / "memory.max"))
    memory.usage.failcnt = events.get("max", 0)
    memory.swap_usage.usage = _int(_read(base / "memory.swap.current"))
    memory.swap_usage.limit = _int(_read(base / "memory.swap.max"))
    memory.use_hierarchy = True
    for key, value in mem.items():
        memory.stats[key] = value
    stats.pids_stats.current = _int(_read(base / "pids.current"))
    stats.pids_stats.limit = _int(_read(base / "pids.max"))
    return agent_pb2.StatsContainerResponse(cgroup_stats=stats)


def oom_kills(container_id: str) -> int:
    return _flat(_read(cgroup_dir(container_id) / "memory.events")).get("oom_kill", 0)
