"""Benchmark: `pykata run -- true` with the built-in image, phase by phase, beside its floor.

The floor is a bare QEMU boot of the same kernel and initrd, on the same
machine options, to an init that powers the VM off at once: everything
`pykata run` spends above it is pykata's. The two are measured alternately in
the same run, so both see the same machine.

    .venv/bin/python -m benchmarks.bench_run [--runs 10]   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pykata import assets, config
from pykata.hypervisor.host import resolve_accel
from pykata.hypervisor.qemu import VmConfig
from pykata.hypervisor.qemu_args import Basics, Cpu, KernelBoot, Machine, Memory, render

PHASES = [
    ("process start", "process_start"),
    ("VM launch (QEMU up, QMP ready)", "vm_launch"),
    ("VM boot to agent ready", "vm_boot_to_agent"),
    ("sandbox create (9p mount)", "sandbox_create"),
    ("container create+start", "container_create_start"),
    ("teardown", "teardown"),
    ("whole command", "whole"),
]

# The guest's own marks (GetBootProfile), in order.
GUEST_STEPS = [
    ("kernel started to /init", "guest_init_started"),
    ("/init's mounts, interpreter started", "guest_python_started"),
    ("interpreter up (agent's first line)", "guest_agent_started"),
    ("agent's imports done", "guest_agent_imported"),
    ("agent serving its channel", "guest_agent_listening"),
    ("host's first request", "guest_first_request"),
]


def floor_boot(qemu: str, paths: assets.AssetPaths, accel: str, memory: int) -> float:
    """Seconds for QEMU to boot the kernel+initrd to an init that reboots at once."""
    vm = VmConfig(name="floor", run_dir=Path("/nonexistent"), qemu_path=qemu,
                  kernel=paths.kernel, initrd=paths.initrd, accel=accel, memory_mib=memory)
    # busybox `reboot -f` as the very first process: reboot=t and -no-reboot
    # turn it into QEMU exiting.
    cmdline = f"{vm.kernel_cmdline()} rdinit=/sbin/reboot -- -f"
    args = [qemu, *render([
        Basics(name="pykata-floor"), Machine("microvm", accel), Cpu(1, accel), Memory(memory),
        KernelBoot(paths.kernel, paths.initrd, cmdline),
    ]), "-serial", "none"]
    start = time.monotonic()
    subprocess.run(args, check=True, timeout=120, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def pykata_run(timings: Path) -> dict[str, float]:
    env = {**os.environ, "PYKATA_TIMINGS": str(timings)}
    start_wall = time.time()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pykata.cli.main", "run", "--", "true"],
                          env=env, capture_output=True, timeout=300)
    whole = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"pykata run failed: {proc.stderr.decode()}")
    phases = json.loads(timings.read_text())
    phases["process_start"] = phases.pop("entered") - start_wall
    phases.pop("exited")
    phases["whole"] = whole
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    cfg = config.load()
    paths = assets.locate()
    accel = resolve_accel(cfg.qemu.accel).value
    samples: dict[str, list[float]] = {key: [] for _, key in PHASES}
    floors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            floors.append(floor_boot(cfg.qemu.path, paths, accel, cfg.qemu.default_memory))
            phases = pykata_run(Path(tmp) / f"t{i}.json")
            for _, key in PHASES:
                samples[key].append(phases.get(key, 0.0))
            for _, key in GUEST_STEPS:
                if key in phases:
                    samples.setdefault(key, []).append(phases[key])
            print(f"run {i + 1}/{args.runs}: whole {phases['whole']:.2f} s, "
                  f"floor {floors[-1]:.2f} s", file=sys.stderr)
    print(f"\npykata run -- true, built-in busybox image, accel={accel}, "
          f"median of {args.runs} runs (min-max):\n")
    width = max(len(label) for label, _ in PHASES)
    for label, key in PHASES:
        values = samples[key]
        print(f"  {label:<{width}}  {statistics.median(values):6.3f} s"
              f"   ({min(values):.3f}-{max(values):.3f})")
    guest = [(label, key) for label, key in GUEST_STEPS if samples.get(key)]
    if guest:
        print("\n  in the guest (its clock, 0 = its kernel's start; medians):")
        guest_width = max(len(label) for label, _ in guest)
        previous = 0.0
        for label, key in guest:
            at = statistics.median(samples[key])
            print(f"    {label:<{guest_width}}  at {at:6.3f} s   (+{at - previous:.3f})")
            previous = at
    floor = statistics.median(floors)
    print(f"\n  {'floor: bare QEMU boot to /init':<{width}}  {floor:6.3f} s"
          f"   ({min(floors):.3f}-{max(floors):.3f})")
    whole = statistics.median(samples["whole"])
    print(f"  {'pykata above the floor':<{width}}  {whole - floor:6.3f} s"
          f"   (whole command / floor = {whole / floor:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
