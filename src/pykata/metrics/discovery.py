"""The pods on this node, from their sandboxes' saved state (every front end
records one under the run root): those whose owner still runs and serves a
control socket."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.errors import PykataError
from pykata.runtime.control import control_socket
from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import qemu_running, read_sandbox_state
from pykata.runtime.state import SandboxState, process_alive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundPod:
    paths: SandboxPaths
    state: SandboxState

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def socket(self) -> Path:
        # The socket's place is the sandbox's own directory, whatever the
        # record says: the monitor connects nowhere else.
        return control_socket(self.paths.run_dir)

    def owner_alive(self) -> bool:
        return process_alive(self.state.owner_pid, self.state.owner_start)

    def qemu_pid(self) -> int:
        """QEMU's pid if it is still this sandbox's QEMU, else 0."""
        return self.state.qemu_pid if qemu_running(self.state) else 0


def find_pods(root: Path | None = None) -> list[FoundPod]:
    """Every sandbox under `root` (the run root) whose owner runs and serves
    its control socket: a pod still starting, a VM kept warm for the VM
    cache and a pod whose owner died are not pods to ask."""
    sandboxes = (root or run_root()) / "sandboxes"
    try:
        entries = sorted(sandboxes.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            paths = SandboxPaths(entry.name, sandboxes.parent)
            if not paths.state_file.is_file():
                continue
            state = read_sandbox_state(paths)
        except PykataError as exc:
            log.warning("skipping %s: %s", entry, exc)
            continue
        pod = FoundPod(paths, state)
        if state.control_socket and pod.owner_alive():
            found.append(pod)
    return found


def sandbox_entry(pod: FoundPod) -> dict[str, Any]:
    """One pod as /sandboxes lists it."""
    state = pod.state
    return {
        "id": state.id,
        "key": state.key,
        "front_end": state.front_end,
        "status": state.status,
        "boot": state.boot,
        "owner_pid": state.owner_pid,
        "qemu_pid": pod.qemu_pid(),
        "created": state.created,
        "containers": state.containers,
        "control_socket": str(pod.socket),
        # Issue 17.4 (the collect branch) adds the stale-pod field here.
    }
