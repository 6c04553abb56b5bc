"""`pykata assets build|status`: build the guest kernel and initrd, or show what is built."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pykata import assets


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "assets",
        help="build or inspect the guest kernel and initrd",
        description="Build or inspect the guest kernel and initrd every pykata VM boots.",
    )
    sub = parser.add_subparsers(dest="assets_verb", metavar="ACTION")
    sub.required = True

    build = sub.add_parser(
        "build",
        help="build what is missing or out of date",
        description=f"Build the guest assets into {assets.default_cache_dir()} "
        f"(${assets.ENV_CACHE_DIR} overrides). Up-to-date assets are kept.",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    only = build.add_mutually_exclusive_group()
    only.add_argument("--kernel-only", action="store_true", help="build only the kernel")
    only.add_argument("--initrd-only", action="store_true", help="build only the initrd")
    build.set_defaults(handler=run_build)

    status = sub.add_parser("status", help="show what is built, missing or stale")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=run_status)


def run_build(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, flush=True)

    if args.kernel_only:
        assets.build_kernel(force=args.force, progress=progress)
    elif args.initrd_only:
        assets.build_initrd(force=args.force, progress=progress)
    else:
        paths = assets.build(force=args.force, log=progress)
        print(
            f"guest assets ready: kernel {paths.kernel} ({paths.kernel_release}), "
            f"initrd {paths.initrd}"
        )
    return 0


def run_status(args: argparse.Namespace) -> int:
    rows = assets.status()
    if args.json:
        json.dump([row.to_json() for row in rows], sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows))
    return 0 if all(row.state is assets.AssetState.BUILT for row in rows) else 1


def format_table(rows: list[assets.AssetStatus]) -> str:
    header = ("KIND", "STATE", "SIZE", "PATH", "KEY", "BUILT-AT")
    table = [header]
    notes = []
    for row in rows:
        table.append(
            (
                row.kind,
                row.state.value,
                human_size(row.size),
                str(row.path) if row.path else "-",
                row.key or "-",
                row.built_at or "-",
            )
        )
        if row.kernel_release:
            notes.append(f"{row.kind}: release {row.kernel_release}")
        if row.detail:
            notes.append(f"{row.kind}: {row.detail}")
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines + notes)


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
