"""`pykata exec SANDBOX_ID [-- CMD ARGS...]`: the debug console, a root
shell (or one command) in a pod's VM, outside its containers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pykata.errors import PykataError
from pykata.host.terminal import raw_terminal
from pykata.runtime.console_client import Stdio, find_pod, run_session


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "exec", help="a debug shell (or one command) in a pod's VM, outside its containers",
        description="Open a shell in the VM of pod SANDBOX_ID, in the VM's own root "
                    "environment (its processes, mounts, /proc, the agent's log at "
                    "/run/pykata/agent.log), or run CMD there and exit with its status. "
                    "The pod must have the debug console enabled ([agent] "
                    "debug_console_enabled, or its allowlisted annotation).")
    p.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the pod's sandbox id")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                   help="command to run instead of a shell")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    terminal = os.isatty(0)
    if not command and not terminal:
        raise PykataError("pykata exec without a command needs a terminal on its stdin",
                          hint="run it from a terminal, or give a command: "
                               f"pykata exec {args.sandbox_id} -- CMD ARGS...")
    state = find_pod(args.sandbox_id)
    stdio = Stdio(0, 1, 2, terminal, os.environ.get("TERM", "") if terminal else "")
    # Restored on the way out, whatever ends the session.
    with raw_terminal(0):
        status = asyncio.run(run_session(state.control_socket, state.id, command, stdio))
    sys.stdout.flush()
    return status

