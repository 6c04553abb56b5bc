"""The `pykata` command line: argument parsing and dispatch to one module per verb.

Each verb module exposes `register(subparsers)`, which adds its parser and sets
`handler` to a function taking the parsed arguments and returning an exit code.
Verb modules are imported here only when their verb runs would cost more than it
saves; for now they are small and imported eagerly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pykata import __version__
from pykata.errors import PykataError


def build_parser() -> argparse.ArgumentParser:
    from pykata.cli import (
        assets_cmd,
        check_cmd,
        cleanup_cmd,
        collect_cmd,
        env_cmd,
        events_cmd,
        exec_cmd,
        factory_cmd,
        install_cmd,
        monitor_cmd,
        run_cmd,
    )

    parser = argparse.ArgumentParser(
        prog="pykata",
        description="Run OCI containers, each pod inside its own lightweight VM.",
    )
    parser.add_argument("--version", action="version", version=f"pykata {__version__}")
    parser.add_argument("--debug", action="store_true", help="log debug messages to stderr")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default /etc/pykata/configuration.toml)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    sub.required = True
    for module in (run_cmd, check_cmd, env_cmd, assets_cmd, cleanup_cmd, install_cmd,
                   factory_cmd, exec_cmd, events_cmd, collect_cmd, monitor_cmd):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="pykata: %(levelname)s: %(name)s: %(message)s" if args.debug
        else "pykata: %(levelname)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
    except PykataError as exc:
        print(f"pykata: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
