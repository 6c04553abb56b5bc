"""The monitor's HTTP listener: /metrics (Prometheus' text format) and
/sandboxes (the pods it sees, as JSON). Loopback by default: the figures name
every pod and container on the node, and every local user can read them.

Whoever reaches the listener can make the monitor work, so the work is
bounded: a scrape's figures answer every request for a second after it
(`collector.REUSE_SECONDS`), the current guest assets are looked up once a
second at most, a connection has `REQUEST_SECONDS` to send its request and
at most `MAX_CONNECTIONS` are served at once (the others are answered 503).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from pykata.errors import ConfigError
from pykata.metrics.collector import REUSE_SECONDS, PodCollector
from pykata.metrics.discovery import find_pods, sandbox_entry
from pykata.runtime.staleness import GuestAssets

DEFAULT_LISTEN = "127.0.0.1:8090"
# A connection's time to send its request and read the answer.
REQUEST_SECONDS = 10.0
# Requests served at once (a thread each); Prometheus needs one.
MAX_CONNECTIONS = 16
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Connection: close\r\n\r\npykata monitor: too many connections, try again\n")

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


def is_wildcard(listen: str) -> bool:
    """Whether `listen` (ADDR:PORT) is every address of the node (0.0.0.0, ::)."""
    return ipaddress.ip_address(parse_listen(listen)[0]).is_unspecified


class _Recent:
    """`lookup()`'s answer, looked up again once it is `seconds` old."""

    def __init__(self, lookup: Callable[[], GuestAssets | None], seconds: float) -> None:
        self._lookup = lookup
        self._seconds = seconds
        self._lock = threading.Lock()
        self._last: tuple[float, GuestAssets | None] | None = None

    def __call__(self) -> GuestAssets | None:
        with self._lock:
            if self._last is None or time.monotonic() - self._last[0] >= self._seconds:
                self._last = (time.monotonic(), self._lookup())
            return self._last[1]


def make_app(root: Path | None = None, pod_timeout: float = 1.0, *, guest: bool = True,
             assets: Callable[[], GuestAssets | None] = lambda: None,
             reuse_seconds: float = REUSE_SECONDS,
             ) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """`assets`: the guest assets a pod started now would boot (looked up
    again after `reuse_seconds`, so a rebuild shows without a restart; the
    lookup hashes files, tens of ms of root's CPU).
    `reuse_seconds`: how long a scrape's figures answer /metrics."""
    registry = CollectorRegistry(auto_describe=False)
    # The monitor's own process (process_*, python_gc_*): the node's side.
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(PodCollector(root, pod_timeout, guest=guest,
                                   reuse_seconds=reuse_seconds))
    metrics = make_wsgi_app(registry)
    assets = _Recent(assets, reuse_seconds)

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
    # Not kept for server_close() to join: the cap bounds them instead.
    block_on_close = False
    # Connections waiting to be accepted (and answered, or told 503).
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Full: answered here, without a thread; the client retries.
            try:
                # What the client sent so far is read first: closing with it
                # unread would reset the connection, losing the answer.
                request.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    request.recv(65536)
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or hung up is not news; anything else is.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # The socket's timeout: a client that sends half a request, or stops
    # reading, is dropped rather than holding its thread.
    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass


def listener(listen: str, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
             ) -> WSGIServer:
    """The bound HTTP server for `app` (not serving yet)."""
    host, port = parse_listen(listen)
    server_class = _IPv6Server if ":" in host else _Server
    try:
        return make_server(host, port, app, server_class=server_class,
                           handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}",
                          hint="choose another --listen address or port") from exc


def serve(listen: str, root: Path | None = None, pod_timeout: float = 1.0, *,
          guest: bool = True, assets: Callable[[], GuestAssets | None] = lambda: None,
          reuse_seconds: float = REUSE_SECONDS,
          ready: Callable[[tuple[str, int]], None] | None = None) -> None:
    app = make_app(root, pod_timeout, guest=guest, assets=assets, reuse_seconds=reuse_seconds)
    with listener(listen, app) as server:
        if ready is not None:
            ready((str(server.server_address[0]), int(server.server_address[1])))
        server.serve_forever()
