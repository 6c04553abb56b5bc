"""Benchmark: what the agent's imports cost in the guest, module by module.

Boots the built kernel and initrd (the ones `pykata run` uses) with the
guest's own interpreter as the first process, `python3 -X importtime`
importing what the agent imports before it serves (pykata.agent.main), and
prints the modules whose imports cost the most, medians over the boots, and
which protobuf backend the guest's interpreter loaded. A measuring boot of its
own: /init and the agent are not changed for it.

    .venv/bin/python -m benchmarks.bench_guest_imports [--boots 3] [--top 25]
        [--vs-initrd OTHER_INITRD]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
from pathlib import Path

from pykata import assets, config
from pykata.assets.initrd_plan import GUEST_LIB
from pykata.host.probes import resolve_accel
from pykata.hypervisor.qemu import VmConfig
from pykata.hypervisor.qemu_args import Basics, Cpu, KernelBoot, Machine, Memory, render

AGENT_MAIN = "pykata.agent.main"
UPB = "google._upb._message"
# What the guest runs, as /bin/busybox's arguments after the kernel's `--`:
# no double quote inside (the kernel's own quoting) and no '=' outside it
# (the kernel would take the word for an environment variable). devtmpfs for
# /dev/urandom, which the interpreter's hash seed needs this early in a boot.
# sys.path is set by the code, as -I ignores PYTHONPATH.
GUEST_CODE = (
    "import sys;sys.path.insert(0,sys.argv[1]);"
    f"import {AGENT_MAIN};"
    "from google.protobuf.internal import api_implementation as a;"
    "print(sys.argv[2],a.Type(),sys.argv[3] in sys.modules)"
)
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def guest_importtime(qemu: str, paths: assets.AssetPaths, accel: str, memory: int,
                     flags: str) -> tuple[dict[str, tuple[int, int, int]], str]:
    """One boot: module → (self µs, cumulative µs, depth), and the backend line."""
    vm = VmConfig(name="imports", run_dir=Path("/nonexistent"),
                  qemu_path=qemu, kernel=paths.kernel, initrd=paths.initrd, accel=accel,
                  memory_mib=memory)
    script = (f"/bin/busybox mount -t devtmpfs dev /dev; exec /usr/bin/python3 {flags} "
              f"-X importtime -c '{GUEST_CODE}' {GUEST_LIB} PROTOBUF-BACKEND {UPB}")
    cmdline = f'{vm.kernel_cmdline()} rdinit=/bin/busybox -- sh -c "{script}"'
    args = [qemu, *render([
        Basics(name="pykata-imports"), Machine("microvm", accel), Cpu(1, accel), Memory(memory),
        KernelBoot(paths.kernel, paths.initrd, cmdline),
    ]), "-serial", "stdio"]
    # The interpreter's exit is init's: the kernel panics, panic=-1 reboots,
    # and -no-reboot ends QEMU.
    proc = subprocess.run(args, timeout=300, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", check=False)
    found: dict[str, tuple[int, int, int]] = {}
    backend = ""
    for line in proc.stdout.splitlines():
        if (m := _LINE.search(line)) is not None:
            found[m[4]] = (int(m[1]), int(m[2]), len(m[3]) // 2)
        elif "PROTOBUF-BACKEND" in line:
            _, kind, loaded = line[line.index("PROTOBUF-BACKEND"):].split()[:3]
            backend = f"{kind} ({UPB} loaded: {loaded})"
    if not found:
        raise SystemExit(f"no import times on the guest's console:\n{proc.stdout[-3000:]}")
    return found, backend


def report(label: str, boots: list[dict[str, tuple[int, int, int]]], backends: set[str],
           top: int) -> None:
    names = set().union(*boots)
    rows = []
    for name in names:
        selfs = [b[name][0] for b in boots if name in b]
        cums = [b[name][1] for b in boots if name in b]
        depth = next(b[name][2] for b in boots if name in b)
        rows.append((name, statistics.median(selfs), statistics.median(cums), depth))
    total = statistics.median(sum(v[0] for v in b.values()) for b in boots)
    print(f"\n{label}")
    print(f"  modules imported: {statistics.median(len(b) for b in boots):.0f}, "
          f"sum of self times {total / 1e6:.3f} s")
    print(f"  protobuf backend in the guest: {' / '.join(sorted(backends))}")
    print(f"  top {top} by self time:")
    for name, own, cum, _ in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"    {own / 1000:8.1f} ms self  {cum / 1000:8.1f} ms cumulative  {name}")
    print("  top-level imports (depth 0) by cumulative time:")
    for name, _, cum, _ in sorted((r for r in rows if r[3] == 0), key=lambda r: -r[2])[:top]:
        print(f"    {cum / 1000:8.1f} ms  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--initrd", type=Path, default=None,
                        help="this initrd instead of the built one")
    parser.add_argument("--vs-initrd", type=Path, default=None,
                        help="also boot this initrd (another branch's), in turn with the first")
    parser.add_argument("--flags", default="-S",
                        help="the interpreter's flags (default: %(default)s, as /init's)")
    args = parser.parse_args()
    cfg = config.load()
    built = assets.locate()
    initrds = [args.initrd or built.initrd]
    if args.vs_initrd is not None:
        initrds.append(args.vs_initrd)
    accel = resolve_accel(cfg.qemu.accel).value
    boots: dict[Path, list[dict[str, tuple[int, int, int]]]] = {i: [] for i in initrds}
    backends: dict[Path, set[str]] = {i: set() for i in initrds}
    for n in range(args.boots):
        for initrd in initrds:  # in turn: both see the same machine
            paths = dataclasses.replace(built, initrd=initrd)
            found, backend = guest_importtime(cfg.qemu.path, paths, accel,
                                              cfg.qemu.default_memory, args.flags)
            boots[initrd].append(found)
            backends[initrd].add(backend)
            print(f"boot {n + 1}/{args.boots} {initrd}: {len(found)} modules, "
                  f"{found.get(AGENT_MAIN, (0, 0))[1] / 1e6:.3f} s", file=sys.stderr)
    for initrd in initrds:
        report(f"guest imports of {AGENT_MAIN} (python3 {args.flags} -X importtime), "
               f"accel={accel}, initrd {initrd}, median of {args.boots} boots",
               boots[initrd], backends[initrd], args.top)
    if len(initrds) == 2:
        print(f"\n{AGENT_MAIN} imported in (cumulative, medians):")
        for initrd in initrds:
            cum = statistics.median(b[AGENT_MAIN][1] for b in boots[initrd])
            print(f"  {cum / 1e6:6.3f} s  {initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
