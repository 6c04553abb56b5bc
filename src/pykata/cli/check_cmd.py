"""`pykata check`: what this host supports, and what pykata will use on it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from pykata import config as config_mod
from pykata.errors import PykataError
from pykata.host.probes import probe_vsock, resolve_accel
from pykata.runtime import fs_choice


@dataclass(frozen=True)
class CheckItem:
    name: str
    value: str
    detail: str
    ok: bool = True
    # Works, but wants the user's attention (a pod on old guest assets).
    warn: bool = False


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="check this host and show what pykata will use")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def _qemu(path: str) -> CheckItem:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckItem("qemu", "missing", f"{path}: {exc} (install qemu-system-x86)", False)
    match = re.search(r"version (\S+)", out.stdout)
    return CheckItem("qemu", match.group(1) if match else "unknown", path)


def _assets(q: config_mod.QemuConfig) -> list[CheckItem]:
    from pykata.assets import locate
    from pykata.runtime.guest_files import guest_files

    try:
        paths = locate()
    except PykataError as exc:
        return [CheckItem("guest assets", "missing", str(exc), False)]
    items = [
        CheckItem("guest kernel", paths.kernel_release or "built", str(paths.kernel)),
        CheckItem("guest initrd", "built", str(paths.initrd)),
    ]
    try:
        files = guest_files(q)
    except PykataError as exc:
        items.append(CheckItem("guest root", "missing", str(exc), False))
        return items
    key = "image" if q.image else "initrd" if q.initrd else "guest_root"
    if not files.root_is_image:
        items.append(CheckItem("guest root", "initrd",
                               f"{files.root} (from [hypervisor.qemu] {key})"))
    else:
        items.append(_root_image(files.root, key, files.kernel,
                                 dax=not q.disable_image_nvdimm and q.machine_type == "microvm"))
    return items


def _root_image(image: Path, key: str, kernel: Path, *, dax: bool) -> CheckItem:
    """The root image VMs boot: root's, and writable by nobody else, nor is
    any directory above it (every VM booted from it reads that one file);
    as a DAX device, of a size and for a kernel that can map it."""
    from pykata import rootonly
    from pykata.hypervisor.qemu import dax_root_problem

    problem: object = None
    try:
        problem = rootonly.path_problem(image)
        if problem is None and image.stat().st_mode & 0o222:
            problem = f"{image} has write permission bits"
    except OSError as exc:
        problem = f"{image}: {exc.strerror}"
    if problem is not None:
        return CheckItem("guest root", "image, not read-only", f"{problem}: run `pykata "
                         "assets build --force` as root, or make it root's and read-only", False)
    where = f"{image} (from [hypervisor.qemu] {key})"
    if not dax:
        return CheckItem("guest root", "image, read-only, virtio-blk disk",
                         f"{where}; each guest caches what it reads (disable_image_nvdimm, "
                         "or q35: DAX is microvm's only)")
    unfit = dax_root_problem(image, kernel)
    if unfit is not None:
        return CheckItem("guest root", "image, not usable as DAX", f"{unfit[0]}: {unfit[1]}",
                         False)
    return CheckItem("guest root", "image, read-only, DAX",
                     f"{where}; every guest maps the host's pages of it")


def _networking(cfg: config_mod.Config) -> CheckItem:
    """What a pod's network needs: /dev/net/tun for the taps; vhost-net is a
    faster datapath when present."""
    model = cfg.runtime.internetworking_model
    if model == "none":
        return CheckItem("networking", "none", "internetworking_model = \"none\": loopback only")
    if not Path("/dev/net/tun").exists():
        return CheckItem("networking", "unavailable",
                         "/dev/net/tun does not exist (load the tun module)", False)
    if cfg.qemu.disable_vhost_net:
        datapath = "QEMU datapath (disable_vhost_net)"
    elif Path("/dev/vhost-net").exists():
        datapath = "vhost-net datapath"
    else:
        datapath = "QEMU datapath: /dev/vhost-net does not exist (no vhost_net module)"
    return CheckItem("networking", model, f"taps on /dev/net/tun, {datapath}")


def stale_pods(cfg: config_mod.Config) -> list[CheckItem]:
    """A warning per running pod whose VM boots older guest assets than a
    pod started now would (runtime.staleness)."""
    from pykata.runtime.sandbox_index import list_sandboxes
    from pykata.runtime.staleness import current_assets, staleness

    try:
        current = current_assets(cfg)
    except PykataError:
        return []  # no current assets: the guest assets line says so
    items = []
    for entry in list_sandboxes():
        if entry.state is None or not entry.alive:
            continue
        verdict = staleness(entry.state, current=current)
        if verdict.stale:
            items.append(CheckItem(
                f"pod {entry.id}", "stale",
                f"{verdict.detail}; restart the pod to run the current ones", warn=True))
    return items


def gather(cfg: config_mod.Config) -> list[CheckItem]:
    accel = resolve_accel(cfg.qemu.accel)
    vsock = probe_vsock()
    share = fs_choice.choose(cfg)
    items = [
        CheckItem("acceleration", accel.value, accel.reason),
        CheckItem("agent transport", vsock.value, vsock.reason),
        CheckItem("shared filesystem", share.kind or "refused",
                  share.reason or f"{share.refusal} ({share.hint})", not share.refusal),
        _qemu(cfg.qemu.path),
        CheckItem("machine type", cfg.qemu.machine_type, "from [hypervisor.qemu] machine_type"),
        _networking(cfg),
        *_assets(cfg.qemu),
        CheckItem("root", "yes" if os.geteuid() == 0 else "no",
                  "pykata mounts and starts VMs as root", os.geteuid() == 0),
        CheckItem("configuration", cfg.source, "the file in effect"),
        *stale_pods(cfg),
    ]
    return items


def run(args: argparse.Namespace) -> int:
    items = gather(config_mod.load(args.config))
    if args.json:
        print(json.dumps([asdict(i) for i in items], indent=2))
    else:
        width = max(len(i.name) for i in items)
        for item in items:
            mark = "FAIL" if not item.ok else "WARN" if item.warn else "ok  "
            print(f"{mark} {item.name:<{width}}  {item.value}  ({item.detail})")
    return 0 if all(i.ok for i in items) else 1
