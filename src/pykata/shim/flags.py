"""The flags containerd passes the shim binary, parsed as Go's flag package
does (containerd's shims are Go programs, and it calls them so).

On the path of every `start`, which containerd waits for before each
container: it imports only the standard library's basics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
