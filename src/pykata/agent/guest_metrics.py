"""The guest's figures for GetMetrics: memory, load, CPU time, network and
disk counters from the guest's /proc, and the agent's own process.

Each file is read once per call and a missing or odd one is left out: the
host's monitor asks on every scrape and must get an answer, even from a
kernel built without some of these files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pykata.protocols import agent_pb2

PROC = Path("/proc")
# /proc/stat's "cpu" line, in its order (proc(5)).
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# The /proc/meminfo fields sent (the host takes no others): what a dashboard
# of a pod's memory uses, not the kernel's fifty-odd counters.
MEMORY_FIELDS = frozenset((
    "MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapCached", "Active",
    "Inactive", "Shmem", "Slab", "SReclaimable", "SUnreclaim", "AnonPages", "Mapped",
    "Dirty", "Writeback", "KernelStack", "PageTables", "SwapTotal", "SwapFree",
    "Committed_AS", "Mlocked"))
SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's
# Devices with nothing to say about the workload's I/O.
_SKIPPED_DISKS = ("ram", "loop")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def memory_bytes(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name in MEMORY_FIELDS and fields and fields[0].isdigit():
            scale = 1024 if fields[1:] == ["kB"] else 1
            out[name] = int(fields[0]) * scale
    return out


def cpu_seconds(text: str, ticks: int) -> dict[str, float]:
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return {mode: int(value) / ticks
                    for mode, value in zip(CPU_MODES, fields[1:], strict=False) if value.isdigit()}
    return {}


def interfaces(text: str) -> list[agent_pb2.GuestInterface]:
    out = []
    for line in text.splitlines()[2:]:  # two header lines
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) >= 16 and all(v.isdigit() for v in f):
            out.append(agent_pb2.GuestInterface(
                name=name.strip(), rx_bytes=int(f[0]), rx_packets=int(f[1]),
                rx_errors=int(f[2]), tx_bytes=int(f[8]), tx_packets=int(f[9]),
                tx_errors=int(f[10])))
    return out


def disks(text: str) -> list[agent_pb2.GuestDisk]:
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 10 or f[2].startswith(_SKIPPED_DISKS) or not all(
                v.isdigit() for v in f[3:10]):
            continue
        out.append(agent_pb2.GuestDisk(
            name=f[2], reads_completed=int(f[3]), read_bytes=int(f[5]) * SECTOR_BYTES,
            writes_completed=int(f[7]), written_bytes=int(f[9]) * SECTOR_BYTES))
    return out


def _own_process(reply: agent_pb2.GuestMetrics) -> None:
    stat = _read(PROC / "self" / "stat").rpartition(")")[2].split()
    # Fields after the command (proc(5), from field 3): utime 14, stime 15,
    # num_threads 20, vsize 23, rss 24 (in pages).
    if len(stat) >= 22:
        reply.agent_cpu_seconds = (int(stat[11]) + int(stat[12])) / _ticks()
        reply.agent_threads = int(stat[17])
        reply.agent_virtual_bytes = int(stat[20])
        reply.agent_resident_bytes = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError):
        reply.agent_open_fds = len(os.listdir(PROC / "self" / "fd"))


def guest_metrics() -> agent_pb2.GuestMetrics:
    reply = agent_pb2.GuestMetrics(
        memory_bytes=memory_bytes(_read(PROC / "meminfo")),
        cpu_seconds=cpu_seconds(_read(PROC / "stat"), _ticks()),
        interfaces=interfaces(_read(PROC / "net" / "dev")),
        disks=disks(_read(PROC / "diskstats")))
    load = _read(PROC / "loadavg").split()
    if len(load) >= 3:
        with contextlib.suppress(ValueError):
            reply.load1, reply.load5, reply.load15 = (float(v) for v in load[:3])
    _own_process(reply)
    return reply
