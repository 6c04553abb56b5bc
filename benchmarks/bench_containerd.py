"""Benchmark: `ctr run --rm IMAGE ID true` with pykata beside runc, and the shim's memory.

Starts a private containerd 1.6 (like the functional tests), imports the
busybox test image, then alternates runc, pykata booting cold, pykata
restoring from a VM template ([factory] enable_template) and pykata taking a
warm VM from the VM cache (`pykata factory init` with vm_cache_number = 2;
each such run starts once the cache is full again), the shim's configuration
file switched between runs, so all see the same machine. Also
reports the memory of the shim server, of the pod monitor holding the VM
(RSS and PSS from /proc/<pid>/smaps_rollup) and of its QEMU for an idle pod
booted cold, and for three idle pods at once restored from one template.

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

from benchmarks.factory_config import with_factory
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


def idle_pod_memory(peer: PrivateContainerd, cid: str = "bench-idle") -> IdlePod:
    result = peer.ctr("run", "-d", "--runtime", RUNTIMES["pykata"], IMAGE, cid, "sleep", "600")
    if result.returncode != 0:
        raise SystemExit(f"could not start an idle pod: {result.err}")
    try:
        time.sleep(3)  # let the shim settle after start-up
        return measure_pod(peer, cid)
    finally:
        peer.remove(cid)


def measure_pod(peer: PrivateContainerd, cid: str) -> IdlePod:
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


def idle_pods_memory(peer: PrivateContainerd, count: int) -> list[IdlePod]:
    """`count` idle pods running at once, each measured while all run."""
    cids = [f"bench-many-{i}" for i in range(count)]
    try:
        for cid in cids:
            result = peer.ctr("run", "-d", "--runtime", RUNTIMES["pykata"], IMAGE, cid,
                              "sleep", "600")
            if result.returncode != 0:
                raise SystemExit(f"could not start an idle pod: {result.err}")
        time.sleep(3)
        return [measure_pod(peer, cid) for cid in cids]
    finally:
        for cid in cids:
            peer.remove(cid)


def print_pod(memory: IdlePod) -> None:
    for name, (rss, pss) in memory.processes.items():
        print(f"  {name:<7} RSS {rss / 1024:6.1f} MiB   PSS {pss / 1024:6.1f} MiB")
    total = sum(pss for _, pss in memory.processes.values())
    print(f"  total   PSS {total / 1024:6.1f} MiB")
    print("  qemu's RSS by part:")
    for part, kib in memory.qemu_parts.items():
        print(f"    {part:<44} {kib / 1024:6.1f} MiB")
    print("  the guest's own view:")
    for part, kib in memory.guest_view.items():
        print(f"    {part:<44} {kib / 1024:6.1f} MiB")


def start_cache(cache_file: Path, peer: PrivateContainerd) -> subprocess.Popen[bytes]:
    """`pykata factory init` serving two warm VMs, in the containerd's run root."""
    proc = subprocess.Popen([sys.executable, "-m", "pykata.cli.main", "--config",
                             str(cache_file), "factory", "init"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_for_cache(cache_file)
    return proc


def wait_for_cache(cache_file: Path) -> None:
    """Until the cache has both its VMs ready again (a run is timed from a
    full cache, not while it refills)."""
    import asyncio

    from pykata.factory import cache

    cfg = config.load(cache_file)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if asyncio.run(cache.ask(cfg, "status")).get("ready") == 2:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit("the VM cache did not get ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    modes = ("runc", "pykata cold", "pykata template", "pykata VM cache")
    times: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix="pykata-bench-") as tmp:
        cfg_file = Path(tmp) / "pykata.toml"
        cold_text = config.DEFAULT_CONFIG.read_text()
        warm_text = with_factory(cold_text, enable_template=True,
                                 template_path=f"{tmp}/templates")
        cache_text = with_factory(cold_text, enable_template=True,
                                  template_path=f"{tmp}/templates", vm_cache_number=2,
                                  vm_cache_endpoint=f"{tmp}/cache.sock")
        cache_file = Path(tmp) / "cache.toml"
        cache_file.write_text(cache_text)
        cfg_file.write_text(cold_text)
        peer = PrivateContainerd(Path(tmp), cfg_file)
        peer.start()
        factory: subprocess.Popen[bytes] | None = None
        try:
            peer.import_busybox()
            cfg_file.write_text(warm_text)
            timed_run(peer, RUNTIMES["pykata"], "bench-build")  # builds the template
            factory = start_cache(cache_file, peer)
            for i in range(args.runs):
                for mode in modes:
                    cfg_file.write_text({"pykata template": warm_text,
                                         "pykata VM cache": cache_text}.get(mode, cold_text))
                    if mode.endswith("cache"):
                        wait_for_cache(cache_file)
                    runtime = RUNTIMES["runc" if mode == "runc" else "pykata"]
                    times[mode].append(timed_run(peer, runtime, f"bench-{i}-{mode[-4:]}"))
                print(f"run {i + 1}/{args.runs}: " + ", ".join(
                    f"{m} {times[m][-1]:.2f} s" for m in modes), file=sys.stderr)
            cfg_file.write_text(cold_text)
            memory = idle_pod_memory(peer)
            cfg_file.write_text(warm_text)
            warm = idle_pods_memory(peer, 3)
        finally:
            if factory is not None:
                factory.terminate()
                factory.wait(60)
            peer.stop()
    print(f"\nctr run --rm IMAGE ID true, median of {args.runs} runs (min-max):\n")
    runc = statistics.median(times["runc"])
    for mode in modes:
        values = times[mode]
        print(f"  {mode:<16} {statistics.median(values):7.3f} s   "
              f"({min(values):.3f}-{max(values):.3f})   "
              f"{statistics.median(values) / runc:5.1f}x runc")
    print("\nidle pod (sleep 600) booted cold, memory:")
    print_pod(memory)
    print("\nthree idle pods at once, restored from one template: the third's memory:")
    print_pod(warm[-1])
    totals = [sum(p for _, p in pod.processes.values()) / 1024 for pod in warm]
    print("  total PSS of each of the three: " + ", ".join(f"{t:.1f}" for t in totals)
          + " MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
