"""Benchmark: `ctr run --rm IMAGE ID true` with pykata beside runc, and the shim's memory.

Starts a private containerd 1.6 (like the functional tests), imports the
busybox test image, then alternates pykata and runc runs so both see the same
machine. Also reports the memory of the shim server, of the pod monitor
holding the VM (RSS and PSS from /proc/<pid>/smaps_rollup) and of its QEMU
for an idle pod.

    .venv/bin/python -m benchmarks.bench_containerd [--runs 10]   (from the repository root)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pykata import config
from pykata.runtime.keys import pod_key
from tests.functional.containerd_peer import IMAGE, NAMESPACE, PrivateContainerd

RUNTIMES = {"pykata": "io.containerd.pykata.v2", "runc": "io.containerd.runc.v2"}


def timed_run(peer: PrivateContainerd, runtime: str, cid: str) -> float:
    start = time.monotonic()
    result = peer.ctr("run", "--rm", "--runtime", runtime, IMAGE, cid, "true")
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"ctr run with {runtime} failed: {result.err}")
    return elapsed


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0])
    return values["Rss"], values["Pss"]


def qemu_parts_kib(pid: int, guest_mib: int) -> dict[str, int]:
    """Where QEMU's RSS goes (KiB), from /proc/<pid>/smaps: the guest's RAM
    (the anonymous mapping of the guest's size), TCG's translated code (an
    executable anonymous mapping), mapped files (QEMU and its libraries), and
    the rest (heap, device state, the kernel and initrd copies QEMU keeps)."""
    parts = {"guest RAM": 0, "TCG code": 0, "files": 0, "heap and other": 0}
    size = rss = 0
    perms = path = ""

    def close() -> None:
        if path.startswith("/"):
            parts["files"] += rss
        elif size >= guest_mib * 1024 and "x" not in perms:
            parts["guest RAM"] += rss
        elif "x" in perms and size >= 64 * 1024:
            parts["TCG code"] += rss
        else:
            parts["heap and other"] += rss

    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            if perms:
                close()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            size, rss, perms = (end - start) // 1024, 0, fields[1]
            path = fields[5] if len(fields) > 5 else ""
        elif fields and fields[0] == "Rss:":
            rss = int(fields[1])
    if perms:
        close()
    return parts


def guest_meminfo(peer: PrivateContainerd, cid: str) -> dict[str, int]:
    """The idle guest's own view (KiB): what it uses, and of that the initrd's
    files (the root is a ramfs: its pages count as Shmem/Unevictable)."""
    out = peer.ctr("task", "exec", "--exec-id", "meminfo", cid, "cat", "/proc/meminfo").out
    info = {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines()
            if line.count(":") == 1 and len(line.split()) >= 2}
    return {"used (MemTotal - MemAvailable)": info["MemTotal"] - info["MemAvailable"],
            "page cache (Cached)": info.get("Cached", 0),
            "ramfs root and tmpfs (Shmem + Unevictable)": info.get("Shmem", 0)
            + info.get("Unevictable", 0)}


@dataclass
class IdlePod:
    processes: dict[str, tuple[int, int]]  # (RSS, PSS) KiB of the shim, monitor, QEMU
    qemu_parts: dict[str, int]
    guest_view: dict[str, int]


def idle_pod_memory(peer: PrivateContainerd) -> IdlePod:
    cid = "bench-idle"
    result = peer.ctr("run", "-d", "--runtime", RUNTIMES["pykata"], IMAGE, cid, "sleep", "600")
    if result.returncode != 0:
        raise SystemExit(f"could not start an idle pod: {result.err}")
    try:
        time.sleep(3)  # let the shim settle after start-up
        key = pod_key(str(peer.socket), NAMESPACE, cid)
        shim = subprocess.run(["pgrep", "-f", f"pykata[.]shim .*{key}"], capture_output=True,
                              text=True).stdout.split()
        monitor = subprocess.run(["pgrep", "-f", f"pykata[.]monitor[.]pod .*--key {key} "],
                                 capture_output=True, text=True).stdout.split()
        qemu = subprocess.run(["pgrep", "-f", f"qemu-system.*-name pykata-{key} "],
                              capture_output=True, text=True).stdout.split()
        guest_mib = config.load(peer.pykata_config).qemu.default_memory
        return IdlePod(
            {"shim": memory_kib(int(shim[0])), "monitor": memory_kib(int(monitor[0])),
             "qemu": memory_kib(int(qemu[0]))},
            qemu_parts_kib(int(qemu[0]), guest_mib), guest_meminfo(peer, cid))
    finally:
        peer.remove(cid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in RUNTIMES}
    with tempfile.TemporaryDirectory(prefix="pykata-bench-") as tmp:
        cfg_file = Path(tmp) / "pykata.toml"
        cfg_file.write_text(config.DEFAULT_CONFIG.read_text())
        peer = PrivateContainerd(Path(tmp), cfg_file)
        peer.start()
        try:
            peer.import_busybox()
            for i in range(args.runs):
                for name, runtime in RUNTIMES.items():
                    times[name].append(timed_run(peer, runtime, f"bench-{name}-{i}"))
                print(f"run {i + 1}/{args.runs}: pykata {times['pykata'][-1]:.2f} s, "
                      f"runc {times['runc'][-1]:.3f} s", file=sys.stderr)
            memory = idle_pod_memory(peer)
        finally:
            peer.stop()
    print(f"\nctr run --rm IMAGE ID true, median of {args.runs} runs (min-max):\n")
    for name in RUNTIMES:
        values = times[name]
        print(f"  {name:<7} {statistics.median(values):7.3f} s   "
              f"({min(values):.3f}-{max(values):.3f})")
    ratio = statistics.median(times["pykata"]) / statistics.median(times["runc"])
    print(f"  pykata / runc = {ratio:.1f}x")
    print("\nidle pod (sleep 600), memory:")
    for name, (rss, pss) in memory.processes.items():
        print(f"  {name:<7} RSS {rss / 1024:6.1f} MiB   PSS {pss / 1024:6.1f} MiB")
    print("  qemu's RSS by part:")
    for part, kib in memory.qemu_parts.items():
        print(f"    {part:<44} {kib / 1024:6.1f} MiB")
    print("  the guest's own view:")
    for part, kib in memory.guest_view.items():
        print(f"    {part:<44} {kib / 1024:6.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
