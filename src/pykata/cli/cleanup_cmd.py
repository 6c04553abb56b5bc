"""`pykata cleanup`: remove what sandboxes whose owner died left behind.

A `pykata run` killed with SIGKILL takes its VM with it (QEMU dies with its
owner), but its mounts and state directory stay. This finds every sandbox
whose owning process is gone and removes its mounts and directories, the
network namespace a killed pykata-oci monitor left pinned, and every VM
template whose builder died before it was saved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pykata.errors import PykataError
from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import cleanup_host_state, owner_gone, read_sandbox_state
from pykata.runtime.state import StateFileError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cleanup", help="remove state left by sandboxes whose owner died")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(handler=run)


def stale_sandboxes(root: Path | None = None) -> list[SandboxPaths]:
    """Sandboxes under `root` (pykata's run root) whose owning process (the
    runtime, shim or monitor that held the VM) and QEMU are both gone."""
    stale: list[SandboxPaths] = []
    sandboxes = (root or run_root()) / "sandboxes"
    if not sandboxes.is_dir():
        return stale
    for entry in sorted(sandboxes.iterdir()):
        paths = SandboxPaths(entry.name, sandboxes.parent)
        if not paths.state_file.is_file():
            continue
        try:
            state = read_sandbox_state(paths)
        except StateFileError as exc:
            print(f"pykata: skipping {entry}: {exc}")
            continue
        if owner_gone(state):
            stale.append(paths)
    return stale


def run(args: argparse.Namespace) -> int:
    stale = stale_sandboxes()
    for paths in stale:
        print(f"{'would remove' if args.dry_run else 'removing'} sandbox {paths.key} "
              f"({paths.run_dir}, {paths.shared_dir})")
        if not args.dry_run:
            try:
                cleanup_host_state(paths)
            except PykataError as exc:
                print(f"pykata: sandbox {paths.key}: {exc}")
    # After the sandboxes: their redirects were removed through these pins.
    pins = _release_pinned_netns(dry_run=args.dry_run)
    factory = [] if args.dry_run else _factory_leftovers(args.config)
    for line in factory:
        print(line)
    if not stale and not pins and not factory:
        print("nothing to clean up")
    return 0


def _release_pinned_netns(*, dry_run: bool) -> list[Path]:
    """Unpin the network namespaces of pykata-oci containers whose monitor
    was killed (the record stays: `delete` is its caller's to run)."""
    from pykata.oci.store import abandoned_netns, release_netns

    pins = abandoned_netns()
    for pin in pins:
        print(f"{'would release' if dry_run else 'releasing'} the network namespace of "
              f"OCI container {pin.parent.name} ({pin})")
        if not dry_run:
            try:
                release_netns(pin.parent)
            except PykataError as exc:
                print(f"pykata: {pin}: {exc}")
    return pins


def _factory_leftovers(config_file: str | None) -> list[str]:
    """Remove what a killed factory left: templates whose builder died
    part-way (their directory and memory file), the VM cache's socket."""
    from pykata import config as config_mod
    from pykata.factory import cache
    from pykata.factory import template as templates

    cfg = config_mod.load(config_file)
    done = [f"removed the half-built VM template {key}"
            for key in templates.remove_abandoned(templates.template_root(cfg))]
    try:
        if cache.remove_stale_endpoint(cfg):
            done.append(f"removed the socket of a VM cache that is gone ({cache.endpoint(cfg)})")
    except PykataError as exc:
        done.append(f"pykata: {exc}")
    return done
