"""The pods on this node, from their sandboxes' saved state (every front end
records one under the run root): those whose owner still runs and serves a
control socket."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.runtime.control import control_socket
from pykata.runtime.paths import SandboxPaths
from pykata.runtime.sandbox import qemu_running
from pykata.runtime.sandbox_index import list_sandboxes
from pykata.runtime.staleness import GuestAssets, staleness
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
    found = []
    for entry in list_sandboxes(root):
        if entry.state is None:
            # A start still writing its state, or another pykata's record.
            log.debug("skipping %s: %s", entry.paths.run_dir, entry.error)
            continue
        pod = FoundPod(entry.paths, entry.state)
        if entry.state.control_socket and pod.owner_alive():
            found.append(pod)
    return found


def sandbox_entry(pod: FoundPod, current: GuestAssets | None = None) -> dict[str, Any]:
    """One pod as /sandboxes lists it; `current`: the guest assets a pod
    started now would boot, against which the pod's are judged."""
    state = pod.state
    verdict = staleness(state, current=current)
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
        # current, stale or unknown, and why.
        "assets": verdict.state.value,
        "assets_detail": verdict.detail,
    }
