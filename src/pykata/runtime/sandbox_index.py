"""The sandboxes under pykata's run root, as their saved states describe them:
how a command that is not a pod's owner (`pykata events`, `collect`,
`check`) finds a pod by its id, whichever front end made it.

A sandbox's directory is named by its key, which is its id for `pykata run`
but not for containerd's pods or pykata-oci's containers; the id is in its
saved state. A state that cannot be read (another pykata's, a half-written
start) is listed with its error rather than hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pykata.errors import NotFoundError, PykataError
from pykata.runtime.paths import SandboxPaths, run_root
from pykata.runtime.sandbox import owner_gone, read_sandbox_state
from pykata.runtime.state import SandboxState


@dataclass(frozen=True)
class SandboxEntry:
    paths: SandboxPaths
    state: SandboxState | None
    error: str = ""

    @property
    def id(self) -> str:
        return self.state.id if self.state is not None else self.paths.key

    @property
    def alive(self) -> bool:
        """Whether its owner (or its VM) still runs."""
        return self.state is not None and not owner_gone(self.state)


def list_sandboxes(root: Path | None = None) -> list[SandboxEntry]:
    sandboxes = (root or run_root()) / "sandboxes"
    try:
        names = sorted(p.name for p in sandboxes.iterdir() if p.is_dir())
    except OSError:
        return []
    entries = []
    for name in names:
        try:
            paths = SandboxPaths(name, sandboxes.parent)
        except PykataError:
            continue
        try:
            entries.append(SandboxEntry(paths, read_sandbox_state(paths)))
        except PykataError as exc:
            entries.append(SandboxEntry(paths, None, str(exc)))
    return entries


def find_sandbox(sandbox_id: str, root: Path | None = None) -> SandboxEntry:
    """The running sandbox with this id (or key), or NotFoundError saying
    what exists."""
    found = [e for e in list_sandboxes(root)
             if e.state is not None and sandbox_id in (e.state.id, e.state.key)]
    alive = [e for e in found if e.alive]
    if alive:
        return alive[0]
    where = (root or run_root()) / "sandboxes"
    gone = [e.state for e in found if e.state is not None]
    if gone:
        raise NotFoundError(f"pod {sandbox_id} is gone: its owner (pid {gone[0].owner_pid}) "
                            "no longer runs", hint="`pykata cleanup` removes what it left")
    raise NotFoundError(f"no pod {sandbox_id} under {where}",
                        hint="`pykata collect` lists the pods running; containerd's pods "
                             "are named by their sandbox id, pykata-oci's by container id")
