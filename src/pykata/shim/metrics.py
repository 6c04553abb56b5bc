"""A task's metrics for containerd: the agent's cgroup figures as cgroups v2 Metrics.

The guest runs cgroup v2, so pykata reports `io.containerd.cgroups.v2.Metrics`;
the agent sends Kata's CgroupStats shape (cpu in nanoseconds, memory entries,
and the raw memory.stat keys), which maps onto it field for field.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from pykata.protocols import agent_pb2, cgroups_v2_pb2
from pykata.shim.events import pack


def to_v2_metrics(stats: agent_pb2.StatsContainerResponse) -> cgroups_v2_pb2.Metrics:
    cg = stats.cgroup_stats
    metrics = cgroups_v2_pb2.Metrics()
    metrics.pids.current = cg.pids_stats.current
    metrics.pids.limit = cg.pids_stats.limit
    usage = cg.cpu_stats.cpu_usage
    metrics.cpu.usage_usec = usage.total_usage // 1000
    metrics.cpu.user_usec = usage.usage_in_usermode // 1000
    metrics.cpu.system_usec = usage.usage_in_kernelmode // 1000
    throttling = cg.cpu_stats.throttling_data
    metrics.cpu.nr_periods = throttling.periods
    metrics.cpu.nr_throttled = throttling.throttled_periods
    metrics.cpu.throttled_usec = throttling.throttled_time // 1000
    memory = metrics.memory
    fields = {f.name for f in memory.DESCRIPTOR.fields}
    for key, value in cg.memory_stats.stats.items():
        if key in fields and key not in ("usage", "usage_limit", "swap_usage", "swap_limit"):
            setattr(memory, key, value)
    memory.usage = cg.memory_stats.usage.usage
    memory.usage_limit = cg.memory_stats.usage.limit
    memory.swap_usage = cg.memory_stats.swap_usage.usage
    memory.swap_limit = cg.memory_stats.swap_usage.limit
    metrics.memory_events.max = cg.memory_stats.usage.failcnt
    for net in stats.network_stats:
        metrics.network.add(
            name=net.name, rx_bytes=net.rx_bytes, rx_packets=net.rx_packets,
            rx_errors=net.rx_errors, rx_dropped=net.rx_dropped, tx_bytes=net.tx_bytes,
            tx_packets=net.tx_packets, tx_errors=net.tx_errors, tx_dropped=net.tx_dropped,
        )
    return metrics


def pack_metrics(metrics: cgroups_v2_pb2.Metrics) -> any_pb2.Any:
    return pack(metrics)
