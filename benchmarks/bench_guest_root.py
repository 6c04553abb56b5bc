"""Benchmark: the guest's root from the initrd against the read-only image,
side by side in one run: idle pod memory and start time.

For each guest root ([hypervisor.qemu] guest_root = "initrd"; "image" as a
virtio-blk disk, disable_image_nvdimm = true; "image-dax", the image as a
DAX device, the default) and each start (cold, and restored from a VM template of its own), starts
--pods idle `pykata run` pods one after another, lets them settle, then sums
the PSS (/proc/<pid>/smaps_rollup) of every process pykata runs for them:
QEMU, virtiofsd and the pod's owner. PSS divides a page shared by N
processes by N, so the image's blocks in the host's page cache, read by
every VM, count once in all; the initrd, unpacked into each VM's RAM,
counts in each. Also times `pykata run -- true` in turn for the four, --runs
times, with each guest root's floor: a bare boot of the same kernel and
root to an init that powers the VM off at once.

    .venv/bin/python -m benchmarks.bench_guest_root [--pods 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_run import floor_boot
from benchmarks.factory_config import with_factory
from pykata import assets, config
from pykata.host.probes import resolve_accel

PYKATA = [sys.executable, "-m", "pykata.cli.main"]
ROOTS = ("initrd", "image", "image-dax")
STARTS = ("cold", "template")
_GUEST_ROOT = re.compile(r'(?m)^guest_root = ".*"$')
_DAX = re.compile(r"(?m)^disable_image_nvdimm = .*$")


def root_config(base_text: str, root: str) -> str:
    """`base_text` booting its guests from `root` (one of ROOTS)."""
    text, count = _GUEST_ROOT.subn(f'guest_root = "{root.removesuffix("-dax")}"', base_text)
    text, dax = _DAX.subn(f"disable_image_nvdimm = {str(root != 'image-dax').lower()}", text)
    if count != 1 or dax != 1:
        raise SystemExit("the configuration in effect lacks a guest_root or a "
                         "disable_image_nvdimm line")
    return text


def _env(conf: Path, run_root: Path) -> dict[str, str]:
    return {**os.environ, "PYKATA_CONFIG": str(conf), "PYKATA_RUN_ROOT": str(run_root)}


def timed_run(conf: Path, run_root: Path) -> float:
    start = time.monotonic()
    proc = subprocess.run([*PYKATA, "run", "--", "true"], env=_env(conf, run_root),
                          capture_output=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"pykata run failed ({conf}): {proc.stderr.decode()}")
    return time.monotonic() - start


def _pods_up(run_root: Path) -> int:
    up = 0
    for state in (run_root / "sandboxes").glob("*/state.json"):
        try:
            if json.loads(state.read_text()).get("control_socket"):
                up += 1
        except (OSError, ValueError):
            continue
    return up


def pss_by_process(run_root: Path) -> dict[str, int]:
    """PSS (KiB) of the processes pykata runs under `run_root`, by kind."""
    mine = f"PYKATA_RUN_ROOT={run_root}".encode()
    totals = {"QEMU": 0, "virtiofsd": 0, "owner": 0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mine not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        pss = next(int(line.split()[1]) for line in rollup.splitlines()
                   if line.startswith("Pss:"))
        kind = "QEMU" if comm.startswith("qemu") else "virtiofsd" if "virtiofsd" in comm \
            else "owner"
        totals[kind] += pss
    return totals


def idle_pods(conf: Path, run_root: Path, pods: int, settle: float) -> dict[str, int]:
    """Start `pods` idle pods, let them settle, measure, stop them."""
    procs = []
    try:
        for n in range(pods):
            procs.append(subprocess.Popen(
                [*PYKATA, "run", "--", "sh", "-c", "trap 'exit 0' TERM; sleep 900 & wait"],
                env=_env(conf, run_root), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 240
            while _pods_up(run_root) < n + 1:
                if time.monotonic() > deadline:
                    raise SystemExit(f"pod {n + 1} of {conf} did not come up")
                time.sleep(0.2)
        time.sleep(settle)
        return pss_by_process(run_root)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds the idle pods run before their memory is read")
    args = parser.parse_args()
    cfg = config.load()
    paths = assets.locate()
    if paths.image is None or not paths.image.is_file():
        raise SystemExit("no root image: run `pykata assets build` as root")
    accel = resolve_accel(cfg.qemu.accel).value
    base_text = config.config_path().read_text()
    with tempfile.TemporaryDirectory(prefix="pykata-bench-root-") as tmp:
        confs: dict[tuple[str, str], Path] = {}
        for root in ROOTS:
            text = root_config(base_text, root)
            for start in STARTS:
                if start == "template":
                    text = with_factory(text, enable_template=True,
                                        template_path=f"{tmp}/templates-{root}")
                conf = Path(tmp) / f"{root}-{start}.toml"
                conf.write_text(text)
                confs[root, start] = conf
        run_root = Path(tmp) / "run"
        for root in ROOTS:  # each template is built by the first start: not timed
            timed_run(confs[root, "template"], run_root)
        memory: dict[tuple[str, str], dict[str, int]] = {}
        for key, conf in confs.items():
            memory[key] = idle_pods(conf, Path(tmp) / f"idle-{key[0]}-{key[1]}", args.pods,
                                    args.settle)
            print(f"idle {key}: {memory[key]}", file=sys.stderr)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in confs}
        floors: dict[str, list[float]] = {root: [] for root in ROOTS}
        for i in range(args.runs):
            for root in ROOTS:
                floors[root].append(floor_boot(cfg.qemu.path, paths, accel,
                                               cfg.qemu.default_memory, root))
            for key, conf in confs.items():
                times[key].append(timed_run(conf, run_root))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(
                f"{k[0]} {k[1]} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr)
        for root in ROOTS:
            subprocess.run([*PYKATA, "factory", "destroy"],
                           env=_env(confs[root, "template"], run_root), capture_output=True)
    print(f"\nguest root: initrd {paths.initrd} ({paths.initrd.stat().st_size >> 20} MiB) "
          f"against image {paths.image} ({paths.image.stat().st_size >> 20} MiB), "
          f"accel={accel}")
    print(f"\nidle pods' host memory, PSS per pod (MiB), {args.pods} pods at once, "
          f"after {args.settle:.0f} s idle:")
    print(f"  {'':<20}" + "".join(f"{r + ' ' + s:>18}" for r, s in confs))
    for part in ("QEMU", "virtiofsd", "owner"):
        print(f"  {part:<20}" + "".join(
            f"{memory[k][part] / 1024 / args.pods:>18.1f}" for k in confs))
    print(f"  {'total':<20}" + "".join(
        f"{sum(memory[k].values()) / 1024 / args.pods:>18.1f}" for k in confs))
    print(f"\n`pykata run -- true`, median of {args.runs} (min-max), and / its root's floor:")
    for root in ROOTS:
        floor = statistics.median(floors[root])
        print(f"  floor, {root:<15} {floor:6.3f} s ({min(floors[root]):.2f}-"
              f"{max(floors[root]):.2f})")
    initrd_floor = statistics.median(floors["initrd"])
    for (root, start), values in times.items():
        whole = statistics.median(values)
        print(f"  {root + ' ' + start:<22} {whole:6.3f} s ({min(values):.2f}-{max(values):.2f})"
              f"   {whole / statistics.median(floors[root]):5.2f}x its floor, "
              f"{whole / initrd_floor:5.2f}x the initrd's floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
