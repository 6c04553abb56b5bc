"""A private containerd for the tests: its own root, state, socket and image store.

It runs Debian's containerd 1.6 with the CRI plugin off, finds
`containerd-shim-pykata-v2` on its PATH (this virtualenv's bin directory), and
passes PYKATA_CONFIG to the shims so a test can change pykata's configuration.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pykata.assets.busybox_image import write_oci_archive

IMAGE = "docker.io/pykata/busybox:test"
RUNTIME = "io.containerd.pykata.v2"
NAMESPACE = "pykata-test"

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
]
[grpc]
  address = "{socket}"
[debug]
  level = "debug"
"""


@dataclass
class CtrResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


class PrivateContainerd:
    def __init__(self, base: Path, pykata_config: Path) -> None:
        self.base = base
        self.socket = base / "containerd.sock"
        self.state = base / "state"
        self.log = base / "containerd.log"
        self.pykata_config = pykata_config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.base / "config.toml"
        config.write_text(_CONFIG.format(root=self.base / "root", state=self.state,
                                         socket=self.socket))
        env = {**os.environ,
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               "PYKATA_CONFIG": str(self.pykata_config)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)], env=env,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self.ctr("version").returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"containerd did not start; see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Snapshots containerd mounted for tasks are gone with the tasks; make
        # sure nothing of this containerd stays mounted.
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f if str(self.base) in line.split()[4]]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "-n", NAMESPACE, *args]

    def ctr(self, *args: str, input: bytes | None = None, timeout: float = 180) -> CtrResult:
        proc = subprocess.run(
            self.ctr_argv(*args), input=input, capture_output=True, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return CtrResult(proc.returncode, proc.stdout, proc.stderr)

    def import_busybox(self) -> None:
        archive = write_oci_archive(self.base / "busybox-oci.tar", IMAGE)
        result = self.ctr("image", "import", str(archive))
        if result.returncode != 0:
            raise RuntimeError(f"ctr image import failed: {result.err}")

    def run(self, container_id: str, *cmd: str, extra: tuple[str, ...] = (),
            input: bytes | None = None, timeout: float = 180) -> CtrResult:
        """`ctr run --rm --runtime io.containerd.pykata.v2 IMAGE ID CMD...`."""
        return self.ctr("run", "--rm", "--runtime", RUNTIME, *extra, IMAGE, container_id, *cmd,
                        input=input, timeout=timeout)

    def task_status(self, container_id: str) -> str:
        """The task's status, "" when containerd has no such task. A failed
        listing (a dead shim's task can make it fail) is not an absence."""
        listing = self.ctr("task", "ls")
        if listing.returncode != 0:
            return "UNLISTED"
        for line in listing.out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return fields[-1]
        return ""

    def remove(self, container_id: str) -> None:
        """Kill, delete and remove a container, whatever state it is in."""
        self.ctr("task", "kill", "-s", "KILL", container_id)
        deadline = time.monotonic() + 60
        while self.task_status(container_id) not in ("STOPPED", "") and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        self.ctr("task", "delete", container_id)
        # containerd forgets a dead shim's task only once its own clean-up
        # (the shim's `delete`) has run; a new task of the same id must wait.
        deadline = time.monotonic() + 60
        while self.task_status(container_id) != "" and time.monotonic() < deadline:
            time.sleep(0.2)
        self.ctr("container", "rm", container_id)

    @contextlib.contextmanager
    def events(self) -> Iterator[EventLog]:
        proc = subprocess.Popen(self.ctr_argv("events"), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            yield EventLog(proc)
        finally:
            proc.kill()
            proc.wait()


class EventLog:
    """The lines `ctr events` prints, read as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        while True:
            try:
                chunk = self.proc.stdout.read()
            except BlockingIOError:
                return
            if not chunk:
                return
            self.lines += chunk.decode(errors="replace").splitlines()

    def wait_for(self, topic: str, container_id: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump()
            for line in self.lines:
                if topic in line and container_id in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no {topic} event for {container_id}; saw:\n" +
                             "\n".join(self.lines[-20:]))
