"""The `pykata` command line: argument parsing and dispatch to one module per verb.

Each verb module exposes `register(subparsers)`, which adds its parser and sets
`handler` to a function taking the parsed arguments and returning an exit code.
Only the module of the verb on the command line is imported: together the verbs
import most of pykata, about 0.15 s that `pykata run` would otherwise spend
before its VM starts. Help, and a command line naming no known verb, load all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pykata import __version__
from pykata.errors import PykataError

# Each verb, in the order help lists them, and the module under pykata.cli that defines it.
VERBS: dict[str, str] = {
    "run": "run_cmd", "check": "check_cmd", "env": "env_cmd", "assets": "assets_cmd",
    "cleanup": "cleanup_cmd", "install": "install_cmd", "factory": "factory_cmd",
    "exec": "exec_cmd", "events": "events_cmd", "collect": "collect_cmd",
    "monitor": "monitor_cmd",
}
# pykata's own options that take a value, so that value is not taken for the verb.
_OPTIONS_WITH_VALUE = frozenset({"--config"})


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb `argv` runs, when it names a known one before any other option
    than pykata's own; None (so every verb is loaded) otherwise."""
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in _OPTIONS_WITH_VALUE:
            skip_value = True
        elif arg == "--debug" or arg.startswith("--config="):
            continue
        elif arg.startswith("-"):
            return None
        else:
            return arg if arg in VERBS else None
    return None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser for `verb` alone, or with None for every verb."""
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
    for name in [verb] if verb is not None else VERBS:
        importlib.import_module(f"pykata.cli.{VERBS[name]}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(verb_of(argv)).parse_args(argv)
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
