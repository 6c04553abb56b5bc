"""The Prometheus families of one scrape, built from the pods' answers and the
host's /proc: pure functions of their inputs (the collector does the I/O).

Every per-pod series carries `sandbox_id`; names carry their unit, as
Prometheus' naming conventions ask. Guest figures arrive checked by the
owner (`runtime.guest_metrics`) and are checked once more here: the monitor
trusts no process but itself with label values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from pykata.metrics.procfs import ProcessFigures
from pykata.protocols import agent_pb2, pod_pb2
from pykata.runtime.guest_metrics import checked

SANDBOX = ["sandbox_id"]


@dataclass
class PodFigures:
    """One pod's answer and the host's view of its two processes."""

    metrics: pod_pb2.PodMetrics
    hypervisor: ProcessFigures | None
    owner: ProcessFigures | None


@dataclass
class _Families:
    """Families made on first use, yielded in the order they were made."""

    made: dict[str, Metric] = field(default_factory=dict)

    def gauge(self, name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
        family = self.made.get(name)
        if family is None:
            family = self.made[name] = GaugeMetricFamily(name, doc, labels=labels)
        assert isinstance(family, GaugeMetricFamily)
        return family

    def counter(self, name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
        family = self.made.get(name)
        if family is None:
            family = self.made[name] = CounterMetricFamily(name, doc, labels=labels)
        assert isinstance(family, CounterMetricFamily)
        return family

    def histogram(self, name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
        family = self.made.get(name)
        if family is None:
            family = self.made[name] = HistogramMetricFamily(name, doc, labels=labels)
        assert isinstance(family, HistogramMetricFamily)
        return family


def _process(out: _Families, prefix: str, what: str, sid: str,
             figures: ProcessFigures) -> None:
    out.counter(f"{prefix}_cpu_seconds", f"CPU seconds (user and system) of {what}",
                SANDBOX).add_metric([sid], figures.cpu_seconds)
    out.gauge(f"{prefix}_resident_memory_bytes", f"Resident memory of {what}",
              SANDBOX).add_metric([sid], figures.resident_bytes)
    out.gauge(f"{prefix}_proportional_memory_bytes",
              f"Proportional set size (shared pages split among their users) of {what}",
              SANDBOX).add_metric([sid], figures.proportional_bytes)
    out.gauge(f"{prefix}_threads", f"Threads of {what}", SANDBOX).add_metric(
        [sid], figures.threads)
    out.gauge(f"{prefix}_open_fds", f"Open file descriptors of {what}", SANDBOX).add_metric(
        [sid], figures.open_fds)
    out.counter(f"{prefix}_io_read_bytes", f"Bytes {what} read from storage",
                SANDBOX).add_metric([sid], figures.read_bytes)
    out.counter(f"{prefix}_io_write_bytes", f"Bytes {what} wrote to storage",
                SANDBOX).add_metric([sid], figures.write_bytes)


def _rpcs(out: _Families, sid: str, metrics: pod_pb2.PodMetrics) -> None:
    bounds = list(metrics.rpc_bounds)
    if not bounds or not math.isinf(bounds[-1]):
        return
    les = ["+Inf" if math.isinf(b) else repr(b) for b in bounds]
    hist = out.histogram("pykata_shim_agent_rpc_duration_seconds",
                         "Seconds of the owner's calls to the agent, by RPC method",
                         [*SANDBOX, "method"])
    errors = out.counter("pykata_shim_agent_rpc_errors",
                         "The owner's calls to the agent that failed, by RPC method",
                         [*SANDBOX, "method"])
    for rpc in metrics.rpcs:
        if len(rpc.buckets) != len(bounds):
            continue
        hist.add_metric([sid, rpc.method], list(zip(les, map(float, rpc.buckets),
                                                    strict=True)), rpc.sum_seconds)
        errors.add_metric([sid, rpc.method], rpc.errors)


def _guest(out: _Families, sid: str, guest: agent_pb2.GuestMetrics) -> None:
    memory = out.gauge("pykata_guest_memory_bytes",
                       "The guest's /proc/meminfo, by field", [*SANDBOX, "item"])
    for item, value in sorted(guest.memory_bytes.items()):
        memory.add_metric([sid, item], value)
    loads: tuple[tuple[str, float], ...] = (("1", guest.load1), ("5", guest.load5),
                                             ("15", guest.load15))
    for window, load in loads:
        out.gauge(f"pykata_guest_load{window}", f"The guest's {window}-minute load average",
                  SANDBOX).add_metric([sid], load)
    cpu = out.counter("pykata_guest_cpu_seconds", "The guest's CPU seconds, by mode",
                      [*SANDBOX, "mode"])
    for mode, seconds in sorted(guest.cpu_seconds.items()):
        cpu.add_metric([sid, mode], seconds)
    iface = [*SANDBOX, "interface"]
    for key, doc in (("rx_bytes", "Bytes the guest received"),
                     ("rx_packets", "Packets the guest received"),
                     ("rx_errors", "Receive errors in the guest"),
                     ("tx_bytes", "Bytes the guest sent"),
                     ("tx_packets", "Packets the guest sent"),
                     ("tx_errors", "Send errors in the guest")):
        direction, _, unit = key.partition("_")
        name = (f"pykata_guest_network_{'receive' if direction == 'rx' else 'transmit'}"
                f"_{unit}")
        family = out.counter(name, f"{doc}, by interface", iface)
        for i in guest.interfaces:
            family.add_metric([sid, i.name], getattr(i, key))
    disk = [*SANDBOX, "device"]
    for key, name, doc in (
            ("reads_completed", "pykata_guest_disk_reads_completed", "Reads completed"),
            ("read_bytes", "pykata_guest_disk_read_bytes", "Bytes read"),
            ("writes_completed", "pykata_guest_disk_writes_completed", "Writes completed"),
            ("written_bytes", "pykata_guest_disk_written_bytes", "Bytes written")):
        family = out.counter(name, f"{doc} by the guest's block devices", disk)
        for d in guest.disks:
            family.add_metric([sid, d.name], getattr(d, key))
    out.counter("pykata_agent_cpu_seconds", "CPU seconds of the guest agent",
                SANDBOX).add_metric([sid], guest.agent_cpu_seconds)
    out.gauge("pykata_agent_resident_memory_bytes", "Resident memory of the guest agent",
              SANDBOX).add_metric([sid], guest.agent_resident_bytes)
    out.gauge("pykata_agent_virtual_memory_bytes", "Virtual memory of the guest agent",
              SANDBOX).add_metric([sid], guest.agent_virtual_bytes)
    out.gauge("pykata_agent_open_fds", "Open file descriptors of the guest agent",
              SANDBOX).add_metric([sid], guest.agent_open_fds)
    out.gauge("pykata_agent_threads", "Threads of the guest agent",
              SANDBOX).add_metric([sid], guest.agent_threads)


def pod_families(pods: Iterable[PodFigures], *, guest: bool = True) -> Iterator[Metric]:
    """The families of `pods`; without `guest` (the guests were not asked)
    no pykata_guest_up either."""
    out = _Families()
    info = out.gauge("pykata_pod_info", "A pod: its front end and VM source (always 1)",
                     [*SANDBOX, "front_end", "source"])
    containers = out.gauge("pykata_container_info",
                           "A container of a pod and its status (always 1)",
                           [*SANDBOX, "container_id", "status"])
    up = out.gauge("pykata_guest_up", "Whether the guest answered for its figures",
                   SANDBOX)
    start = out.gauge("pykata_pod_start_seconds",
                      "Seconds the pod's start spent in each phase, by VM source",
                      [*SANDBOX, "phase", "source"])
    for pod in pods:
        m, sid = pod.metrics, pod.metrics.id
        info.add_metric([sid, m.front_end, m.boot], 1)
        for cid, status in sorted(m.containers.items()):
            containers.add_metric([sid, cid, status], 1)
        for phase, seconds in sorted(m.start_seconds.items()):
            start.add_metric([sid, phase, m.boot], seconds)
        if guest:
            up.add_metric([sid], 1 if m.has_guest else 0)
        if pod.hypervisor is not None:
            _process(out, "pykata_hypervisor", "the pod's QEMU", sid, pod.hypervisor)
        if pod.owner is not None:
            _process(out, "pykata_shim", "the pod's owner (shim, pykata-oci monitor or "
                     "pykata run)", sid, pod.owner)
        _rpcs(out, sid, m)
        if m.has_guest:
            _guest(out, sid, checked(m.guest))
    yield from out.made.values()
