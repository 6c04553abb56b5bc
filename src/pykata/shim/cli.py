"""The shim binary's command line: containerd's Go-style flags, then an action.

This module is on the path of every `start`, which containerd waits for before
each container: it imports nothing beyond the standard library's basics, and
each action imports what it needs itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

SHIM_NAME = "containerd-shim-pykata-v2"
RUNTIME_TYPE = "io.containerd.pykata.v2"
_VALUE_FLAGS = {"namespace", "id", "address", "publish-binary", "bundle", "socket", "socket-fd"}
_BOOL_FLAGS = {"debug", "v", "version"}


class UsageError(Exception):
    pass


class ShimFlags:
    """The flags containerd passes (plus `-socket`/`-socket-fd` for the server).

    A plain class: the dataclasses module alone would double the import time
    of `start`.
    """

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.address = ""
        self.publish_binary = ""
        self.bundle = ""
        self.socket = ""
        self.socket_fd = -1
        self.debug = False
        self.version = False
        self.action = ""

    def bundle_dir(self) -> str:
        return self.bundle or os.getcwd()

    def to_args(self) -> list[str]:
        """These flags as arguments for another run of the shim binary."""
        args = ["-namespace", self.namespace, "-id", self.id, "-address", self.address,
                "-publish-binary", self.publish_binary]
        if self.bundle:
            args += ["-bundle", self.bundle]
        if self.debug:
            args.append("-debug")
        return args


def parse(argv: Sequence[str]) -> ShimFlags:
    """Parse flags the way Go's flag package does: `-name value`, `-name=value`,
    `--name`, boolean flags without a value; the first non-flag is the action."""
    flags = ShimFlags()
    items = list(argv)
    while items:
        arg = items.pop(0)
        if not arg.startswith("-") or arg in ("-", "--"):
            flags.action = arg if arg not in ("-", "--") else (items.pop(0) if items else "")
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            setattr(flags, "version" if name == "v" else name, value.lower() != "false")
        elif name in _VALUE_FLAGS:
            if not eq:
                if not items:
                    raise UsageError(f"flag needs an argument: -{name}")
                value = items.pop(0)
            if name == "socket-fd":
                flags.socket_fd = int(value)
            else:
                setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
    return flags


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
