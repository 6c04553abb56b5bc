"""A short soak and load: what the 200-cycle run in the README does, in small."""

from __future__ import annotations

from benchmarks.soak import render, soak
from tests.functional.containerd_peer import PrivateContainerd


def test_cycles_and_concurrent_pods_leave_nothing_growing(containerd: PrivateContainerd) -> None:
    """6 `ctr run --rm` cycles beside a long-lived pod that gets an exec each
    cycle, then 4 pods started at once: every one succeeds, and processes,
    mounts, state entries and file descriptors are back where they were."""
    report = soak(containerd, cycles=6, concurrent=4)
    text = render(report)
    print(text)
    assert not report.failures, text
    assert not report.grew, text
    assert report.before is not None and report.after_load is not None
    # The long-lived shim's memory: a leak of a few MiB in a handful of
    # cycles would show here; allocator noise stays well below.
    assert report.after_load.shim_rss_kib - report.before.shim_rss_kib < 8 * 1024, text
