"""The shim binary's command line: containerd's Go-style flags, then an action.

This module is on the path of every `start`, which containerd waits for before
each container: it imports nothing beyond the standard library's basics, and
each action imports what it needs itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pykata.channels import RUNTIME_TYPE, SHIM_NAME
from pykata.shim.flags import UsageError, parse


def main(argv: Sequence[str] | None = None) -> int:
    try:
        flags = parse(sys.argv[1:] if argv is None else argv)
    except (UsageError, ValueError) as exc:
        print(f"{SHIM_NAME}: {exc}", file=sys.stderr)
        return 2
    if flags.version:
        from pykata import __version__

        print(f"{SHIM_NAME}:\n  Version:  {__version__}\n  Runtime:  {RUNTIME_TYPE}")
        return 0
    if flags.action == "start":
        from pykata.shim.start import start

        return start(flags)
    if flags.action == "delete":
        from pykata.shim.cleanup import delete

        return delete(flags)
    if flags.action == "serve":
        from pykata.shim.server import serve

        return serve(flags)
    print(f"{SHIM_NAME}: unknown action {flags.action!r} (start, delete)", file=sys.stderr)
    return 2
