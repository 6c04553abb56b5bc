"""`pykata monitor`: serve Prometheus metrics for every pod on the node."""

from __future__ import annotations

import argparse
import os
import sys

from pykata.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pykata.metrics.collector import REUSE_SECONDS
    from pykata.metrics.scrape import DEFAULT_POD_TIMEOUT
    from pykata.metrics.server import DEFAULT_LISTEN

    p = sub.add_parser("monitor", help="serve Prometheus metrics for every pod on the node")
    p.add_argument("--listen", metavar="ADDR:PORT", default=DEFAULT_LISTEN,
                   help=f"where to serve /metrics and /sandboxes (default {DEFAULT_LISTEN}; "
                        "the figures name every pod: keep it on loopback unless a "
                        "firewall guards it)")
    p.add_argument("--pod-timeout", metavar="SECONDS", type=float,
                   default=DEFAULT_POD_TIMEOUT,
                   help="how long a scrape waits for each pod before skipping it "
                        f"(default {DEFAULT_POD_TIMEOUT})")
    p.add_argument("--no-guest", action="store_true",
                   help="leave out the guests' figures (pykata_guest_*, pykata_agent_*): "
                        "no agent call per scrape, the host's figures only")
    p.add_argument("--reuse-seconds", metavar="SECONDS", type=float,
                   default=REUSE_SECONDS,
                   help="how long a scrape's figures answer the requests after it: "
                        "requests sooner cost no scrape (default "
                        f"{REUSE_SECONDS:g}; 0 scrapes per request, one at a time)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pykata import config as config_mod
    from pykata.errors import PykataError
    from pykata.metrics.server import is_wildcard, serve
    from pykata.runtime.staleness import GuestAssets, current_assets

    cfg = config_mod.load(args.config)

    def assets() -> GuestAssets | None:
        try:
            return current_assets(cfg)
        except PykataError:
            return None  # no current assets: every pod's are "unknown"

    if not 0 < args.pod_timeout <= 60:
        raise ConfigError(f"--pod-timeout {args.pod_timeout} is out of range",
                          hint="give a number of seconds above 0 and at most 60")

    if not 0 <= args.reuse_seconds <= 60:
        raise ConfigError(f"--reuse-seconds {args.reuse_seconds} is out of range",
                          hint="give a number of seconds from 0 to 60")

    if os.geteuid() != 0:
        # Not fatal: a user's own run root (PYKATA_RUN_ROOT) may hold pods it owns.
        print("pykata monitor: warning: not running as root: the pods' control sockets "
              "(0600, root's) will not answer; run it as root (deploy/pykata-monitor.service)",
              file=sys.stderr)

    if is_wildcard(args.listen):
        print(f"pykata monitor: warning: --listen {args.listen} is every address of the "
              "node: anyone who reaches it reads every pod's ids, pids and figures; "
              "listen on loopback, or let a firewall admit only Prometheus",
              file=sys.stderr)

    def ready(address: tuple[str, int]) -> None:
        print(f"pykata monitor: serving http://{address[0]}:{address[1]}/metrics",
              file=sys.stderr, flush=True)

    serve(args.listen, pod_timeout=args.pod_timeout, guest=not args.no_guest,
          assets=assets, reuse_seconds=args.reuse_seconds, ready=ready)
    return 0
