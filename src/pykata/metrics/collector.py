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

from pykata.metrics.discovery import find_pods
from pykata.metrics.families import PodFigures, pod_families
from pykata.metrics.procfs import process_figures
from pykata.metrics.scrape import DEFAULT_POD_TIMEOUT, Answer, scrape


class PodCollector(Collector):
    def __init__(self, root: Path | None = None,
                 pod_timeout: float = DEFAULT_POD_TIMEOUT) -> None:
        self.root = root
        self.pod_timeout = pod_timeout
        self._lock = threading.Lock()
        self._failures = 0

    def describe(self) -> list[Metric]:
        # Nothing to announce at registration: a scrape happens per request.
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        pods = find_pods(self.root)
        # Each scrape its own event loop: the HTTP server calls collect()
        # from its request threads.
        result = asyncio.run(scrape(pods, self.pod_timeout))
        figures = [_figures(answer) for answer in result.answers
                   if answer.metrics.id == answer.pod.id]
        with self._lock:
            self._failures += len(result.skipped)
            failures = self._failures
        yield from pod_families(figures)
        yield GaugeMetricFamily("pykata_running_pods",
                                "Pods on the node whose owner runs (answering or not)",
                                value=len(pods))
        yield CounterMetricFamily("pykata_monitor_scrape_failures",
                                  "Pods skipped by a scrape: no answer in time, or an error",
                                  value=failures)
        yield GaugeMetricFamily("pykata_monitor_scrape_duration_seconds",
                                "Seconds this scrape took to ask every pod",
                                value=time.monotonic() - started)


def _figures(answer: Answer) -> PodFigures:
    pod = answer.pod
    qemu = pod.qemu_pid()
    return PodFigures(
        metrics=answer.metrics,
        hypervisor=process_figures(qemu) if qemu else None,
        owner=process_figures(pod.state.owner_pid) if pod.owner_alive() else None)
