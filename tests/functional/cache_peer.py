"""A VM cache for the tests: `pykata factory init` in the foreground, as its
systemd unit runs it, with a configuration of the test's own."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pykata import config
from pykata.factory import cache
from pykata.runtime.paths import run_root


@dataclass
class RunningCache:
    proc: subprocess.Popen[bytes]
    config_file: Path
    config: config.Config

    def status(self) -> dict[str, object]:
        return asyncio.run(cache.ask(self.config, "status"))


def warm_sandboxes() -> list[str]:
    sandboxes = run_root() / "sandboxes"
    return sorted(p.name for p in sandboxes.glob("warm-*")) if sandboxes.is_dir() else []


def warm_qemus() -> list[str]:
    """The QEMUs of this test session's warm VMs: a VM handed out keeps its
    warm name, but its directory is its pod's."""
    out = subprocess.run(["pgrep", "-a", "-f", "qemu-system.*-name pykata-warm-"],
                         capture_output=True, text=True).stdout
    warm = set(warm_sandboxes())
    return [line for line in out.splitlines() if f"path={run_root()}/" in line
            and line.split("-name pykata-", 1)[1].split()[0] in warm]


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextmanager
def running_cache(tmp_path: Path, *, count: int, template: bool,
                  base_text: str | None = None) -> Iterator[RunningCache]:
    """A cache keeping `count` warm VMs (restored from a template, or booted),
    ready; stopped (SIGTERM) and its templates destroyed afterwards.
    `base_text`: the configuration to start from (the packaged one)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "pykata.toml"
    conf.write_text((base_text or config.DEFAULT_CONFIG.read_text()).replace(
        'enable_template = false', f'enable_template = {str(template).lower()}').replace(
        'template_path = ""', f'template_path = "{tmp_path}/templates"').replace(
        'vm_cache_number = 0', f'vm_cache_number = {count}').replace(
        'vm_cache_endpoint = ""', f'vm_cache_endpoint = "{tmp_path}/cache.sock"'))
    proc = subprocess.Popen([sys.executable, "-m", "pykata.cli.main", "--config", str(conf),
                             "factory", "init"], stdin=subprocess.DEVNULL)
    running = RunningCache(proc, conf, config.load(conf))

    def ready() -> bool:
        assert proc.poll() is None, "the factory exited"
        try:
            return running.status().get("ready") == count
        except Exception:
            return False

    try:
        wait(ready, 120, f"{count} warm VMs")
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        # A killed cache's warm VMs end by themselves (their guests power
        # off); their directories are `pykata cleanup`'s.
        wait(lambda: not warm_qemus(), 60, "the warm VMs to end")
        subprocess.run([sys.executable, "-m", "pykata.cli.main", "--config", str(conf),
                        "cleanup"], capture_output=True, check=True)
        assert not warm_sandboxes(), warm_sandboxes()
        subprocess.run([sys.executable, "-m", "pykata.cli.main", "--config", str(conf),
                        "factory", "destroy"], capture_output=True, check=True)
