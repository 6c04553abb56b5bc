"""The guest's figures (GetMetrics), checked before they reach the host's metrics.

The guest may be hostile, and what it sends here becomes Prometheus series
on the host: names become label values, so a guest could flood the monitor
with series (a million "interfaces") or smuggle text into a scrape. So
memory fields and CPU modes come from fixed lists, the number of interfaces
and disks is bounded, a device name that is not plainly one drops its entry
(never escaped into a series), a repeated name keeps its first entry, and every number is clamped
to what a real guest could report.
"""

from __future__ import annotations

import math
import re

from pykata.agent.guest_metrics import CPU_MODES, MEMORY_FIELDS
from pykata.protocols import agent_pb2

MAX_INTERFACES = 32
MAX_DISKS = 32
# Counters and sizes above this are not a real guest's (2^53: exact as a float).
MAX_COUNT = 1 << 53
MAX_LOAD = 1e6
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")  # IFNAMSIZ
_DISK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def _count(value: int) -> int:
    return min(max(int(value), 0), MAX_COUNT)


def _seconds(value: float, limit: float = float(MAX_COUNT)) -> float:
    return min(max(float(value), 0.0), limit) if math.isfinite(value) else 0.0


def checked(reply: agent_pb2.GuestMetrics) -> agent_pb2.GuestMetrics:
    """`reply` with every name checked and every number clamped (see above)."""
    out = agent_pb2.GuestMetrics(
        load1=_seconds(reply.load1, MAX_LOAD), load5=_seconds(reply.load5, MAX_LOAD),
        load15=_seconds(reply.load15, MAX_LOAD),
        agent_cpu_seconds=_seconds(reply.agent_cpu_seconds),
        agent_resident_bytes=_count(reply.agent_resident_bytes),
        agent_virtual_bytes=_count(reply.agent_virtual_bytes),
        agent_open_fds=_count(reply.agent_open_fds),
        agent_threads=_count(reply.agent_threads))
    for name, value in reply.memory_bytes.items():
        if name in MEMORY_FIELDS:
            out.memory_bytes[name] = _count(value)
    for mode, seconds in reply.cpu_seconds.items():
        if mode in CPU_MODES:
            out.cpu_seconds[mode] = _seconds(seconds)
    seen: set[str] = set()
    for iface in reply.interfaces[:MAX_INTERFACES]:
        if _IFNAME.fullmatch(iface.name) and iface.name not in seen:
            seen.add(iface.name)
            out.interfaces.append(agent_pb2.GuestInterface(
                name=iface.name, rx_bytes=_count(iface.rx_bytes),
                rx_packets=_count(iface.rx_packets), rx_errors=_count(iface.rx_errors),
                tx_bytes=_count(iface.tx_bytes), tx_packets=_count(iface.tx_packets),
                tx_errors=_count(iface.tx_errors)))
    seen.clear()
    for disk in reply.disks[:MAX_DISKS]:
        if _DISK.fullmatch(disk.name) and disk.name not in seen:
            seen.add(disk.name)
            out.disks.append(agent_pb2.GuestDisk(
                name=disk.name, reads_completed=_count(disk.reads_completed),
                read_bytes=_count(disk.read_bytes),
                writes_completed=_count(disk.writes_completed),
                written_bytes=_count(disk.written_bytes)))
    return out
