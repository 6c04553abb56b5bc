"""The monitor's `prometheus_client` Collector: each collect() is one scrape
of every pod on the node (`scrape`), the host's /proc read for their QEMU and
owner, and the node's own figures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from pykata.metrics.discovery import FoundPod, find_pods
from pykata.metrics.families import PodFigures, pod_families
from pykata.metrics.procfs import ProcessFigures, process_figures
from pykata.metrics.scrape import DEFAULT_POD_TIMEOUT, Scrape, scrape

# How long one scrape's figures answer the requests after it (Prometheus
# asks every 15 s or more; anything faster is someone else asking).
REUSE_SECONDS = 1.0


class PodCollector(Collector):
    """`reuse_seconds`: a scrape's figures answer every request within that
    time of it. A scrape asks every guest, and anyone who can reach the
    listener can ask: one scrape runs at a time, requests meanwhile wait for
    it and share its figures, so requests cost the node one scrape a second
    at most."""

    def __init__(self, root: Path | None = None,
                 pod_timeout: float = DEFAULT_POD_TIMEOUT, *, guest: bool = True,
                 reuse_seconds: float = REUSE_SECONDS) -> None:
        self.root = root
        self.pod_timeout = pod_timeout
        self.guest = guest
        self.reuse_seconds = reuse_seconds
        self._scraping = threading.Lock()
        self._last: tuple[float, list[Metric]] | None = None
        self._failures = 0
        self.scrapes = 0

    def describe(self) -> list[Metric]:
        # Nothing to announce at registration: a scrape happens per request.
        return []

    def collect(self) -> Iterator[Metric]:
        with self._scraping:
            last = self._last
            if last is None or time.monotonic() - last[0] >= self.reuse_seconds:
                figures = list(self._scrape())
                last = (time.monotonic(), figures)  # reused from its end on
                self._last = last
        yield from last[1]

    def _scrape(self) -> Iterator[Metric]:
        """Ask every pod (under `_scraping`: one at a time)."""
        self.scrapes += 1
        started = time.monotonic()
        pods = find_pods(self.root)
        # Each scrape its own event loop: the HTTP server calls collect()
        # from its request threads.
        result, host = asyncio.run(self._gather(pods))
        figures = [PodFigures(answer.metrics, *host[answer.pod.id])
                   for answer in result.answers if answer.metrics.id == answer.pod.id]
        self._failures += len(result.skipped)
        failures = self._failures
        yield from pod_families(figures, guest=self.guest)
        yield GaugeMetricFamily("pykata_running_pods",
                                "Pods on the node whose owner runs (answering or not)",
                                value=len(pods))
        yield CounterMetricFamily("pykata_monitor_scrape_failures",
                                  "Pods skipped by a scrape: no answer in time, or an error",
                                  value=failures)
        yield GaugeMetricFamily("pykata_monitor_scrape_duration_seconds",
                                "Seconds this scrape took to ask every pod",
                                value=time.monotonic() - started)

    async def _gather(self, pods: list[FoundPod]) -> tuple[Scrape, dict[str, _HostFigures]]:
        """The owners' answers and the host's /proc figures of every pod, read
        meanwhile in threads: smaps_rollup walks a process's page tables (about
        15 ms for an idle QEMU), the owners take as long to answer."""
        host = asyncio.gather(*(asyncio.to_thread(_host_figures, pod) for pod in pods))
        asked = scrape(pods, self.pod_timeout, guest=self.guest)
        result, figures = await asyncio.gather(asked, host)
        return result, {pod.id: found for pod, found in zip(pods, figures, strict=True)}


_HostFigures = tuple[ProcessFigures | None, ProcessFigures | None]


def _host_figures(pod: FoundPod) -> _HostFigures:
    """QEMU's and the owner's figures, each only while it is still the pod's."""
    qemu = pod.qemu_pid()
    return (process_figures(qemu) if qemu else None,
            process_figures(pod.state.owner_pid) if pod.owner_alive() else None)
