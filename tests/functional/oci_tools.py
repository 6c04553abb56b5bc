"""Driving `pykata-oci` as runc's callers do: bundles, a subreaper that waits
for the container's pid, and a console socket that receives the pty master."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.assets.busybox_image import ensure_image

OCI = [sys.executable, "-m", "pykata.oci.cli"]
WAITER = Path(__file__).with_name("oci_waiter.py")


@dataclass
class Result:
    returncode: int
    out: str
    err: str


class Oci:
    """`pykata-oci --root ROOT ...` in a child process."""

    def __init__(self, root: Path, log: Path | None = None) -> None:
        self.root = root
        self.log = log

    def argv(self, *args: str) -> list[str]:
        extra = ["--log", str(self.log), "--log-format", "json"] if self.log else []
        return [*OCI, "--root", str(self.root), *extra, *args]

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 180,
                 stdin: Any = subprocess.DEVNULL) -> Result:
        verb = next((a for a in args if not a.startswith("-")), "")
        if verb == "create":
            # The container keeps create's stdio (as with runc): pipes read
            # here would stay open until it exits. Errors are in the log.
            code = subprocess.run(self.argv(*args), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=timeout).returncode
            return Result(code, "", "")
        proc = subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout, stdin=None if input is not None else stdin)
        return Result(proc.returncode, proc.stdout.decode(errors="replace"),
                      proc.stderr.decode(errors="replace"))

    def state(self, cid: str) -> dict[str, Any]:
        result = self("state", cid)
        assert result.returncode == 0, result.err
        data: dict[str, Any] = json.loads(result.out)
        return data


def make_bundle(where: Path, args: list[str], *, terminal: bool = False,
                **changes: Any) -> Path:
    """A bundle with a private copy of the busybox image (containers write to it)."""
    from pykata.runtime.spec import default_spec

    where.mkdir(parents=True, exist_ok=True)
    rootfs = where / "rootfs"
    if not rootfs.exists():
        shutil.copytree(ensure_image(), rootfs, symlinks=True)
    spec = default_spec(args, terminal=terminal)
    for key, value in changes.items():
        if key == "process":
            spec["process"].update(value)
        else:
            spec[key] = value
    (where / "config.json").write_text(json.dumps(spec))
    return where


class Waiter:
    """Runs `create` under a subreaper (tests/functional/oci_waiter.py), as
    containerd's runc shim and conmon do, and reports how the container's
    pid ended: the pid contract seen from the caller's side."""

    def __init__(self, oci: Oci, *args: str, stdin: bytes | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WAITER), json.dumps(oci.argv(*args))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._stdin = stdin
        self.created: dict[str, Any] = {}

    def wait_created(self, timeout: float = 180) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout)
        self.created = json.loads(line) if line else {"error": "waiter died"}
        if self._stdin is not None and self.created.get("rc") == 0:
            threading.Thread(target=self._feed, daemon=True).start()
        elif self.proc.stdin is not None:
            self.proc.stdin.close()
        return self.created

    def _feed(self) -> None:
        assert self.proc.stdin is not None and self._stdin is not None
        try:
            self.proc.stdin.write(self._stdin)
        finally:
            self.proc.stdin.close()

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        """{"status": N, "stdout": "...", "stderr": "..."} once the pid ended."""
        # stdin was handed over (fed, or closed) by wait_created.
        self.proc.stdin = None
        out, err = self.proc.communicate(timeout=timeout)
        lines = out.decode().splitlines()
        result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        result["waiter_err"] = err.decode(errors="replace")
        return result


def _readline(stream: Any, timeout: float) -> bytes:
    box: list[bytes] = []
    t = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else b""


class ConsoleReceiver:
    """A console socket: takes the pty master `create` sends, then lets the
    test type into it and read what the container's terminal prints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.master: int | None = None
        self.name = ""
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        self.name = msg.decode()
        self.master = fds[0] if fds else None

    def wait(self, timeout: float = 180) -> int:
        self._thread.join(timeout)
        assert self.master is not None, "no pty master arrived on the console socket"
        return self.master

    def read_until(self, marker: bytes, timeout: float = 60) -> bytes:
        import select
        import time

        assert self.master is not None
        deadline = time.monotonic() + timeout
        data = b""
        while marker not in data:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {marker!r}; got {data!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
        return data

    def close(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None
        self.sock.close()
