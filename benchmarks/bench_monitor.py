"""Benchmark: how long `pykata monitor` takes to scrape the node's pods.

Starts idle `pykata run` pods (real owners, real VMs, cold boots, a few at a
time) under a run root of its own, and a `pykata monitor` on a free loopback
port, and a second one with --no-guest. At 1, 10 and 20 pods (--steps) it
times --scrapes GETs, interleaved, of /metrics (every owner asked, the
guests' figures included, QEMU's and the owners' /proc read), of the
--no-guest monitor's /metrics (the same without the agent calls: the host's
share) and of /sandboxes (the state directories only), and prints their
medians and spread side by side, with the pods skipped. Every pod and the monitor are
stopped at the end.

    .venv/bin/python -m benchmarks.bench_monitor [--steps 1,10,20] [--scrapes 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.functional.monitor_tools import Monitor, http_get

_FAILURES = re.compile(r"^pykata_monitor_scrape_failures_total (\S+)$", re.MULTILINE)


def start_pod() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykata.cli.main", "run", "--memory", "256", "--",
         "sh", "-c", "echo up; exec sleep 3600"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)
    assert proc.stdout is not None
    if proc.stdout.readline() != b"up\n":
        proc.kill()
        raise RuntimeError("a pod did not start (see `pykata run` by hand)")
    return proc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(url: str, scrapes: int) -> tuple[list[float], str]:
    seconds, text = [], ""
    for _ in range(scrapes):
        started = time.perf_counter()
        text = http_get(url).decode()
        seconds.append(time.perf_counter() - started)
    return seconds, text


def spread(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return (f"{statistics.median(ms):7.1f} ms (min {ms[0]:6.1f}, p90 {p90:6.1f}, "
            f"max {ms[-1]:6.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,10,20", help="pod counts to measure at")
    parser.add_argument("--scrapes", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=4, help="pods started at once")
    args = parser.parse_args()
    steps = sorted({int(n) for n in args.steps.split(",")})
    root = tempfile.mkdtemp(prefix="pykata-bench-monitor-", dir="/run")
    os.environ["PYKATA_RUN_ROOT"] = root
    pods: list[subprocess.Popen[bytes]] = []
    # Every request a scrape of its own: the cost measured is a scrape's.
    monitor = Monitor(1.0, "--reuse-seconds", "0")
    host_monitor = Monitor(1.0, "--no-guest", "--reuse-seconds", "0")
    rows = []
    try:
        for wanted in steps:
            started = time.monotonic()
            with ThreadPoolExecutor(args.parallel) as pool:
                pods += pool.map(lambda _: start_pod(), range(wanted - len(pods)))
            print(f"{len(pods)} pods running ({time.monotonic() - started:.0f} s to start)",
                  file=sys.stderr)
            http_get(f"{monitor.url}/metrics")  # the first GetMetrics of each new pod
            metrics, host_only, listing = [], [], []
            cpu = cpu_seconds(monitor.proc.pid), cpu_seconds(host_monitor.proc.pid)
            # Interleaved, so the machine's load weighs on each column alike.
            for _ in range(args.scrapes):
                seconds, text = timed(f"{monitor.url}/metrics", 1)
                metrics += seconds
                host_only += timed(f"{host_monitor.url}/metrics", 1)[0]
                listing += timed(f"{monitor.url}/sandboxes", 1)[0]
            # The monitors' own CPU per scrape: what the load cannot inflate
            # (the /sandboxes GETs are in the first's, a few ms each).
            cpu_ms = ((cpu_seconds(monitor.proc.pid) - cpu[0]) * 1000 / args.scrapes,
                      (cpu_seconds(host_monitor.proc.pid) - cpu[1]) * 1000 / args.scrapes)
            answered = len(set(re.findall(r'pykata_guest_up\{sandbox_id="([^"]+)"\} 1', text)))
            rows.append((len(pods), answered, metrics, host_only, listing,
                         float(_FAILURES.findall(text)[0]), cpu_ms, os.getloadavg()[0]))
    finally:
        monitor.stop()
        host_monitor.stop()
        for proc in pods:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in pods:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        subprocess.run([sys.executable, "-m", "pykata.cli.main", "cleanup"],
                       capture_output=True, check=False)
        for sub in ("sandboxes", "shims", ""):
            with contextlib.suppress(OSError):
                os.rmdir(Path(root) / sub)
    print(f"\npykata monitor, {args.scrapes} scrapes each, cold `pykata run` pods "
          f"(TCG: {os.cpu_count()} CPUs)")
    print(f"{'pods':>4} {'answered':>8}  {'GET /metrics':<46} "
          f"{'GET /metrics, --no-guest':<46} {'GET /sandboxes':<46} failures")
    for count, answered, metrics, host_only, listing, failures, _cpu, _load in rows:
        print(f"{count:>4} {answered:>8}  {spread(metrics):<46} {spread(host_only):<46} "
              f"{spread(listing):<46} {failures:.0f}")
    print("\nthe monitor's own CPU per scrape (user+system), and the host's 1-minute load")
    for count, *_rest, cpu_ms, load in rows:
        print(f"{count:>4} pods: {cpu_ms[0]:6.1f} ms with the guests' figures, "
              f"{cpu_ms[1]:6.1f} ms --no-guest; load average {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
