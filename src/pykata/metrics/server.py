"""The monitor's HTTP listener: /metrics (Prometheus' text format) and
/sandboxes (the pods it sees, as JSON). Loopback by default: the figures name
every pod and container on the node."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from pykata.errors import ConfigError
from pykata.metrics.collector import PodCollector
from pykata.metrics.discovery import find_pods, sandbox_entry
from pykata.runtime.staleness import GuestAssets

DEFAULT_LISTEN = "127.0.0.1:8090"

StartResponse = Callable[..., Any]


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT (an IPv6 address in brackets) -> (address, port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not sep or not 0 < number < 65536:
            raise ValueError(port)
    except ValueError:
        raise ConfigError(f"--listen {text!r} is not ADDR:PORT",
                          hint=f"give an IP address and a port, e.g. {DEFAULT_LISTEN}"
                          ) from None
    return host, number


def make_app(root: Path | None = None, pod_timeout: float = 1.0, *, guest: bool = True,
             assets: Callable[[], GuestAssets | None] = lambda: None,
             ) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """`assets`: the guest assets a pod started now would boot (looked up
    per /sandboxes request, so a rebuild shows without a restart)."""
    registry = CollectorRegistry(auto_describe=False)
    # The monitor's own process (process_*, python_gc_*): the node's side.
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(PodCollector(root, pod_timeout, guest=guest))
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/sandboxes":
            current = assets()
            body = json.dumps([sandbox_entry(p, current) for p in find_pods(root)],
                              indent=1).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        body = b"pykata monitor: /metrics (Prometheus), /sandboxes (JSON)\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                          ("Content-Length", str(len(body)))])
        return [body]
    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(listen: str, root: Path | None = None, pod_timeout: float = 1.0, *,
          guest: bool = True, assets: Callable[[], GuestAssets | None] = lambda: None,
          ready: Callable[[tuple[str, int]], None] | None = None) -> None:
    host, port = parse_listen(listen)
    server_class = _IPv6Server if ":" in host else _Server
    try:
        server = make_server(host, port, make_app(root, pod_timeout, guest=guest, assets=assets),
                             server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}",
                          hint="choose another --listen address or port") from exc
    with server:
        if ready is not None:
            ready((str(server.server_address[0]), int(server.server_address[1])))
        server.serve_forever()
