"""What `create` tells the monitor it forks: one record, no parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Launch:
    id: str
    bundle: Path
    spec: dict[str, Any]
    rootfs: Path
    state_dir: Path  # the container's directory under the command line's --root
    config_path: str | None
    debug: bool
    # The container's stdio on the host: (stdin, stdout, stderr) descriptors,
    # or the slave of a pty for all three when `terminal`.
    stdio: tuple[int, int, int]
    terminal: bool
    # A copy of the pty's master (its original went to the console socket):
    # see hostio.wait_read. -1 without a pty.
    pty_master: int = -1
    owner: str = ""
    # --systemd-cgroup: cgroupsPath is in systemd's slice:prefix:name form.
    systemd_cgroup: bool = False
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.state_dir / "monitor.log"
