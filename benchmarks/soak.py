"""Soak and load: N `ctr run --rm` cycles, then M pods at once, counting what stays.

Against a private containerd (like the functional tests). A long-lived pod
runs throughout and gets an exec every cycle, so its shim sees the load too.
Before the cycles (after a warm-up) and after them the script counts pykata's
processes (QEMU and shims), the mounts under pykata's and containerd's state,
the files and directories there, containerd's and the long-lived shim's open
file descriptors, and that shim's memory. Then M pods start at once, each
answers an exec, and all are deleted; the same counts must be back.

    .venv/bin/python -m benchmarks.soak [--cycles 200] [--concurrent 20]

Exits 1 if a cycle or a pod failed, or if a count grew.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_containerd import memory_kib
from pykata import config
from pykata.runtime.keys import pod_key
from pykata.runtime.paths import run_root
from tests.functional.containerd_peer import IMAGE, NAMESPACE, PrivateContainerd

RUNTIME = "io.containerd.pykata.v2"
KEEPER = "soak-keeper"
COUNTED = ("pykata processes", "mounts", "state entries", "containerd fds", "keeper shim fds")


@dataclass
class Snapshot:
    counts: dict[str, int]
    shim_rss_kib: int
    shim_pss_kib: int


@dataclass
class Report:
    cycles: int
    concurrent: int
    failures: list[str] = field(default_factory=list)
    before: Snapshot | None = None
    after_cycles: Snapshot | None = None
    after_load: Snapshot | None = None
    cycle_seconds: float = 0.0
    load_seconds: float = 0.0

    @property
    def grew(self) -> list[str]:
        out = []
        for later in (self.after_cycles, self.after_load):
            if self.before is None or later is None:
                continue
            for name in COUNTED:
                if later.counts[name] > self.before.counts[name]:
                    out.append(f"{name}: {self.before.counts[name]} -> {later.counts[name]}")
        return out


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def pykata_processes(root: Path) -> list[int]:
    """QEMU, virtiofsd and shim processes of this run root (a QEMU on
    virtio-fs names no path of it: its environment does)."""
    found = []
    mine = f"PYKATA_RUN_ROOT={root}".encode()
    for pid in _pids():
        cmdline = _read(f"/proc/{pid}/cmdline")
        qemu = b"qemu-system" in cmdline and (
            f"path={root}/".encode() in cmdline
            or mine in _read(f"/proc/{pid}/environ").split(b"\0"))
        virtiofsd = b"virtiofsd" in cmdline and f"\0source={root}/".encode() in cmdline
        shim = b"pykata.shim" in cmdline and f"\0{root}/shims/".encode() in cmdline
        if qemu or virtiofsd or shim:
            found.append(pid)
    return found


def _count_entries(*tops: Path) -> int:
    total = 0
    for top in tops:
        for _, dirs, files in os.walk(top):
            total += len(dirs) + len(files)
    return total


def _mounts(*prefixes: Path) -> int:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return sum(1 for p in points if any(p.startswith(str(prefix)) for prefix in prefixes))


def _fds(pid: int | None) -> int:
    if pid is None:
        return -1
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _memory(pid: int | None) -> tuple[int, int]:
    try:
        return memory_kib(pid) if pid is not None else (0, 0)
    except (OSError, KeyError):
        return 0, 0


def keeper_shim(peer: PrivateContainerd) -> int | None:
    key = pod_key(str(peer.socket), NAMESPACE, KEEPER)
    for pid in pykata_processes(run_root()):
        if f"{key}.sock".encode() in _read(f"/proc/{pid}/cmdline"):
            return pid
    return None


def snapshot(peer: PrivateContainerd) -> Snapshot:
    root = run_root()
    shim = keeper_shim(peer)
    rss, pss = _memory(shim)
    assert peer.proc is not None
    return Snapshot(
        counts={
            "pykata processes": len(pykata_processes(root)),
            "mounts": _mounts(root, peer.base),
            "state entries": _count_entries(root, peer.state),
            "containerd fds": _fds(peer.proc.pid),
            "keeper shim fds": _fds(shim),
        },
        shim_rss_kib=rss, shim_pss_kib=pss,
    )


def _settle(baseline: int, timeout: float = 30) -> None:
    """Wait until no more pykata processes run than `baseline` (shims exit a
    moment after their last task is deleted)."""
    deadline = time.monotonic() + timeout
    while len(pykata_processes(run_root())) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)


def _cycle(peer: PrivateContainerd, i: int, report: Report) -> None:
    result = peer.ctr("run", "--rm", "--runtime", RUNTIME, IMAGE, "soak-cycle", "true")
    if result.returncode != 0:
        report.failures.append(f"cycle {i}: {result.err.strip()}")
    exec_result = peer.ctr("task", "exec", "--exec-id", f"soak{i}", KEEPER, "true")
    if exec_result.returncode != 0:
        report.failures.append(f"exec {i} in the long-lived pod: {exec_result.err.strip()}")


def _one_pod(peer: PrivateContainerd, i: int) -> str | None:
    cid = f"soak-load-{i}"
    started = peer.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, cid, "sleep", "600")
    if started.returncode != 0:
        return f"pod {i}: start: {started.err.strip()}"
    try:
        answered = peer.ctr("task", "exec", "--exec-id", "hello", cid, "echo", "up")
        if answered.returncode != 0 or answered.out != "up\n":
            return f"pod {i}: exec: {answered.err.strip()}"
    finally:
        peer.remove(cid)
    return None


def soak(peer: PrivateContainerd, cycles: int, concurrent: int, warmup: int = 2,
         log: object = print) -> Report:
    report = Report(cycles, concurrent)
    # Whatever else runs under this run root (a test session's shared VM)
    # stays out of the counts' changes; the keeper adds its QEMU and shim.
    baseline = len(pykata_processes(run_root())) + 2
    started = peer.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, KEEPER, "sleep", "86400")
    if started.returncode != 0:
        report.failures.append(f"long-lived pod: {started.err.strip()}")
        return report
    try:
        for i in range(warmup):
            _cycle(peer, 100000 + i, report)
        _settle(baseline)
        report.before = snapshot(peer)
        t0 = time.monotonic()
        for i in range(cycles):
            _cycle(peer, i, report)
            if (i + 1) % 10 == 0:
                log(f"cycle {i + 1}/{cycles}")  # type: ignore[operator]
        report.cycle_seconds = time.monotonic() - t0
        _settle(baseline)
        report.after_cycles = snapshot(peer)
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, concurrent)) as pool:
            for problem in pool.map(lambda i: _one_pod(peer, i), range(concurrent)):
                if problem:
                    report.failures.append(problem)
        report.load_seconds = time.monotonic() - t0
        _settle(baseline)
        report.after_load = snapshot(peer)
    finally:
        peer.remove(KEEPER)
    return report


def render(report: Report) -> str:
    lines = [f"{report.cycles} cycles of `ctr run --rm ... true` in "
             f"{report.cycle_seconds:.0f} s, then {report.concurrent} pods at once in "
             f"{report.load_seconds:.0f} s", ""]
    if report.before and report.after_cycles and report.after_load:
        lines.append(f"  {'':<22}{'before':>10}{'after cycles':>14}{'after load':>12}")
        for name in COUNTED:
            lines.append(f"  {name:<22}{report.before.counts[name]:>10}"
                         f"{report.after_cycles.counts[name]:>14}"
                         f"{report.after_load.counts[name]:>12}")
        for label, attr in (("keeper shim RSS (KiB)", "shim_rss_kib"),
                            ("keeper shim PSS (KiB)", "shim_pss_kib")):
            lines.append(f"  {label:<22}{getattr(report.before, attr):>10}"
                         f"{getattr(report.after_cycles, attr):>14}"
                         f"{getattr(report.after_load, attr):>12}")
    lines.append("")
    lines += [f"  FAILED: {f}" for f in report.failures]
    lines += [f"  GREW: {g}" for g in report.grew]
    if not report.failures and not report.grew:
        lines.append("  every cycle and pod succeeded; zero growth")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pykata-soak-") as tmp:
        cfg_file = Path(tmp) / "pykata.toml"
        # Many VMs booting at once on a small host take long under TCG.
        cfg_file.write_text(config.DEFAULT_CONFIG.read_text().replace(
            "dial_timeout = 60", "dial_timeout = 600"))
        peer = PrivateContainerd(Path(tmp), cfg_file)
        peer.start()
        try:
            peer.import_busybox()
            report = soak(peer, args.cycles, args.concurrent,
                          log=lambda line: print(line, file=sys.stderr))
        finally:
            peer.stop()
    print(render(report))
    return 1 if report.failures or report.grew else 0


if __name__ == "__main__":
    sys.exit(main())
