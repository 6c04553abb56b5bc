"""Benchmark: file system work in a container, runc beside pykata over 9p and
over virtio-fs (each virtio_fs_cache mode asked for), side by side in one run.

In each, a busybox container works in its own root filesystem (runc: a
directory on the host's disk; pykata: the shared filesystem, its writes in
the sandbox's scratch tmpfs):
  (a) write 256 MiB (dd, fsync at the end) and read it back (dd);
  (b) unpack a tar of 10,000 small files in 100 directories, list it (find);
  (c) delete the tree (rm -rf).
Times are the container's own (/proc/uptime before and after each step),
median of --runs. Then start times: `pykata run -- true` on each filesystem.

    .venv/bin/python -m benchmarks.bench_fs [--runs 3] [--cache auto always]   (as root)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from pykata.assets.busybox_image import ensure_image

BIG_MIB = 256
FILES, DIRS, FILE_BYTES = 10_000, 100, 1024
STEPS = ("write", "read", "untar", "find", "delete")
SCRIPT = f"""
t() {{ read u _ < /proc/uptime; echo "T $1 $u"; }}
mkdir -p /bench; t start
dd if=/dev/zero of=/bench/big bs=1M count={BIG_MIB} conv=fsync 2>/dev/null; t write
dd if=/bench/big of=/dev/null bs=1M 2>/dev/null; t read
rm /bench/big
tar -xf /data/tree.tar -C /bench; t untar
echo "N $(find /bench | wc -l)"; t find
rm -rf /bench; t delete
"""


def make_tree(where: Path) -> Path:
    """The tar of small files (built once, in memory)."""
    path = where / "tree.tar"
    payload = b"x" * FILE_BYTES
    with tarfile.open(path, "w") as tar:
        for i in range(FILES):
            info = tarfile.TarInfo(f"tree/d{i % DIRS:03d}/f{i:05d}")
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return path


def parse(out: str) -> dict[str, float]:
    marks: dict[str, float] = {}
    count = 0
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["T"] and len(parts) == 3:
            marks[parts[1]] = float(parts[2])
        elif parts[:1] == ["N"] and len(parts) == 2:
            count = int(parts[1])
    if set(marks) != {"start", *STEPS} or count < FILES:
        raise RuntimeError(f"the container's run is incomplete:\n{out}")
    order = ["start", *STEPS]
    return {step: marks[step] - marks[order[i]] for i, step in enumerate(order[1:])}


def run_runc(data: Path, work: Path) -> dict[str, float]:
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(ensure_image(), bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["sh", "-c", SCRIPT], terminal=False)
    spec["root"]["readonly"] = False
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(data),
                           "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(spec))
    out = subprocess.run(["runc", "--root", str(work / "state"), "run", "-b", str(bundle),
                          f"bench-fs-{os.getpid()}"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=1800, check=True).stdout
    return parse(out)


def pykata(config: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pykata.cli.main", "--config", str(config),
                           "run", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def run_pykata(config: Path, data: Path) -> dict[str, float]:
    done = pykata(config, "-v", f"{data}:/data:ro", "--", "sh", "-c", SCRIPT)
    if done.returncode != 0:
        raise RuntimeError(f"pykata run failed ({done.returncode}): {done.stderr}")
    return parse(done.stdout)


def start_time(config: Path) -> float:
    t0 = time.monotonic()
    done = pykata(config, "--", "true", timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"pykata run -- true failed: {done.stderr}")
    return time.monotonic() - t0


def write_config(where: Path, shared_fs: str, cache: str = "auto") -> Path:
    path = where / f"{shared_fs}-{cache}.toml"
    path.write_text(f'[hypervisor.qemu]\nshared_fs = "{shared_fs}"\n'
                    f'virtio_fs_cache = "{cache}"\n')
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", nargs="+", default=["auto"],
                        choices=["auto", "always", "none"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pykata-bench-fs-"))
    try:
        data = work / "data"
        data.mkdir()
        make_tree(data)
        os.chmod(data, 0o755)
        setups = {"runc": None, "pykata 9p": write_config(work, "virtio-9p")}
        for cache in args.cache:
            setups[f"pykata virtio-fs ({cache})"] = write_config(work, "virtio-fs", cache)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        starts: dict[str, list[float]] = {name: [] for name in setups if name != "runc"}
        for _ in range(args.runs):
            # Interleaved, so every setup sees the same machine.
            for name, config in setups.items():
                results[name].append(run_runc(data, work) if config is None
                                     else run_pykata(config, data))
                if config is not None:
                    starts[name].append(start_time(config))
        report(results, starts, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, float]]], starts: dict[str, list[float]],
           runs: int) -> None:
    median = {name: {s: statistics.median(r[s] for r in rs) for s in STEPS}
              for name, rs in results.items()}
    base = median["runc"]
    print(f"median of {runs} runs; seconds, and x runc")
    print("| setup | write 256 MiB | read 256 MiB | untar 10k files | find | delete | "
          "start (`pykata run -- true`) |")
    print("|---|---|---|---|---|---|---|")
    for name, steps in median.items():
        cells = []
        for step in STEPS:
            seconds = steps[step]
            ratio = seconds / base[step] if base[step] > 0 else float("inf")
            timed = step in ("write", "read") and seconds > 0
            rate = f", {BIG_MIB / seconds:.0f} MB/s" if timed else ""
            cells.append(f"{seconds:.2f} s{rate} ({ratio:.1f}x)")
        start = f"{statistics.median(starts[name]):.2f} s" if name in starts else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {start} |")


if __name__ == "__main__":
    sys.exit(main())
