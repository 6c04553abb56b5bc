"""Benchmark: file system work in a container, runc beside pykata over 9p and
over virtio-fs (each virtio_fs_cache mode asked for, and virtiofsd/QEMU
variants), side by side in one run.

In each, a busybox container works in its own root filesystem (runc: a
directory on the host's disk; pykata: the shared filesystem, its writes in
the sandbox's scratch tmpfs):
  (a) write 256 MiB (dd, fsync at the end) and read it back (dd);
  (b) unpack a tar of 10,000 small files in 100 directories, list it (find);
  (c) delete the tree (rm -rf).
Times are the container's own (/proc/uptime before and after each step),
median of --runs, the setups interleaved. Then start times: `pykata run --
true` and `ctr run --rm IMAGE ID true` (a private containerd, the shim's
configuration switched between runs) on each filesystem.

--variant adds virtio-fs setups that differ from the shipped one in one
setting, for trying settings in the same run: `threads4` (virtiofsd
--thread-pool-size=4), `writeback` (virtiofsd -o writeback), `queue128`
(the device's queue-size=128 instead of 1024). They run through wrappers
around virtiofsd and QEMU (virtio_fs_daemon, path) that change only that.
--big-only skips (b) and (c) and the start times.

    .venv/bin/python -m benchmarks.bench_fs [--runs 3] [--cache auto always none]
        [--variant threads4 writeback queue128] [--big-only]   (as root)
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

from pykata import config as pykata_config
from pykata.assets.busybox_image import ensure_image
from tests.functional.containerd_peer import IMAGE, PrivateContainerd

BIG_MIB = 256
FILES, DIRS, FILE_BYTES = 10_000, 100, 1024
STEPS = ("write", "read", "untar", "find", "delete")
BIG_STEPS = STEPS[:2]
BIG_SCRIPT = f"""
t() {{ read u _ < /proc/uptime; echo "T $1 $u"; }}
mkdir -p /bench; t start
dd if=/dev/zero of=/bench/big bs=1M count={BIG_MIB} conv=fsync 2>/dev/null; t write
dd if=/bench/big of=/dev/null bs=1M 2>/dev/null; t read
rm /bench/big
"""
SCRIPT = BIG_SCRIPT + """
tar -xf /data/tree.tar -C /bench; t untar
echo "N $(find /bench | wc -l)"; t find
rm -rf /bench; t delete
"""
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
QEMU = pykata_config.QemuConfig().path
# name -> (virtiofsd arguments added last, QEMU argument rewrite or None)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, str] | None]] = {
    "threads4": (("--thread-pool-size=4",), None),
    "writeback": (("-o", "writeback"), None),
    "queue128": ((), ("queue-size=1024", "queue-size=128")),
}


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


def parse(out: str, steps: tuple[str, ...] = STEPS) -> dict[str, float]:
    marks: dict[str, float] = {}
    count = 0
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["T"] and len(parts) == 3:
            marks[parts[1]] = float(parts[2])
        elif parts[:1] == ["N"] and len(parts) == 2:
            count = int(parts[1])
    if set(marks) != {"start", *steps} or (steps == STEPS and count < FILES):
        raise RuntimeError(f"the container's run is incomplete:\n{out}")
    order = ["start", *steps]
    return {step: marks[step] - marks[order[i]] for i, step in enumerate(order[1:])}


def run_runc(data: Path, work: Path, script: str, steps: tuple[str, ...]
             ) -> dict[str, float]:
    bundle = work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(ensure_image(), bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["sh", "-c", script], terminal=False)
    spec["root"]["readonly"] = False
    spec["mounts"].append({"destination": "/data", "type": "bind", "source": str(data),
                           "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(spec))
    out = subprocess.run(["runc", "--root", str(work / "state"), "run", "-b", str(bundle),
                          f"bench-fs-{os.getpid()}"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=1800, check=True).stdout
    return parse(out, steps)


def pykata(config: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pykata.cli.main", "--config", str(config),
                           "run", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def run_pykata(config: Path, data: Path, script: str, steps: tuple[str, ...]
               ) -> dict[str, float]:
    done = pykata(config, "-v", f"{data}:/data:ro", "--", "sh", "-c", script)
    if done.returncode != 0:
        raise RuntimeError(f"pykata run failed ({done.returncode}): {done.stderr}")
    return parse(done.stdout, steps)


def start_time(config: Path) -> float:
    t0 = time.monotonic()
    done = pykata(config, "--", "true", timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"pykata run -- true failed: {done.stderr}")
    return time.monotonic() - t0


def ctr_start_time(peer: PrivateContainerd, shim_config: Path, text: str, cid: str) -> float:
    """`ctr run --rm IMAGE ID true` with the shim reading `text`."""
    shim_config.write_text(text)
    t0 = time.monotonic()
    result = peer.ctr("run", "--rm", "--runtime", "io.containerd.pykata.v2", IMAGE, cid, "true",
                      timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"ctr run failed: {result.err}")
    return time.monotonic() - t0


def config_text(shared_fs: str, cache: str = "auto", daemon: str = "", qemu: str = "") -> str:
    text = f'[hypervisor.qemu]\nshared_fs = "{shared_fs}"\nvirtio_fs_cache = "{cache}"\n'
    if daemon:
        text += f'virtio_fs_daemon = "{daemon}"\n'
    if qemu:
        text += f'path = "{qemu}"\n'
    return text


def write_config(where: Path, name: str, text: str) -> Path:
    path = where / f"{name}.toml"
    path.write_text(text)
    return path


def variant_text(where: Path, name: str) -> str:
    """The configuration of a --variant: wrappers that change one setting."""
    extra, rewrite = VARIANTS[name]
    daemon = qemu = ""
    if extra:
        daemon = str(where / f"virtiofsd-{name}")
        Path(daemon).write_text(f'#!/bin/sh\nexec {VIRTIOFSD} "$@" {" ".join(extra)}\n')
        os.chmod(daemon, 0o755)
    if rewrite is not None:
        qemu = str(where / f"qemu-{name}")
        Path(qemu).write_text(f'#!/bin/bash\nexec {QEMU} "${{@//{rewrite[0]}/{rewrite[1]}}}"\n')
        os.chmod(qemu, 0o755)
    return config_text("virtio-fs", daemon=daemon, qemu=qemu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", nargs="+", default=["auto"],
                        choices=["auto", "always", "none"])
    parser.add_argument("--variant", nargs="*", default=[], choices=sorted(VARIANTS))
    parser.add_argument("--big-only", action="store_true",
                        help="only (a), the 256 MiB file; no start times")
    args = parser.parse_args()
    script, steps = (BIG_SCRIPT, BIG_STEPS) if args.big_only else (SCRIPT, STEPS)
    work = Path(tempfile.mkdtemp(prefix="pykata-bench-fs-"))
    peer: PrivateContainerd | None = None
    try:
        data = work / "data"
        data.mkdir()
        make_tree(data)
        os.chmod(data, 0o755)
        texts = {"pykata 9p": config_text("virtio-9p")}
        for cache in args.cache:
            texts[f"pykata virtio-fs ({cache})"] = config_text("virtio-fs", cache)
        for name in args.variant:
            texts[f"pykata virtio-fs ({name})"] = variant_text(work, name)
        setups: dict[str, Path | None] = {"runc": None}
        setups.update({name: write_config(work, f"setup{i}", text)
                       for i, (name, text) in enumerate(texts.items())})
        results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        # Start times on the two filesystems as shipped (cache auto).
        timed = {"pykata 9p": texts["pykata 9p"],
                 "pykata virtio-fs": config_text("virtio-fs")}
        starts: dict[str, list[float]] = {name: [] for name in timed}
        ctr_starts: dict[str, list[float]] = {name: [] for name in timed}
        shim_config = work / "shim.toml"
        if not args.big_only:
            shim_config.write_text(texts["pykata 9p"])
            peer = PrivateContainerd(work / "containerd", shim_config)
            peer.base.mkdir()
            peer.start()
            peer.import_busybox()
        for run in range(args.runs):
            # Interleaved, so every setup sees the same machine.
            for name, config in setups.items():
                results[name].append(run_runc(data, work, script, steps) if config is None
                                     else run_pykata(config, data, script, steps))
            if peer is not None:
                for i, (name, text) in enumerate(timed.items()):
                    starts[name].append(start_time(write_config(work, f"start{i}", text)))
                    ctr_starts[name].append(
                        ctr_start_time(peer, shim_config, text, f"bench-fs-{run}-{i}"))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        report(results, steps, args.runs)
        if peer is not None:
            report_starts(starts, ctr_starts, args.runs)
    finally:
        if peer is not None:
            peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, float]]], steps: tuple[str, ...],
           runs: int) -> None:
    median = {name: {s: statistics.median(r[s] for r in rs) for s in steps}
              for name, rs in results.items()}
    base = median["runc"]
    heads = {"write": "write 256 MiB", "read": "read 256 MiB", "untar": "untar 10k files",
             "find": "find", "delete": "delete"}
    print(f"median of {runs} runs; seconds, and x runc")
    print("| setup | " + " | ".join(heads[s] for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for name, values in median.items():
        cells = []
        for step in steps:
            seconds = values[step]
            ratio = seconds / base[step] if base[step] > 0 else float("inf")
            rate = f", {BIG_MIB / seconds:.0f} MB/s" if step in BIG_STEPS and seconds > 0 else ""
            cells.append(f"{seconds:.2f} s{rate} ({ratio:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


def report_starts(starts: dict[str, list[float]], ctr_starts: dict[str, list[float]],
                  runs: int) -> None:
    print(f"\nstart times, median of {runs} (interleaved), seconds")
    print("| filesystem | `pykata run -- true` | `ctr run --rm IMAGE ID true` |")
    print("|---|---|---|")
    for name in starts:
        print(f"| {name} | {statistics.median(starts[name]):.2f} | "
              f"{statistics.median(ctr_starts[name]):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
