"""Benchmark: `pykata run -- true` with the built-in image, phase by phase, beside its floor.

The floor is a bare QEMU boot of the same kernel and initrd, on the same
machine options, to an init that powers the VM off at once: everything
`pykata run` spends above it is pykata's. Each run measures the floor, a cold
boot and a start restored from a VM template ([factory] enable_template, in a
template directory of the benchmark's own, built before the first run), one
after the other, so all three see the same machine.

    .venv/bin/python -m benchmarks.bench_run [--runs 10]   (from the repository root)

With --vs-initrd OTHER (say, the initrd another branch's `pykata assets
build` made), every run also starts cold and from a template (its own) with
that initrd, in turn with the built one: guest changes compared on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.factory_config import with_factory
from pykata import assets, config
from pykata.host.probes import resolve_accel
from pykata.hypervisor.qemu import VmConfig
from pykata.hypervisor.qemu_args import (
    Basics,
    Cpu,
    KernelBoot,
    Machine,
    Memory,
    RootImage,
    RootPmem,
    render,
)

PHASES = [
    ("process start", "process_start"),
    ("VM launch (QEMU up, QMP ready)", "vm_launch"),
    ("VM boot to agent ready", "vm_boot_to_agent"),
    ("sandbox create (9p mount)", "sandbox_create"),
    ("container create+start", "container_create_start"),
    ("teardown", "teardown"),
    ("whole command", "whole"),
]

_QEMU_SECTION = re.compile(r"(?m)^\[hypervisor\.qemu\]\s*$")
_INITRD_LINE = re.compile(r"(?m)^initrd\s*=.*$")
_DAX_LINE = re.compile(r"(?m)^disable_image_nvdimm\s*=.*$")

# The guest's own marks (GetBootProfile), in order.
GUEST_STEPS = [
    ("kernel started to /init", "guest_init_started"),
    ("/init's mounts, interpreter started", "guest_python_started"),
    ("interpreter up (agent's first line)", "guest_agent_started"),
    ("agent's imports done", "guest_agent_imported"),
    ("agent serving its channel", "guest_agent_listening"),
    ("host's first request", "guest_first_request"),
    ("deferred imports done (warm)", "guest_agent_warm"),
]


def floor_boot(qemu: str, paths: assets.AssetPaths, accel: str, memory: int,
               root: str = "initrd", lapic_period: bool = True) -> float:
    """Seconds for QEMU to boot the kernel and its root (the initrd, or with
    `root="image"` the root image as a virtio-blk disk, or with "image-dax"
    as a DAX device) to an init that reboots at once. With
    `lapic_period` false the kernel is not given its APIC timer period and
    measures it, as every boot did before pykata gave it (the floor the
    issue's targets were set against)."""
    image = paths.image if root.startswith("image") else None
    dax = root == "image-dax"
    vm = VmConfig(name="floor", run_dir=Path("/nonexistent"), qemu_path=qemu,
                  kernel=paths.kernel, initrd=None if image else paths.initrd, image=image,
                  image_dax=dax, accel=accel, memory_mib=memory)
    # busybox `reboot -f` as the very first process: reboot=t and -no-reboot
    # turn it into QEMU exiting. From the image the later init= wins. No `--`
    # before `-f`: QEMU appends the virtio-mmio devices to the command line,
    # and after a `--` they would be init's arguments, leaving the image's
    # disk unregistered and the "floor" a kernel panic.
    first = "init" if image else "rdinit"
    words = vm.kernel_cmdline().split()
    if not lapic_period:
        words = [w for w in words if not w.startswith("pykata.lapic_period=")]
    cmdline = f"{' '.join(words)} {first}=/sbin/reboot -f"
    pmem = RootPmem(image, image.stat().st_size) if image is not None and dax else None
    disk = [] if image is None else (pmem or RootImage(image, "microvm")).args()
    layout = vm.pmem_layout()
    ram = Memory(layout.ram_mib if layout else memory,
                 numa_after_mib=layout.image_mib if layout else 0)
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console"
        args = [qemu, *render([
            Basics(name="pykata-floor"), Machine("microvm", accel, numa_ram=ram.numa),
            Cpu(1, accel), ram, KernelBoot(paths.kernel, vm.initrd, cmdline),
        ]), *disk, "-serial", f"file:{console}"]
        start = time.monotonic()
        subprocess.run(args, check=True, timeout=120, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL)
        took = time.monotonic() - start
        # The kernel prints a panic whatever its log level: a floor that
        # never reached init is no floor.
        text = console.read_text(errors="replace")
        if "Kernel panic" in text or "Restarting system" not in text:
            raise SystemExit(f"the {root} floor boot did not reach its init:\n{text[-2000:]}")
    return took


def pykata_run(timings: Path, config_file: Path | None = None) -> dict[str, float]:
    env = {**os.environ, "PYKATA_TIMINGS": str(timings)}
    if config_file is not None:
        env["PYKATA_CONFIG"] = str(config_file)
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


def template_config(tmp: Path, text: str, name: str = "templates") -> Path:
    """`text` with templates on, kept under `tmp`."""
    path = tmp / f"{name}.toml"
    path.write_text(with_factory(text, enable_template=True, template_path=str(tmp / name)))
    return path


def with_initrd(text: str, initrd: Path) -> str:
    """`text` (a pykata configuration) with its guest initrd set to `initrd`."""
    text = _INITRD_LINE.sub("", text)
    return _QEMU_SECTION.sub(lambda m: f'{m[0]}\ninitrd = "{initrd}"', text, count=1)


def with_disk_image(text: str) -> str:
    """`text` with the root image as a virtio-blk disk instead of DAX."""
    text = _DAX_LINE.sub("", text)
    return _QEMU_SECTION.sub(lambda m: f"{m[0]}\ndisable_image_nvdimm = true", text, count=1)


def _summary(samples: dict[str, list[float]], key: str) -> str:
    values = samples.get(key) or [0.0]
    return (f"{statistics.median(values):6.3f} s ({min(values):.2f}-{max(values):.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--vs-initrd", type=Path, default=None,
                        help="also run with this guest initrd (e.g. another branch's "
                             "`pykata assets build`), in turn with the built one")
    parser.add_argument("--vs-disk", action="store_true",
                        help="also run with the root image as a virtio-blk disk "
                             "(disable_image_nvdimm = true), and print the floors of "
                             "the image both ways")
    args = parser.parse_args()
    cfg = config.load()
    paths = assets.locate()
    accel = resolve_accel(cfg.qemu.accel).value
    text = config.config_path().read_text()
    with tempfile.TemporaryDirectory() as tmp:
        # mode → the configuration it runs with (None: the one in effect).
        modes: dict[str, Path | None] = {
            "cold": None, "template": template_config(Path(tmp), text)}
        if args.vs_initrd is not None:
            other = with_initrd(text, args.vs_initrd.resolve())
            (Path(tmp) / "other.toml").write_text(other)
            modes["cold, vs initrd"] = Path(tmp) / "other.toml"
            modes["template, vs initrd"] = template_config(Path(tmp), other, "other-templates")
        if args.vs_disk:
            disk = with_disk_image(text)
            (Path(tmp) / "disk.toml").write_text(disk)
            modes["cold, image on disk"] = Path(tmp) / "disk.toml"
            modes["template, image on disk"] = template_config(Path(tmp), disk, "disk-templates")
        image_floors: dict[str, list[float]] = {"image-dax": [], "image": []}
        samples: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
        floors: list[float] = []
        floors_measuring: list[float] = []
        # Each template is built by the first start that finds none: not timed.
        for mode, cfg_file in modes.items():
            if mode.startswith("template"):
                pykata_run(Path(tmp) / f"build-{len(mode)}.json", cfg_file)
        for i in range(args.runs):
            floors.append(floor_boot(cfg.qemu.path, paths, accel, cfg.qemu.default_memory))
            floors_measuring.append(floor_boot(cfg.qemu.path, paths, accel,
                                               cfg.qemu.default_memory, lapic_period=False))
            if args.vs_disk:
                for root, found in image_floors.items():
                    found.append(floor_boot(cfg.qemu.path, paths, accel,
                                            cfg.qemu.default_memory, root=root))
            for n, (mode, cfg_file) in enumerate(modes.items()):
                phases = pykata_run(Path(tmp) / f"{n}-{i}.json", cfg_file)
                for key, value in phases.items():
                    samples[mode].setdefault(key, []).append(value)
            print(f"run {i + 1}/{args.runs}: "
                  + ", ".join(f"{m} {samples[m]['whole'][-1]:.2f} s" for m in modes)
                  + f", floor {floors[-1]:.2f} s", file=sys.stderr)
    print(f"\npykata run -- true, built-in busybox image, accel={accel}, "
          f"median of {args.runs} runs (min-max):")
    print(f"  initrd: {paths.initrd}")
    if args.vs_initrd is not None:
        print(f"  vs initrd: {args.vs_initrd}")
    print()
    width = max(len(label) for label, _ in PHASES)
    print(f"  {'':<{width}}" + "".join(f"  {m:<22}" for m in modes))
    for label, key in PHASES:
        print(f"  {label:<{width}}" + "".join(f"  {_summary(samples[m], key):<22}"
                                               for m in modes))
    print("  (from a template, 'VM launch' includes loading the saved state, and")
    print("   'boot to agent ready' is the agent's first answer plus the clock and reseed)")
    colds = [m for m in modes if m.startswith("cold")]
    guest = [(label, key) for label, key in GUEST_STEPS if samples["cold"].get(key)]
    if guest:
        print("\n  in the guest, cold boot (its clock, 0 = its kernel's start; medians, "
              "+ the step's own time):")
        guest_width = max(len(label) for label, _ in guest)
        print(f"    {'':<{guest_width}}" + "".join(f"  {m:<22}" for m in colds))
        previous = dict.fromkeys(colds, 0.0)
        for label, key in guest:
            cells = []
            for m in colds:
                if not samples[m].get(key):  # a guest that has no such step
                    cells.append("  -".ljust(24))
                    continue
                at = statistics.median(samples[m][key])
                cells.append(f"  at {at:6.3f} s (+{at - previous[m]:.3f})".ljust(24))
                previous[m] = at
            print(f"    {label:<{guest_width}}" + "".join(cells))
    floor = statistics.median(floors)
    before = statistics.median(floors_measuring)
    print(f"\n  {'floor: bare QEMU boot to /init':<{width}}  {floor:6.3f} s"
          f"   ({min(floors):.3f}-{max(floors):.3f})")
    print(f"  {'floor, the kernel measuring its APIC':<{width}}  {before:6.3f} s"
          f"   ({min(floors_measuring):.3f}-{max(floors_measuring):.3f})"
          "   (the initrd's floor before pykata.lapic_period)")
    for root, found in image_floors.items():
        if found:
            label = {"image-dax": "floor, the image as DAX (pmem)",
                     "image": "floor, the image as a disk"}[root]
            print(f"  {label:<{width}}  {statistics.median(found):6.3f} s"
                  f"   ({min(found):.3f}-{max(found):.3f})")
    for mode in modes:
        whole = statistics.median(samples[mode]["whole"])
        print(f"  {'whole command / floor, ' + mode:<{width}}  {whole / floor:6.2f}x"
              f"   ({whole - floor:+.3f} s);  / the floor before: {whole / before:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
