"""What the monitor's tests and benchmark drive: `pykata monitor` and a real
Prometheus server (Debian's `prometheus`), each on a free loopback port,
with its own configuration and storage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMETHEUS = "/usr/bin/prometheus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        data: bytes = reply.read()
        return data


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """`check()`'s first truthy value within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


class Monitor:
    """`pykata monitor --listen 127.0.0.1:<free port>` in a child process
    (it inherits the session's PYKATA_RUN_ROOT)."""

    def __init__(self, pod_timeout: float = 1.0, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pykata.cli.main", "monitor",
             "--listen", f"127.0.0.1:{self.port}", "--pod-timeout", str(pod_timeout),
             *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        assert "serving" in line, f"pykata monitor did not start: {line}"

    def metrics(self) -> str:
        return http_get(f"{self.url}/metrics").decode()

    def sandboxes(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(http_get(f"{self.url}/sandboxes"))
        return data

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Prometheus:
    """A real Prometheus scraping `target` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        if not os.access(PROMETHEUS, os.X_OK):
            raise AssertionError(f"{PROMETHEUS} is missing: run ./scripts/install-deps")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: pykata\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("prometheus ready", lambda: http_get(f"{self.url}/-/ready"), 60)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of `promql` now (its samples' labels and values)."""
        reply = json.loads(http_get(
            f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"))
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.workdir / "data", ignore_errors=True)
