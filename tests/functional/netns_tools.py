"""Network namespaces the tests make: a pod namespace with a veth whose peer
sits in a second, peer namespace, and a TCP server there. All test traffic
stays inside these two (never the machine's own namespace)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

POD_IP, PEER_IP = "10.231.0.2", "10.231.0.1"
NETNS_DIR = Path("/run/netns")
TAP_SUFFIX = "_pykata"


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def tc(*args: str) -> str:
    return subprocess.run(["tc", *args], capture_output=True, text=True).stdout


@dataclass(frozen=True)
class PodNetns:
    pod: str
    peer: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.pod


@contextlib.contextmanager
def pod_and_peer(tag: str = "") -> Iterator[PodNetns]:
    """A pod namespace (eth0, POD_IP/24, MTU 1400) joined by a veth to a peer
    namespace (PEER_IP/24); both removed afterwards."""
    suffix = f"{tag}{os.getpid()}"
    made = PodNetns(f"pykata-pod-{suffix}", f"pykata-peer-{suffix}")
    ip("netns", "add", made.pod)
    try:
        ip("netns", "add", made.peer)
        try:
            ip("-n", made.pod, "link", "add", "eth0", "mtu", "1400", "type", "veth",
               "peer", "name", "eth0p", "netns", made.peer)
            ip("-n", made.pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
            ip("-n", made.peer, "addr", "add", f"{PEER_IP}/24", "dev", "eth0p")
            for ns, dev in ((made.pod, "eth0"), (made.peer, "eth0p"), (made.pod, "lo"),
                            (made.peer, "lo")):
                ip("-n", ns, "link", "set", dev, "up")
            yield made
        finally:
            ip("netns", "del", made.peer)
    finally:
        ip("netns", "del", made.pod)


@contextlib.contextmanager
def greeting_server(netns: str, address: str = PEER_IP, port: int = 8080,
                    clients: int = 1) -> Iterator[subprocess.Popen[bytes]]:
    """A TCP server in `netns` that answers each of `clients` connections
    with "hello <client address>" and then exits 0."""
    code = ("import socket\n"
            f"s = socket.create_server(({address!r}, {port}))\n"
            "print('listening', flush=True)\n"
            f"for _ in range({clients}):\n"
            "    c, a = s.accept()\n"
            "    c.sendall(('hello ' + a[0] + '\\n').encode())\n"
            "    c.close()\n")
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == b"listening\n", server.stderr.read() \
            if server.stderr else b""
        yield server
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


class SteadyClient:
    """A client in a namespace that connects to a server every few tenths
    of a second and records each exchange: "ok" when the server answered
    `expect`, else what went wrong."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self.results: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.results.append(line.strip())

    def join(self) -> None:
        """Once the client ended: every line it wrote is in `results`."""
        self._reader.join(10)

    @property
    def failures(self) -> list[str]:
        """The exchanges that went wrong once the server had answered (before,
        it may not have been listening yet)."""
        if "ok" not in self.results:
            return list(self.results)
        return [r for r in self.results[self.results.index("ok"):] if r != "ok"]

    def wait_for(self, count: int, timeout: float) -> None:
        """Until `count` exchanges (ok or not) have been recorded."""
        deadline = time.monotonic() + timeout
        while len(self.results) < count:
            assert self._proc.poll() is None, "the client ended"
            assert time.monotonic() < deadline, f"only {self.results} in {timeout:g} s"
            time.sleep(0.05)

    def wait_for_ok(self, timeout: float) -> None:
        """Until the server has answered once (e.g. once a VM is up)."""
        deadline = time.monotonic() + timeout
        while "ok" not in self.results:
            assert self._proc.poll() is None, "the client ended"
            assert time.monotonic() < deadline, f"no answer in {timeout:g} s: {self.results}"
            time.sleep(0.1)


@contextlib.contextmanager
def steady_client(netns: str, address: str, port: int, expect: str) -> Iterator[SteadyClient]:
    """A `SteadyClient` in `netns`, talking to `address`:`port` until the block ends."""
    code = ("import select, socket, sys, time\n"
            "while not select.select([sys.stdin], [], [], 0)[0]:\n"
            "    try:\n"
            f"        with socket.create_connection(({address!r}, {port}), timeout=10) as c:\n"
            "            c.settimeout(10)\n"
            "            got = c.recv(100).decode(errors='replace')\n"
            f"        print('ok' if got == {expect!r} else 'got ' + repr(got), flush=True)\n"
            "    except OSError as e:\n"
            "        print('failed: ' + str(e), flush=True)\n"
            "    time.sleep(0.2)\n")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    client = SteadyClient(proc)
    try:
        yield client
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # its end of file stops the loop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        client.join()


def _another_sessions(name: str) -> bool:
    """A pod_and_peer namespace of another test session that still runs (its
    name ends in that session's pid): its pods are not this one's leaks."""
    if not name.startswith(("pykata-pod-", "pykata-peer-")):
        return False
    digits = name[len(name.rstrip("0123456789")):]
    return bool(digits) and int(digits) != os.getpid() and Path(f"/proc/{digits}").exists()


def network_leftovers() -> list[str]:
    """pykata's taps and tc ingress qdiscs still present in test namespaces."""
    found: list[str] = []
    if not NETNS_DIR.is_dir():
        return found
    for entry in sorted(NETNS_DIR.iterdir()):
        if not entry.name.startswith("pykata-") or _another_sessions(entry.name):
            continue
        links = subprocess.run(["ip", "-n", entry.name, "-o", "link", "show"],
                               capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.endswith(TAP_SUFFIX):
                found.append(f"tap: {name} in netns {entry.name}")
        for line in tc("-n", entry.name, "qdisc", "show").splitlines():
            if line.startswith("qdisc ingress"):
                found.append(f"tc: {line.strip()} in netns {entry.name}")
    return found
