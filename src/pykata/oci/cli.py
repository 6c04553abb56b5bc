"""`pykata-oci`: runc's verbs and flags, over pykata's monitor.

Verbs import what they need when they run: `state` (which podman calls
often) reads one file and needs neither asyncio nor protobuf.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pykata import __version__
from pykata.errors import PykataError
from pykata.oci.store import Store, default_root
from pykata.spec_fields import MAX_VERSION

VERSION_TEXT = (f"pykata-oci version {__version__}\ncommit: pykata-{__version__}\n"
                f"spec: {MAX_VERSION}")


class UsageError(PykataError):
    """A verb or flag that runc would not take either."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pykata-oci", description=(
        "The runc-compatible command line of pykata: each container runs in its own VM. "
        "docker and podman call it as they call runc."))
    p.add_argument("--version", "-v", action="store_true", help="print the version")
    p.add_argument("--root", default="",
                   help="where container state is kept (default /run/pykata/oci)")
    p.add_argument("--log", default="", help="log file (errors go here, not to stderr)")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("--systemd-cgroup", action="store_true",
                   help="linux.cgroupsPath is in systemd's slice:prefix:name form")
    p.add_argument("--rootless", default="auto", help="accepted (pykata runs as root)")
    p.add_argument("--criu", default="", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", parser_class=_Parser)

    def create_flags(c: argparse.ArgumentParser) -> None:
        c.add_argument("--bundle", "-b", default="", help="the bundle (default: .)")
        c.add_argument("--console-socket", default="", help="unix socket for the pty master")
        c.add_argument("--pid-file", default="", help="write the container's host pid here")
        c.add_argument("--no-pivot", action="store_true", help="accepted")
        c.add_argument("--no-new-keyring", action="store_true", help="accepted")
        c.add_argument("--preserve-fds", type=int, default=0,
                       help="only 0: descriptors cannot cross into a VM")
        c.add_argument("id")

    create_flags(sub.add_parser("create", help="create a container"))
    run = sub.add_parser("run", help="create and start a container")
    create_flags(run)
    run.add_argument("--detach", "-d", action="store_true")
    run.add_argument("--keep", action="store_true", help="do not delete it after it exits")
    for verb in ("start", "pause", "resume"):
        sub.add_parser(verb, help=f"{verb} a container").add_argument("id")
    state = sub.add_parser("state", help="print a container's state as JSON")
    state.add_argument("id")
    kill = sub.add_parser("kill", help="send a signal to a container's process")
    kill.add_argument("--all", "-a", action="store_true", help="signal every process")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    delete = sub.add_parser("delete", help="delete a container")
    delete.add_argument("--force", "-f", action="store_true")
    delete.add_argument("id")
    ex = sub.add_parser("exec", help="run a process in a running container")
    ex.add_argument("--process", "-p", default="", help="process.json")
    ex.add_argument("--tty", "-t", action="store_true")
    ex.add_argument("--detach", "-d", action="store_true")
    ex.add_argument("--pid-file", default="")
    ex.add_argument("--console-socket", default="")
    ex.add_argument("--env", "-e", action="append", default=[])
    ex.add_argument("--cwd", default="")
    ex.add_argument("--user", "-u", default="")
    ex.add_argument("--additional-gids", "-g", action="append", default=[])
    ex.add_argument("--cap", "-c", action="append", default=[])
    ex.add_argument("--no-new-privs", action="store_true")
    ex.add_argument("--preserve-fds", type=int, default=0)
    ex.add_argument("--process-label", default="")
    ex.add_argument("--apparmor", default="")
    ex.add_argument("--cgroup", default="")
    ex.add_argument("--ignore-paused", action="store_true")
    ex.add_argument("id")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ps = sub.add_parser("ps", help="the container's processes")
    ps.add_argument("--format", "-f", default="table", choices=("table", "json"))
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    for name in ("list", "ls"):
        ls = sub.add_parser(name, help="list containers")
        ls.add_argument("--format", "-f", default="table", choices=("table", "json"))
        ls.add_argument("--quiet", "-q", action="store_true")
    ev = sub.add_parser("events", help="the container's statistics")
    ev.add_argument("--stats", action="store_true", help="print them once")
    ev.add_argument("--interval", default="5s")
    ev.add_argument("id")
    up = sub.add_parser("update", help="change a container's cgroup limits")
    up.add_argument("--resources", "-r", default="", help="LinuxResources JSON file, or -")
    up.add_argument("--memory", default="")
    up.add_argument("--memory-swap", default="")
    up.add_argument("--pids-limit", type=int, default=None)
    up.add_argument("--cpu-shares", type=int, default=None)
    up.add_argument("--cpu-quota", type=int, default=None)
    up.add_argument("--cpu-period", type=int, default=None)
    up.add_argument("--cpuset-cpus", default="")
    up.add_argument("id")
    spec = sub.add_parser("spec", help="write a default config.json")
    spec.add_argument("--bundle", "-b", default="")
    spec.add_argument("--rootless", action="store_true")
    sub.add_parser("features", help="what this runtime supports, as JSON")
    for verb in ("checkpoint", "restore"):
        sub.add_parser(verb, help="not supported for VMs").add_argument("rest", nargs="*")
    return p


# --- output -----------------------------------------------------------------


class Output:
    """Where errors and debug lines go: the --log file when one is given
    (runc's callers read the last error line there; stderr may be the
    container's own stderr), else stderr."""

    def __init__(self, log: str, log_format: str) -> None:
        self.log = log
        self.json = log_format == "json"
        if log:
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                os.close(fd)
            except OSError as exc:
                print(f"pykata-oci: cannot open log file {log}: {exc.strerror}", file=sys.stderr)
                self.log = ""

    def line(self, level: str, message: str) -> None:
        if not self.log:
            print(f"pykata-oci: {message}", file=sys.stderr)
            return
        from pykata.runtime.state import rfc3339

        now = rfc3339(time.time())
        if self.json:
            text = json.dumps({"level": level, "msg": message, "time": now})
        else:
            text = f'time="{now}" level={level} msg={json.dumps(message)}'
        with open(self.log, "a") as f:
            f.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Output(*_early_log_flags(argv))
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            print(VERSION_TEXT)
            return 0
        if not args.verb:
            raise UsageError("no command given", hint="see `pykata-oci --help`")
        if args.debug:
            import logging

            logging.basicConfig(level=logging.DEBUG, filename=args.log or None,
                                format="pykata-oci: %(levelname)s: %(name)s: %(message)s")
        from pykata.oci import verbs

        return verbs.dispatch(args, Store(Path(args.root) if args.root else default_root()))
    except PykataError as exc:
        out.line("error", str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _early_log_flags(argv: list[str]) -> tuple[str, str]:
    """--log and --log-format before parsing, so a usage error is logged too."""
    log, fmt = "", "text"
    for i, arg in enumerate(argv):
        for name in ("--log", "--log-format"):
            value = None
            if arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                if name == "--log":
                    log = value
                else:
                    fmt = value
    return log, fmt


if __name__ == "__main__":
    sys.exit(main())
