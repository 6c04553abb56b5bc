"""Benchmark: `ctr run --rm IMAGE ID true` and `ctr task exec` with pykata and runc, and memory.

Starts a private containerd 1.6 (like the functional tests), imports the
busybox test image, then alternates runc, pykata booting cold, pykata
restoring from a VM template ([factory] enable_template) and pykata taking a
warm VM from the VM cache (`pykata factory init` with vm_cache_number = 2;
each such run starts once the cache is full again), the shim's configuration
file switched between runs, so all see the same machine. Then times `ctr
task exec ID true` in a running task of each runtime, in turn. Also reports
the memory of every pykata process of an idle pod (RSS and PSS from
/proc/<pid>/smaps_rollup) and its QEMU's by part, for a pod booted cold and
for three idle pods at once restored from one template.

With --baseline CHECKOUT (another pykata's checkout with its .venv, today's
main say), that pykata runs beside this one as a fourth runtime, in the same
turns (its own VM cache, at its own endpoint), for before/after figures
from one run.

    .venv/bin/python -m benchmarks.bench_containerd [--runs 10] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.baseline import BASE_RUNTIME, Baseline
from benchmarks.bench_run import with_disk_image
from benchmarks.factory_config import with_factory
from pykata import config
from pykata.runtime.keys import pod_key
from tests.functional.containerd_peer import IMAGE, NAMESPACE, PrivateContainerd

RUNTIMES = {"pykata": "io.containerd.pykata.v2", "runc": "io.containerd.runc.v2"}


def timed_exec(peer: PrivateContainerd, cid: str, exec_id: str) -> float:
    start = time.monotonic()
    result = peer.ctr("task", "exec", "--exec-id", exec_id, cid, "true")
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"ctr task exec in {cid} failed: {result.err}")
    return elapsed


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
    # (RSS, PSS) KiB of each pykata process of the pod: its shim, QEMU, and
    # (before the pod core) its pod monitor.
    processes: dict[str, tuple[int, int]]
    qemu_parts: dict[str, int]
    guest_view: dict[str, int]


def idle_pod_memory(peer: PrivateContainerd, runtime: str, cid: str = "bench-idle") -> IdlePod:
    result = peer.ctr("run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "600")
    if result.returncode != 0:
        raise SystemExit(f"could not start an idle pod: {result.err}")
    try:
        time.sleep(3)  # let the shim settle after start-up
        return measure_pod(peer, cid)
    finally:
        peer.remove(cid)


def measure_pod(peer: PrivateContainerd, cid: str) -> IdlePod:
    from pykata.runtime.paths import SandboxPaths
    from pykata.runtime.state import STATE_FILE

    key = pod_key(str(peer.socket), NAMESPACE, cid)
    # Read as JSON, not as this pykata's record: the baseline's may differ.
    state = json.loads((SandboxPaths.for_key(key).run_dir / STATE_FILE).read_text())
    shim = subprocess.run(["pgrep", "-f", f"pykata[.]shim .*{key}"], capture_output=True,
                          text=True).stdout.split()
    monitor = subprocess.run(["pgrep", "-f", f"pykata[.]monitor[.]pod .*--key {key} "],
                             capture_output=True, text=True).stdout.split()
    qemu = int(state["qemu_pid"])
    guest_mib = config.load(peer.pykata_config).qemu.default_memory
    processes = {"shim": memory_kib(int(shim[0]))}
    if monitor:
        processes["monitor"] = memory_kib(int(monitor[0]))
    processes["qemu"] = memory_kib(qemu)
    return IdlePod(processes, qemu_parts_kib(qemu, guest_mib), guest_meminfo(peer, cid))


def idle_pods_memory(peer: PrivateContainerd, runtime: str, count: int) -> list[IdlePod]:
    """`count` idle pods running at once, each measured while all run."""
    cids = [f"bench-many-{i}" for i in range(count)]
    try:
        for cid in cids:
            result = peer.ctr("run", "-d", "--runtime", runtime, IMAGE, cid,
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


def start_cache(cache_file: Path, pykata: list[str]) -> subprocess.Popen[bytes]:
    """`pykata factory init` serving two warm VMs, in the containerd's run root."""
    proc = subprocess.Popen([*pykata, "--config", str(cache_file), "factory", "init"],
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
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="another pykata's checkout, measured beside this one")
    parser.add_argument("--vs-disk", action="store_true",
                        help="also this pykata with its root image as a virtio-blk disk "
                             "(disable_image_nvdimm = true) instead of DAX")
    args = parser.parse_args()
    baseline = Baseline(args.baseline) if args.baseline else None
    own = [sys.executable, "-m", "pykata.cli.main"]
    pykatas = {"pykata": (RUNTIMES["pykata"], own)}
    if args.vs_disk:
        pykatas["pykata-disk"] = (RUNTIMES["pykata"], own)
    if baseline is not None:
        pykatas["baseline"] = (BASE_RUNTIME, [baseline.pykata()])
    modes = ["runc", *(f"{name} {how}" for name in pykatas
                       for how in ("cold", "template", "VM cache"))]
    times: dict[str, list[float]] = {name: [] for name in modes}
    execs: dict[str, list[float]] = {name: [] for name in ("runc", *pykatas)}
    with tempfile.TemporaryDirectory(prefix="pykata-bench-") as tmp:
        if baseline is not None:
            baseline.expose(Path(tmp))
        cfg_file = Path(tmp) / "pykata.toml"
        cold_text = config.DEFAULT_CONFIG.read_text()
        texts: dict[str, str] = {"runc": cold_text}
        cache_files: dict[str, Path] = {}
        for name in pykatas:
            templates = f"{tmp}/templates-{name}"
            if name == "pykata-disk":
                cold_text = with_disk_image(config.DEFAULT_CONFIG.read_text())
            else:
                cold_text = config.DEFAULT_CONFIG.read_text()
            texts[f"{name} cold"] = cold_text
            texts[f"{name} template"] = with_factory(cold_text, enable_template=True,
                                                     template_path=templates)
            texts[f"{name} VM cache"] = with_factory(
                cold_text, enable_template=True, template_path=templates, vm_cache_number=2,
                vm_cache_endpoint=f"{tmp}/cache-{name}.sock")
            cache_files[name] = Path(tmp) / f"cache-{name}.toml"
            cache_files[name].write_text(texts[f"{name} VM cache"])
        cold_text = texts["runc"]
        cfg_file.write_text(cold_text)
        peer = PrivateContainerd(Path(tmp), cfg_file)
        peer.start()
        factories: list[subprocess.Popen[bytes]] = []
        running: list[str] = []
        try:
            peer.import_busybox()
            for name, (runtime, pykata) in pykatas.items():
                cfg_file.write_text(texts[f"{name} template"])
                timed_run(peer, runtime, f"bench-build-{name}")  # builds the template
                factories.append(start_cache(cache_files[name], pykata))
            for i in range(args.runs):
                for mode in modes:
                    name = mode.split()[0]
                    cfg_file.write_text(texts[mode])
                    if mode.endswith("cache"):
                        wait_for_cache(cache_files[name])
                    runtime = RUNTIMES["runc"] if mode == "runc" else pykatas[name][0]
                    times[mode].append(timed_run(peer, runtime, f"bench-{i}-{modes.index(mode)}"))
                print(f"run {i + 1}/{args.runs}: " + ", ".join(
                    f"{m} {times[m][-1]:.2f} s" for m in modes), file=sys.stderr)
            # exec in a running task of each, turn by turn (pykata's from a template).
            for name in execs:
                cfg_file.write_text(texts.get(f"{name} template", texts["runc"]))
                runtime = RUNTIMES["runc"] if name == "runc" else pykatas[name][0]
                result = peer.ctr("run", "-d", "--runtime", runtime, IMAGE, f"exec-{name}",
                                  "sleep", "600")
                if result.returncode != 0:
                    raise SystemExit(f"could not start a task for exec: {result.err}")
                running.append(f"exec-{name}")
            for i in range(args.runs):
                for name in execs:
                    execs[name].append(timed_exec(peer, f"exec-{name}", f"e{i}"))
            memory: dict[str, IdlePod] = {}
            warm: dict[str, list[IdlePod]] = {}
            for name, (runtime, _) in pykatas.items():
                cfg_file.write_text(texts[f"{name} cold"])
                memory[name] = idle_pod_memory(peer, runtime, f"bench-idle-{name}")
                cfg_file.write_text(texts[f"{name} template"])
                warm[name] = idle_pods_memory(peer, runtime, 3)
        finally:
            for cid in running:
                peer.remove(cid)
            for factory in factories:
                factory.terminate()
                factory.wait(60)
            peer.stop()
    print(f"\nctr run --rm IMAGE ID true, median of {args.runs} runs (min-max):\n")
    runc = statistics.median(times["runc"])
    for mode in modes:
        _print_times(mode, times[mode], runc)
    print(f"\nctr task exec ID true in a running task, median of {args.runs} (min-max):\n")
    runc = statistics.median(execs["runc"])
    for name, values in execs.items():
        _print_times(name, values, runc)
    for name in pykatas:
        print(f"\n{name}: idle pod (sleep 600) booted cold, memory:")
        print_pod(memory[name])
        print(f"\n{name}: three idle pods at once, restored from one template: "
              "the third's memory:")
        print_pod(warm[name][-1])
        totals = [sum(p for _, p in pod.processes.values()) / 1024 for pod in warm[name]]
        print("  total PSS of each of the three: " + ", ".join(f"{t:.1f}" for t in totals)
              + " MiB")
    return 0


def _print_times(label: str, values: list[float], runc: float) -> None:
    print(f"  {label:<24} {statistics.median(values):7.3f} s   "
          f"({min(values):.3f}-{max(values):.3f})   "
          f"{statistics.median(values) / runc:5.1f}x runc")


if __name__ == "__main__":
    sys.exit(main())
