"""Benchmark: what networking costs a pykata pod.

1. Start: `pykata run -- true` with and without `--netns` (a test-made pod
   namespace with one veth), alternated in one run: the difference is what
   scanning the namespace, the tap and redirects, and the guest's addresses,
   routes and neighbours add to a start.
2. Traffic (with --cri): two pods on one CNI bridge of a private containerd
   in a test-made namespace, through CRI, for runc and for pykata: TCP
   throughput (busybox `nc` pushing N MiB from one pod to the other, timed
   in the sender) and round-trip time (busybox `ping`), with the ratios.

    .venv/bin/python -m benchmarks.bench_network [--runs 10] [--cri] [--no-start]
        [--shared-fs virtio-fs|virtio-9p]   (as root)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from tests.functional.netns_tools import pod_and_peer


def _run(*extra: str) -> float:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pykata.cli.main", "run", *extra, "--", "true"],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"pykata run {' '.join(extra)} failed: {proc.stderr.decode()}")
    return elapsed


def bench_start(runs: int) -> None:
    plain: list[float] = []
    networked: list[float] = []
    with pod_and_peer("bench") as netns:
        _run()  # warm the page cache for both
        for _ in range(runs):
            plain.append(_run())
            networked.append(_run("--netns", str(netns.path)))
    a, b = statistics.median(plain), statistics.median(networked)
    print(f"start, median of {runs} (alternated):")
    print(f"  pykata run -- true                    {a:7.3f} s")
    print(f"  pykata run --netns POD -- true        {b:7.3f} s")
    print(f"  networking adds                       {b - a:+7.3f} s ({(b - a) / a:+.0%})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cri", action="store_true", help="also pod-to-pod traffic via CRI")
    parser.add_argument("--shared-fs", default="", choices=["", "virtio-fs", "virtio-9p"],
                        help="the pykata pods' shared_fs (default: the packaged configuration's)")
    parser.add_argument("--no-start", action="store_true", help="skip the start times")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark makes network namespaces")
    if not args.no_start:
        bench_start(args.runs)
    if args.cri:
        from benchmarks.bench_pod_traffic import bench_traffic

        bench_traffic(args.runs, args.shared_fs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
