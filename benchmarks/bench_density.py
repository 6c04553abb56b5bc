"""Benchmark: many idle pods at once through containerd, each answering an exec.

Starts a private containerd 1.6 (like the functional tests) and N idle
busybox pods (`ctr run -d ... sleep`) one after another, restored from a VM
template ([factory] enable_template) unless --cold. Once all run it records
the PSS of everything pykata runs for them (shims, QEMUs, and the pod
monitors pykata ran before the pod core, from
/proc/<pid>/smaps_rollup) and the host CPU they use over an idle minute
(/proc/stat), then execs `echo` in every pod and counts the answers.

With --baseline CHECKOUT (another pykata's checkout with its .venv), that
pykata's pods are measured first, in the same run, then this one's; with
--vs-initrd, this pykata's pods booted from the initrd are (guest_root); with
--vs-disk, its pods with the root image as a virtio-blk disk instead of DAX.

    .venv/bin/python -m benchmarks.bench_density [--pods 100] [--cold] [--baseline DIR]
        [--vs-initrd] [--vs-disk]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.baseline import BASE_RUNTIME, Baseline
from benchmarks.bench_run import with_disk_image
from benchmarks.factory_config import with_factory
from pykata import config
from tests.functional.containerd_peer import IMAGE, PrivateContainerd

RUNTIME = "io.containerd.pykata.v2"
_PYKATA = re.compile(rb"pykata[.](shim|monitor[.]pod)|qemu-system")


def pykata_pss_kib(run_root: str) -> dict[str, int]:
    """PSS (KiB) of every process of this run's pykata, by kind."""
    totals = {"shims": 0, "pod monitors": 0, "QEMUs": 0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        found = _PYKATA.search(cmdline)
        if not found or (b"qemu" not in found.group() and
                         f"PYKATA_RUN_ROOT={run_root}".encode() not in environ):
            continue
        if b"qemu" in found.group() and f"{run_root}/".encode() not in cmdline:
            continue
        pss = next(int(line.split()[1]) for line in rollup.splitlines()
                   if line.startswith("Pss:"))
        kind = ("QEMUs" if b"qemu" in found.group() else
                "shims" if found.group(1) == b"shim" else "pod monitors")
        totals[kind] += pss
    return totals


def cpu_busy(seconds: float) -> float:
    """Share of all host CPUs busy over `seconds` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


@dataclass
class Density:
    name: str
    pods: int
    starts: list[float]
    memory: dict[str, int]
    busy: float
    answered: int
    exec_times: list[float]


def run_pods(peer: PrivateContainerd, name: str, runtime: str, pods: int, run_root: str,
             idle_seconds: float) -> Density:
    """`pods` idle pods of `runtime` up at once; their memory, idle CPU and
    exec answers; then removed."""
    cids: list[str] = []
    starts: list[float] = []
    try:
        for i in range(pods):
            cid = f"dense-{name}-{i}"
            began = time.monotonic()
            result = peer.ctr("run", "-d", "--runtime", runtime, IMAGE, cid,
                              "sleep", "36000", timeout=300)
            if result.returncode != 0:
                print(f"pod {i + 1} failed to start: {result.err.strip()}", file=sys.stderr)
                break
            starts.append(time.monotonic() - began)
            cids.append(cid)
            if (i + 1) % 10 == 0:
                print(f"{name}: {i + 1} pods up (last start {starts[-1]:.2f} s)",
                      file=sys.stderr)
        time.sleep(10)
        memory = pykata_pss_kib(run_root)
        busy = cpu_busy(idle_seconds)
        answered = 0
        exec_times: list[float] = []
        for cid in cids:
            began = time.monotonic()
            result = peer.ctr("task", "exec", "--exec-id", "probe", cid, "echo", "ok",
                              timeout=120)
            exec_times.append(time.monotonic() - began)
            answered += result.returncode == 0 and result.out.strip() == "ok"
    finally:
        for cid in cids:
            peer.remove(cid)
    return Density(name, len(cids), starts, memory, busy, answered, exec_times)


def report(d: Density, wanted: int, mode: str, idle_before: float) -> None:
    total = sum(d.memory.values())
    host_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    print(f"\n{d.name}: {d.pods} of {wanted} idle pods up at once ({mode}), "
          f"{os.cpu_count()} CPUs, {host_gib:.0f} GiB:\n")
    if d.starts:
        print(f"  start (ctr run -d)   median {statistics.median(d.starts):.2f} s, "
              f"first {d.starts[0]:.2f} s, last {d.starts[-1]:.2f} s")
    for kind, kib in d.memory.items():
        print(f"  {kind:<13} PSS {kib / 1024:8.0f} MiB   "
              f"({kib / 1024 / max(1, d.pods):.1f} MiB per pod)")
    print(f"  {'total':<13} PSS {total / 1024:8.0f} MiB   "
          f"({total / 1024 / max(1, d.pods):.1f} MiB per pod)")
    print(f"  host CPU busy while idle: {d.busy * 100:.1f} % of all CPUs "
          f"(before the pods: {idle_before * 100:.1f} %)")
    print(f"  exec answered: {d.answered} of {d.pods} "
          f"(median {statistics.median(d.exec_times or [0]):.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--cold", action="store_true", help="boot every VM cold")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="another pykata's checkout: its pods first, then this one's")
    parser.add_argument("--vs-initrd", action="store_true",
                        help="this pykata booting its guests from the initrd first, then "
                             "from the configured guest root")
    parser.add_argument("--vs-disk", action="store_true",
                        help="this pykata with its root image as a virtio-blk disk "
                             "(disable_image_nvdimm = true) first, then as configured")
    args = parser.parse_args()
    baseline = Baseline(args.baseline) if args.baseline else None
    idle_before = cpu_busy(10)
    results: list[Density] = []
    with tempfile.TemporaryDirectory(prefix="pykata-density-") as tmp:
        if baseline is not None:
            baseline.expose(Path(tmp))
        cfg_file = Path(tmp) / "pykata.toml"
        # A run root of its own: what it counts is this run's pykata only.
        run_root = f"{tmp}/run"
        os.environ["PYKATA_RUN_ROOT"] = run_root
        cfg_file.write_text(config.DEFAULT_CONFIG.read_text())
        peer = PrivateContainerd(Path(tmp), cfg_file)
        peer.start()
        try:
            peer.import_busybox()
            runs = [("baseline", BASE_RUNTIME)] if baseline is not None else []
            if args.vs_initrd:
                runs.append(("pykata-initrd", RUNTIME))
            if args.vs_disk:
                runs.append(("pykata-disk", RUNTIME))
            for name, runtime in [*runs, ("pykata", RUNTIME)]:
                text = config.DEFAULT_CONFIG.read_text()
                if name == "pykata-initrd":
                    text = re.sub(r'(?m)^guest_root = ".*"$', 'guest_root = "initrd"', text)
                if name == "pykata-disk":
                    text = with_disk_image(text)
                if not args.cold:
                    text = with_factory(text, enable_template=True,
                                        template_path=f"{tmp}/templates-{name}")
                cfg_file.write_text(text)
                results.append(run_pods(peer, name, runtime, args.pods, run_root,
                                        args.idle_seconds))
        finally:
            peer.stop()
    mode = "cold boots" if args.cold else "restored from a VM template"
    for result in results:
        report(result, args.pods, mode, idle_before)
    return 0 if all(r.answered == r.pods == args.pods for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
